"""Hertz-dev's FSQ latent quantizer (``inference_volcano_3.pt``): a 32-dim codec latent -> one of
8**5 FSQ indices (the main transformer's vocabulary) and its embedding (the resynthesizer's
"plex"). Attribute names are the published tensor names."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import FFNN

FSQ_LEVELS = (8, 8, 8, 8, 8)  # 8**5 indices: transformer.VOCAB


class FSQ(nn.Module):
    """Finite scalar quantization over 5 dims x 8 levels (lucidrains' FSQ as the reference
    configures it). Codes are in {-1, -0.75, ..., 0.75}; index = sum(level_d * 8**d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project_in = nn.Linear(dim, len(FSQ_LEVELS))
        self.project_out = nn.Linear(len(FSQ_LEVELS), dim)
        # real tensors even when the module is built on ``meta`` (they are not in the files)
        levels = torch.tensor(FSQ_LEVELS, dtype=torch.int32, device="cpu")
        basis = torch.cumprod(torch.tensor((1,) + FSQ_LEVELS[:-1], device="cpu"), 0, dtype=torch.int32)
        self.register_buffer("_levels", levels, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(..., 5) -> codes (..., 5) in float32 (the reference always quantizes in float32)."""
        return self.bound(z.float()).round() / (self._levels // 2)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        half = self._levels // 2
        return ((codes * half + half) * self._basis).sum(dim=-1).to(torch.int64)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) int -> codes (..., 5) float32."""
        level = (indices[..., None] // self._basis) % self._levels
        half = self._levels // 2
        return (level - half) / half

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.project_out(codes.to(self.project_out.weight.dtype))


@dataclass(frozen=True)
class QuantizerConfig:
    dim: int = 2048
    ff_dim: int = 8192
    input_dim: int = 32


class LatentQuantizer(nn.Module):
    """32-dim latent -> FSQ index (and its ``dim``-wide embedding, the resynthesizer's "plex")."""

    def __init__(self, c: QuantizerConfig = QuantizerConfig()) -> None:
        super().__init__()
        self.config = c
        self.compressor = FSQ(c.dim)
        self.ffnn = FFNN(c.dim, c.ff_dim)  # the transformers' SwiGLU
        self.input = nn.Linear(c.input_dim, c.dim)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (B, T, 32) -> embedding (B, T, dim), indices (B, T). No residual around the
        FFN (as published)."""
        z = self.compressor.project_in(self.ffnn(self.input(latents)))
        codes = self.compressor.quantize(z)
        return self.compressor.embed_codes(codes), self.compressor.codes_to_indices(codes)

    def embed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) FSQ indices -> (..., dim) embeddings (the reference's ``untokenize``)."""
        return self.compressor.embed_codes(self.compressor.indices_to_codes(indices))
