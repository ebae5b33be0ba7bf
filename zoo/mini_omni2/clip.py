"""The image encoder Mini-Omni2 looks with: OpenAI CLIP's ViT-B/32 vision tower as the
mini-omni/CLIP fork runs it (``ln_post`` and ``proj`` over all 50 tokens, CLS and 7x7 patches,
not the CLS token alone), read from the published TorchScript ``ViT-B-32.pt`` as data, and CLIP's
image transform (resize 224 bicubic, centre crop, RGB, normalise)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.checkpoints import mismatch_problems
from ..core.errors import CheckpointMismatch
from ..core.torchscript import read_torchscript_tensors
from ..mini_omni.whisper import LayerNorm  # CLIP's LayerNorm is the same fp32-for-fp16 one

CLIP_FILE = "ViT-B-32.pt"
PREFIX = "visual."
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionDims:
    input_resolution: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    output_dim: int = 512

    @property
    def heads(self) -> int:  # clip.model.build_model: vision_heads = vision_width // 64
        return self.width // 64

    @property
    def tokens(self) -> int:
        return (self.input_resolution // self.patch_size) ** 2 + 1

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> VisionDims:
        """As clip.model.build_model reads them from the tensors."""
        conv = state["conv1.weight"]
        grid = round((state["positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len([k for k in state if k.endswith(".attn.in_proj_weight")])
        return cls(conv.shape[-1] * grid, conv.shape[-1], conv.shape[0], layers, state["proj"].shape[1])


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (L, N, D): CLIP keeps the sequence-first layout of nn.MultiheadAttention."""
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """clip.model.VisionTransformer; state-dict keys are the archive's ``visual.*`` names."""

    def __init__(self, dims: VisionDims) -> None:
        super().__init__()
        self.dims = dims
        w = dims.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=dims.patch_size, stride=dims.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(dims.tokens, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, dims.layers, dims.heads)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(torch.zeros(w, dims.output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, R, R) -> (B, tokens, output_dim): every token, as the fork returns them."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x) @ self.proj


def load_vision(path: Path) -> VisionTransformer:
    """The vision tower of a CLIP TorchScript archive, strictly: exactly the tensors
    clip.model.VisionTransformer has, with their shapes (the text tower is ignored)."""
    tensors = read_torchscript_tensors(path)
    state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    needed = ("conv1.weight", "positional_embedding", "proj")
    if any(name not in state for name in needed):
        raise CheckpointMismatch(f"{path} is not a CLIP ViT archive: no {PREFIX}{{{', '.join(needed)}}}")
    model = VisionTransformer(VisionDims.from_state(state))
    ours = model.state_dict()
    shapes = sorted(f"{PREFIX}{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
                    for k, v in ours.items() if k in state and state[k].shape != v.shape)
    problems = mismatch_problems(sorted(PREFIX + k for k in ours.keys() - state.keys()),
                                 sorted(PREFIX + k for k in state.keys() - ours.keys()), shapes)
    if problems:
        raise CheckpointMismatch(f"{path} does not match CLIP's VisionTransformer: {problems}")
    model.load_state_dict(state, strict=True)
    return model


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """clip.clip._transform(resolution) without torchvision: (3, R, R) float32. Resize the short
    side to R (bicubic, torchvision's size rounding), centre-crop, then convert to RGB (in that
    order, as the reference: a palette or RGBA image is resized in its own mode), scale to
    [0, 1] and normalise, each step in float32 as ToTensor and Normalize compute it."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resolution, int(resolution * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution)).convert("RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    pixels = pixels.to(torch.float32).div(255)
    mean, std = torch.tensor(MEAN, dtype=torch.float32), torch.tensor(STD, dtype=torch.float32)
    return pixels.sub_(mean[:, None, None]).div_(std[:, None, None])
