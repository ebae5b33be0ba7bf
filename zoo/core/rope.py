"""Rotary position embeddings in the interleaved layout (pairs (x0, x1), (x2, x3), ... rotate
together), with angles and the rotation computed in float32 whatever the model dtype, as Kyutai's
reference does (Moshi's Helium and depth transformers, Mimi's encoder and decoder transformers).
A float64 parity run therefore rotates in float32 too; that is the reference computation."""
from __future__ import annotations

import math

import torch


def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, max_period: float = 10_000.0) -> torch.Tensor:
    """x (B, H, T, D), positions (B, T) absolute positions -> x rotated, in x's dtype."""
    d = x.size(-1)
    freqs = torch.exp(torch.arange(d // 2, device=x.device, dtype=torch.float32) * (-math.log(max_period) * 2 / d))
    angles = positions.to(torch.float32)[:, None, :, None] * freqs  # (B, 1, T, D/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    pairs = x.view(*x.shape[:-1], d // 2, 2)
    real, imag = pairs[..., 0].float(), pairs[..., 1].float()
    out = torch.stack([(real * cos - imag * sin).to(x.dtype), (real * sin + imag * cos).to(x.dtype)], dim=-1)
    return out.view(x.shape)
