"""The flow's token encoder (the reference's ``BlockConformerEncoder``, CosyVoice / WeNet style):
a Linear+LayerNorm input layer, ESPnet relative positions, and pre-norm blocks of
Transformer-XL attention (``pos_bias_u``/``pos_bias_v``, ``linear_pos``) plus a SiLU FFN, under a
block-causal mask over blocks of 10 tokens. No convolution module and no macaron FFN (as
configured). Attribute names are the published tensor names under ``encoder.``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def relative_positions(length: int, d_model: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 2*length-1, d_model): sinusoids of the relative positions length-1 ... -(length-1),
    computed in float32 exactly as ESPnet's ``RelPositionalEncoding`` (the checkpoint was trained
    with float32 tables; float64 runs get the same float32 values). The reference builds the table
    for 5000 positions once and slices it; the values do not depend on the table size."""
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    positive = torch.zeros(length, d_model)
    negative = torch.zeros(length, d_model)
    positive[:, 0::2] = torch.sin(position * div_term)
    positive[:, 1::2] = torch.cos(position * div_term)
    negative[:, 0::2] = torch.sin(-1 * position * div_term)
    negative[:, 1::2] = torch.cos(-1 * position * div_term)
    table = torch.cat([torch.flip(positive, [0]), negative[1:]], dim=0)
    return table.unsqueeze(0).to(device=device, dtype=dtype)


def block_causal_grid(length: int, block: int, device=None) -> torch.Tensor:
    """(length, length) bool: token i sees every earlier token and its whole ``block``-token
    block (the reference's ``create_grid_mask(..., fill_triangle=True)``). Blocks start at token
    0 of whatever sequence is encoded."""
    position = torch.arange(length, device=device)
    return (position[None, :] <= position[:, None]) | (position[None, :] // block == position[:, None] // block)


class BlockRelPositionAttention(nn.Module):
    """Multi-head attention with Transformer-XL relative positions:
    score(i, j) = (q_i + u) . k_j + (q_i + v) . p_(i-j), divided by sqrt(d_k)."""

    def __init__(self, heads: int, size: int) -> None:
        super().__init__()
        self.heads, self.d_k = heads, size // heads
        self.linear_q = nn.Linear(size, size)
        self.linear_k = nn.Linear(size, size)
        self.linear_v = nn.Linear(size, size)
        self.linear_out = nn.Linear(size, size)
        self.linear_pos = nn.Linear(size, size, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.d_k))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); allowed (B or 1, T, T) bool; pos_emb (1, 2T-1, C)."""
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, self.heads, self.d_k) for f in (self.linear_q, self.linear_k, self.linear_v))
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.heads, self.d_k).transpose(1, 2)  # (1, H, 2T-1, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        position_scores = relative_shift(q_v @ p.transpose(-2, -1))  # (B, H, T, T)
        # SDPA adds the mask after scaling q.k by 1/sqrt(d_k): pass the position term pre-scaled,
        # with -inf where the block-causal mask forbids attention.
        bias = (position_scores / math.sqrt(self.d_k)).masked_fill(~allowed[:, None], float("-inf"))
        y = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias)
        return self.linear_out(y.transpose(1, 2).reshape(B, T, C))


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    """(..., T, 2T-1) scores against relative positions T-1 ... -(T-1) -> (..., T, T) with
    out[i, j] = scores[i, T-1-i+j], i.e. the score for relative position i-j. The same values as
    Transformer-XL's pad-and-reshape trick, taken as a strided view."""
    *lead, T, width = scores.shape
    scores = scores.contiguous()
    strides = list(scores.stride())
    return scores.as_strided((*lead, T, T), (*strides[:-2], width - 1, 1), scores.storage_offset() + T - 1)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(size, hidden)
        self.w_2 = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm: x += attention(norm_mha(x)); x += FFN(norm_ff(x))."""

    def __init__(self, size: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = BlockRelPositionAttention(heads, size)
        self.feed_forward = PositionwiseFeedForward(size, hidden)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), allowed, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class LinearInput(nn.Module):
    """``embed``: Linear + LayerNorm (+ dropout), then x * sqrt(d) and the relative positions."""

    def __init__(self, input_size: int, size: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(input_size, size), nn.LayerNorm(size, eps=1e-5))
        self.size = size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * math.sqrt(self.size)
        return x, relative_positions(x.size(1), self.size, x.device, x.dtype)


class BlockConformerEncoder(nn.Module):
    def __init__(self, input_size: int, size: int, heads: int, hidden: int, layers: int, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.embed = LinearInput(input_size, size)
        self.encoders = nn.ModuleList(ConformerLayer(size, heads, hidden) for _ in range(layers))
        self.after_norm = nn.LayerNorm(size, eps=1e-5)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, input_size) embedded tokens; valid (B, T) bool or None (no padding)."""
        x, pos_emb = self.embed(x)
        allowed = block_causal_grid(x.size(1), self.block_size, x.device)[None]
        if valid is not None:
            allowed = allowed & valid[:, None, :]
        for layer in self.encoders:
            x = layer(x, allowed, pos_emb)
        return self.after_norm(x)
