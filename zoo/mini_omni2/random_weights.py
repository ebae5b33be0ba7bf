"""Tiny Mini-Omni2 checkpoints in the published layout, for tests and smoke runs.

The checkpoint folder holds what gpt-omni/mini-omni2 ships (lit_model.pth with the vision
adapter, model_config.yaml with vision_adapter_dim, tokenizer.json, small.pt) and ``ViT-B-32.pt``
as OpenAI publishes it: a TorchScript archive of the whole CLIP model (vision and text towers,
matrices in float16), written here with torch.jit from our own module, so the loader's
no-code reader is tested on the real format. SNAC is Mini-Omni's tiny one. Weights are seeded
random: everything generated from them is noise.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..mini_omni import random_weights as omni
from ..mini_omni.whisper import LayerNorm
from .clip import CLIP_FILE, Transformer, VisionDims, VisionTransformer
from .gpt import VisionGPT, VisionGPTConfig

TINY_GPT = VisionGPTConfig(**{**vars(omni.TINY_GPT), "vision_adapter_dim": 16})
FULL_GPT = VisionGPTConfig(**{**vars(omni.FULL_GPT), "vision_adapter_dim": 512})
# CLIP's layout fixes 224 px / 32 px patches (50 tokens) and 64-wide heads (build_model)
TINY_VISION = VisionDims(width=64, layers=2, output_dim=TINY_GPT.vision_adapter_dim)
FULL_VISION = VisionDims()
TINY_TEXT_TOWER = dict(width=64, layers=1, context_length=77, vocab_size=64)

TINY_FORMAT = 1  # bump when what write_tiny_checkpoint writes changes


def tiny_checkpoint(seed: int = 0, root: str | os.PathLike | None = None) -> omni.TinyFolders:
    """The tiny folders for ``seed``, written once into a cache directory and reused."""
    return omni.tiny_folders(f"mini-omni2-v{TINY_FORMAT}-seed{seed}", write_tiny_checkpoint, seed, root)


def write_tiny_checkpoint(checkpoint: Path, codec: Path, *, seed: int = 0, config: VisionGPTConfig = TINY_GPT) -> None:
    """Mini-Omni's tiny files with the vision adapter in lit_model.pth, and the CLIP archive."""
    def clip(folder: Path, generator: torch.Generator) -> None:
        write_clip_archive(folder / CLIP_FILE, replace(TINY_VISION, output_dim=config.vision_adapter_dim), generator)

    omni.write_tiny_checkpoint(checkpoint, codec, seed=seed, config=config, gpt_class=VisionGPT, more=clip)


class ClipArchive(nn.Module):
    """CLIP's module tree and tensor names (clip.model.CLIP), for writing a ViT archive: the
    vision tower is ours; the text tower is there so the archive holds everything the
    reference's clip.load expects (it rebuilds the whole model from the archive's state)."""

    def __init__(self, vision: VisionDims, width: int, layers: int, context_length: int, vocab_size: int) -> None:
        super().__init__()
        self.visual = VisionTransformer(vision)
        self.transformer = Transformer(width, layers, width // 64)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, vision.output_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def random_clip(vision: VisionDims, generator: torch.Generator, **text_tower) -> ClipArchive:
    """Seeded random CLIP weights (CLIP's own init scales), matrices rounded to float16 as in
    the published archive (clip.model.convert_weights)."""
    model = ClipArchive(vision, **{**TINY_TEXT_TOWER, **text_tower})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name == "logit_scale":
                continue
            elif p.dim() == 1 and not name.endswith(("class_embedding",)):
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(p.shape[0] ** -0.5 * torch.randn(p.shape, generator=generator))
        for module in model.modules():  # convert_weights: conv, linear, attention and projections
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.half()
            elif isinstance(module, nn.MultiheadAttention):
                module.in_proj_weight.data = module.in_proj_weight.data.half()
                module.in_proj_bias.data = module.in_proj_bias.data.half()
        model.visual.proj.data = model.visual.proj.data.half()
        model.text_projection.data = model.text_projection.data.half()
    return model.eval()


def write_clip_archive(path: Path, vision: VisionDims, generator: torch.Generator) -> None:
    """A TorchScript archive of a random CLIP, in the published file's format (torch.jit: our
    own module and file; the zoo's loader reads it without running it)."""
    model = random_clip(vision, generator)
    example = torch.zeros(1, 3, vision.input_resolution, vision.input_resolution, dtype=torch.float16)
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(path))


def random_model(size: str = "full", *, device=None, dtype=None, seed: int = 0):
    """A MiniOmni2 with seeded random weights built in memory (no files)."""
    from tokenizers import Tokenizer

    from ..core.devices import pick_device
    from ..mini_omni.codec import Codec, prepare_for_inference
    from ..mini_omni.gpt import precision
    from ..mini_omni.whisper import AudioEncoder, EncoderDims
    from .model import MiniOmni2

    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    full = size == "full"
    config = FULL_GPT if full else TINY_GPT
    dims = omni.FULL_WHISPER_DIMS if full else omni.TINY_WHISPER_DIMS
    vision_dims = FULL_VISION if full else TINY_VISION
    device, (dtype, quantized) = pick_device(device), precision(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        gpt = VisionGPT(config)
    gpt.load_state_dict(omni.random_gpt_state(config, generator, VisionGPT), assign=True)
    if config.tie_word_embeddings:
        gpt.lm_head.weight = gpt.transformer.wte.weight
    encoder = AudioEncoder(EncoderDims.from_checkpoint(dims))
    prefix = "encoder."
    state = omni.random_whisper_state(dims, generator)
    encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    vision = random_clip(vision_dims, generator).visual.float()
    snac = prepare_for_inference(omni.random_snac(omni.FULL_SNAC if full else omni.TINY_SNAC, seed))
    return MiniOmni2(gpt.placed(device, dtype, quantized), encoder.to(device=device, dtype=dtype).eval(),
                     vision.to(device=device, dtype=dtype).eval(), Codec(snac.to(device=device, dtype=dtype).eval()),
                     Tokenizer.from_str(omni.tiny_tokenizer_json()))


def build(size: str, *, device=None, dtype=None, seed: int = 0, checkpoint=None, codec=None):
    """``zoo.load(..., random_weights=size)``: "tiny" writes the tiny folders in the published
    layout (once per seed) and loads them through the real loader; "full" builds the published
    dimensions in memory."""
    from .model import MiniOmni2

    if size == "full":
        return random_model("full", device=device, dtype=dtype, seed=seed)
    folders = tiny_checkpoint(seed=seed)
    return MiniOmni2.load(device=device, dtype=dtype, checkpoint=checkpoint or folders.checkpoint,
                          codec=codec or folders.codec)
