"""GLM-4-Voice's speech tokenizer (the reference's ``WhisperVQEncoder``): the first 16 layers of a
whisper-large-v3 encoder with causal convolutions and block-causal attention, average pooling to
12.5 Hz and a 16384-entry codebook. Loads ``THUDM/glm-4-voice-tokenizer``'s ``config.json``,
``preprocessor_config.json`` and ``model.safetensors`` unchanged (the tensor names are the
module's attribute names). Audio -> ids: ``ceil(samples / 1280)`` ids for 16 kHz audio."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

SAMPLE_RATE = 16000
SEGMENT_SECONDS = 30  # the reference tokenizes long audio in 30 s segments (1500 positions)
TOKENIZER_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")


@dataclass(frozen=True)
class TokenizerConfig:
    """The fields of the published config.json that the forward pass uses."""

    d_model: int = 1280
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    quantize_position: int = 16
    pooling_position: int = 16
    pooling_kernel_size: int = 4
    pooling_type: str = "avg"
    quantize_vocab_size: int = 16384
    quantize_causal_block_size: int = 200
    encoder_causal_convolution: bool = True
    encoder_causal_attention: bool = False
    quantize_causal_encoder: bool = False
    quantize_encoder_only: bool = True
    activation_function: str = "gelu"
    scale_embedding: bool = False

    @classmethod
    def from_json(cls, path: Path) -> TokenizerConfig:
        raw = json.loads(path.read_text())
        config = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        supported = dict(pooling_type="avg", encoder_causal_convolution=True, encoder_causal_attention=False,
                         quantize_causal_encoder=False, quantize_encoder_only=True, activation_function="gelu",
                         scale_embedding=False, pooling_position=config.quantize_position)
        for name, wanted in supported.items():
            if getattr(config, name) != wanted:
                raise ValueError(f"{path}: {name}={getattr(config, name)!r} is not supported (expected {wanted!r})")
        return config


class CausalConv1d(nn.Conv1d):
    """A Conv1d padded on the left only (the reference ignores the ``padding`` argument)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.dilation[0] * (self.kernel_size[0] - 1), 0)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        dim = config.d_model
        self.self_attn = Attention(dim, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


def block_causal_mask(valid: torch.Tensor, block: int) -> torch.Tensor:
    """valid (B, T) bool -> (B, 1, T, T) bool: a frame sees every earlier frame and every frame of
    its own ``block``-frame block, but no padding frame."""
    T = valid.size(1)
    position = torch.arange(T, device=valid.device)
    causal = position[None, :] <= position[:, None]
    same_block = (position[None, :] // block) == (position[:, None] // block)
    return ((causal | same_block)[None] & valid[:, None, :])[:, None]


class SpeechTokenizerEncoder(nn.Module):
    """The published tensor names: conv1, conv2, embed_positions, layers.N.*, codebook,
    embed_positions2, and the training-only EMA buffers ema_count and ema_weight."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.d_model
        self.conv1 = CausalConv1d(config.num_mel_bins, dim, kernel_size=3)
        self.conv2 = CausalConv1d(dim, dim, kernel_size=3, stride=2)
        self.embed_positions = nn.Embedding(config.max_source_positions, dim)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.quantize_position))
        self.codebook = nn.Embedding(config.quantize_vocab_size, dim)
        # Used by layers after the quantizer, which the tokenizer does not have: loaded, never used.
        self.embed_positions2 = nn.Embedding(math.ceil(config.max_source_positions / config.pooling_kernel_size), dim)
        self.register_buffer("ema_count", torch.ones(config.quantize_vocab_size))
        self.register_buffer("ema_weight", torch.zeros(config.quantize_vocab_size, dim))

    @property
    def frames_per_token(self) -> int:
        """Mel frames (hop 160) per id: conv2's stride 2 times the pooling kernel."""
        return self.conv1.stride[0] * self.conv2.stride[0] * self.config.pooling_kernel_size

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """features (B, 128, F) log-mel, frame_mask (B, F) -> ids (B, ceil(F / 8))."""
        c = self.config
        valid = frame_mask[:, :: self.conv1.stride[0] * self.conv2.stride[0]].bool()
        x = F.gelu(self.conv2(F.gelu(self.conv1(features)))).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.size(1)]
        mask = block_causal_mask(valid, c.quantize_causal_block_size)
        for layer in self.layers:
            x = layer(x, mask)
        # average pooling over 4 frames, the right edge zero-padded to a multiple of 4
        x = x.transpose(1, 2)
        x = F.pad(x, (0, -x.size(-1) % c.pooling_kernel_size))
        x = F.avg_pool1d(x, c.pooling_kernel_size).transpose(1, 2)
        return nearest_code(x, self.codebook.weight)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||x - c_k||^2, computed as |c|^2 + |x|^2 - 2 x.c like the reference (so near-ties
    resolve the same way)."""
    flat = x.reshape(-1, x.size(-1))
    distances = torch.addmm((codebook**2).sum(1) + (flat**2).sum(1, keepdim=True), flat, codebook.t(),
                            alpha=-2.0, beta=1.0)
    return distances.argmin(dim=1).view(x.shape[:-1])


class SpeechTokenizer:
    """Audio -> GLM-4-Voice audio ids (12.5 per second)."""

    def __init__(self, encoder: SpeechTokenizerEncoder, feature_extractor) -> None:
        self.encoder = encoder
        self.feature_extractor = feature_extractor

    @classmethod
    def load(cls, folder: Path, device=None, dtype=torch.float32) -> SpeechTokenizer:
        return cls.build(TokenizerConfig.from_json(folder / "config.json"),
                         json.loads((folder / "preprocessor_config.json").read_text()),
                         load_file(folder / "model.safetensors"), device=device, dtype=dtype)

    @classmethod
    def build(cls, config: TokenizerConfig, preprocessor: dict, state: dict[str, torch.Tensor], device=None,
              dtype=torch.float32) -> SpeechTokenizer:
        """From a config, the preprocessor settings and a state dict with the published names."""
        from transformers import WhisperFeatureExtractor

        with torch.device("meta"):
            encoder = SpeechTokenizerEncoder(config)
        encoder.load_state_dict(state, strict=True, assign=True)
        return cls(encoder.to(device=device, dtype=dtype).eval(), WhisperFeatureExtractor(**preprocessor))

    @torch.inference_mode()
    def __call__(self, audio: np.ndarray) -> list[int]:
        """16 kHz mono float audio -> ids, 30 s segments at a time as the reference does."""
        segment = SEGMENT_SECONDS * SAMPLE_RATE
        pieces = [audio[start : start + segment] for start in range(0, len(audio), segment)]
        stride = self.encoder.frames_per_token * self.feature_extractor.hop_length  # 1280 samples
        features = self.feature_extractor(pieces, sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                                          return_tensors="pt", padding="longest", pad_to_multiple_of=stride)
        weight = self.encoder.conv1.weight
        ids = self.encoder(features["input_features"].to(weight.device, weight.dtype),
                           features["attention_mask"].to(weight.device))
        keep = features["attention_mask"][:, :: self.encoder.frames_per_token].bool()
        return [int(i) for row, mask in zip(ids.cpu(), keep) for i in row[mask]]
