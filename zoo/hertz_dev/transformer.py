"""Hertz-dev's transformers: the main autoregressive transformer (mono or two-speaker "split") and
the resynthesizer (a transformer VAE prior with a Gaussian-mixture output, told the next FSQ
token at its middle layer). The FSQ latent quantizer is quantizer.py.

Attribute names are the published tensor names (``layers.N.attn.attn.proj_qkv`` ...). Norms are
LayerNorms without bias (eps 1e-5), QK-norm runs over the full q / k vectors before the split into
heads, RoPE is the NeoX half-split layout (theta 10 000) with angles computed in float32 as the
reference does, the FFN is SwiGLU with a fused ``gateup_proj`` (gate first).

Attention runs over the zoo's KV cache (zoo.core.kv_cache): a step takes a batch of rows
(sessions), each at its own position, described by ``Rows``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.kv_cache import KVCache, Rows, attend
from .layers import FFNN, Norm
from .quantizer import LatentQuantizer

THETA = 10_000.0
MAIN_HEADS = 32  # as published, at any width (tiny checkpoints keep them)
RESYNTH_HEADS = 16
MAIN_CONTEXT = 2048  # trained context of the main model (positions)
RESYNTH_CONTEXT = 8192
VOCAB = 8**5  # 32768 FSQ indices (quantizer.FSQ_LEVELS)


# -- transformer blocks ----------------------------------------------------------------------
def default_ff_dim(dim: int) -> int:
    """The reference's FFNN default width (11008 for dim 4096)."""
    return 256 * ((int(2 * 4 * dim / 3) + 256 - 1) // 256)


def rope_tables(head_dim: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, head_dim) in float32, as the reference's ShapeRotator computes them, on
    the CPU whatever the device (CUDA's float32 pow / cos / sin differ in the last bit: the
    tables, and so the outputs, are then the same on every device)."""
    freqs = 1.0 / (THETA ** (torch.arange(0, head_dim, 2).float() / head_dim))
    t = torch.arange(length, dtype=freqs.dtype)
    angles = torch.outer(t, freqs)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, 1, T, D) float32. Computed in at least float32, cast back."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = y.chunk(2, dim=-1)
    return (y * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def per_channel(rows: Rows, n: int) -> Rows:
    """The resynthesizer's upper-layer rows: row r's k-th output channel is r * n + k. From the
    host copies when there are some; inside a CUDA-graph capture (none) from the device tensors,
    so that each replay derives them from the rows it is given."""
    if n == 1:
        return rows
    if rows.rows is None:
        index = (rows.index[:, None] * n + torch.arange(n, device=rows.index.device)).flatten()
        mask = None if rows.mask is None else rows.mask.repeat_interleave(n, dim=0)
        return Rows(index, rows.positions.repeat_interleave(n, dim=0), rows.width, index, mask, fresh=rows.fresh)
    return Rows.make([r * n + k for r in rows.rows for k in range(n)], [p for p in rows.starts for _ in range(n)],
                     rows.positions.size(1), rows.index.device, width=rows.width, masked=rows.mask is not None)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.proj_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm_q = Norm(dim)
        self.norm_k = Norm(dim)
        self.attn_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope, cache_k, cache_v, rows: Rows):
        """x (B, T, D); rope = (cos, sin) (B, 1, T, hd); cache_k/v (rows, H, L, hd) of this layer."""
        B, T, D = x.shape
        q, k, v = self.proj_qkv(x).chunk(3, dim=-1)
        q = self.norm_q(q).to(q.dtype)
        k = self.norm_k(k).to(k.dtype)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attend(q, k, v, cache_k, cache_v, rows)
        return self.attn_out(y.transpose(1, 2).reshape(B, T, D))


class PreNormAttn(nn.Module):
    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.attn_norm = Norm(dim)
        self.attn = Attention(dim, n_head)


class PreNormFFNN(nn.Module):
    def __init__(self, dim: int, ff_dim: int) -> None:
        super().__init__()
        self.ffnn_norm = Norm(dim)
        self.ffnn = FFNN(dim, ff_dim)


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int, ff_dim: int) -> None:
        super().__init__()
        self.attn = PreNormAttn(dim, n_head)
        self.ffnn = PreNormFFNN(dim, ff_dim)

    def forward(self, x, rope, cache_k, cache_v, rows: Rows):
        h = x + self.attn.attn(self.attn.attn_norm(x), rope, cache_k, cache_v, rows)
        return h + self.ffnn.ffnn(self.ffnn.ffnn_norm(h))


def _rope_for(table: tuple[torch.Tensor, torch.Tensor], rows: Rows):
    cos, sin = table
    return cos[rows.positions][:, None], sin[rows.positions][:, None]


class _StackShape:
    """What both transformers' configs derive from ``dim``, ``n_head`` and ``split``."""

    @property
    def channels(self) -> int:
        return 2 if self.split else 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


# -- main model (inference_caraway_112000.pt / inference_scion_54000.pt) -----------------------
@dataclass(frozen=True)
class MainConfig(_StackShape):
    dim: int = 4096
    layers: int = 32
    ff_dim: int = 11008
    vocab: int = VOCAB
    latent_dim: int = 32
    split: bool = False
    n_head: int = MAIN_HEADS


class GPTOutput(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.norm = Norm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x))


class HertzLM(nn.Module):
    """Continuous latents in (one 32-dim input projection per channel, summed), logits over the
    32768 FSQ indices of the next latent out (one head per channel)."""

    def __init__(self, c: MainConfig = MainConfig()) -> None:
        super().__init__()
        self.config = c
        self.input = nn.Linear(c.latent_dim, c.dim)
        self.input2 = nn.Linear(c.latent_dim, c.dim) if c.split else None
        self.layers = nn.ModuleList(Block(c.dim, c.n_head, c.ff_dim) for _ in range(c.layers))
        self.output = GPTOutput(c.dim, c.vocab)
        self.output2 = GPTOutput(c.dim, c.vocab) if c.split else None

    def new_cache(self, rows: int, length: int, dtype=None, device=None, scratch: bool = False) -> KVCache:
        w = self.input.weight
        return KVCache(self.config.layers, rows, self.config.n_head, length, self.config.head_dim,
                       dtype or w.dtype, device or w.device, scratch=scratch)

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        if self.config.split:
            x1, x2 = latents.chunk(2, dim=-1)
            return self.input(x1) + self.input2(x2)
        return self.input(latents)

    def forward(self, latents, cache: KVCache, rows: Rows, rope, channels=(0,), hooks=None):
        """latents (B, T, 32 * channels) -> [logits (B, vocab) of the last position, per channel
        in ``channels``]. ``hooks``: a list that receives every layer's output (tests)."""
        x = self.embed(latents)
        r = _rope_for(rope, rows)
        for i, layer in enumerate(self.layers):
            x = layer(x, r, cache.k[i], cache.v[i], rows)
            if hooks is not None:
                hooks.append(x)
        last = x[:, -1]
        heads = (self.output, self.output2)
        return [heads[c](last) for c in channels]


# -- resynthesizer (inference_whip_72000.pt / inference_care_50000.pt) -------------------------
@dataclass(frozen=True)
class ResynthConfig(_StackShape):
    dim: int = 4096
    layers: int = 8
    ff_dim: int = 11008
    components: int = 8
    latent_dim: int = 32
    plex_dim: int = 2048
    split: bool = False
    n_head: int = RESYNTH_HEADS

    @property
    def plex_layer(self) -> int:
        return self.layers // 2  # hard-coded in the reference, whatever the config says


class MixtureIO(nn.Module):
    """GaussianMixtureIOLayer: latent -> hidden; hidden -> (locs, scales, weights) of a
    ``components``-way diagonal Gaussian mixture over the next latent."""

    def __init__(self, latent_dim: int, dim: int, components: int, heads: bool = True) -> None:
        super().__init__()
        self.latent_dim, self.components = latent_dim, components
        self.input_projection = nn.Linear(latent_dim, dim)
        if heads:
            self.fc_loc = nn.Linear(dim, components * latent_dim)
            self.fc_scale = nn.Linear(dim, components * latent_dim)
            self.fc_weight = nn.Linear(dim, components)

    def output(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (..., D) -> locs (..., K, Z), scales (..., K, Z), weights (..., K)."""
        shape = (*h.shape[:-1], self.components, self.latent_dim)
        locs = self.fc_loc(h).view(shape)
        s = self.fc_scale(h)
        scales = torch.clamp((s + torch.sqrt(torch.square(s) + 4)) / 2, min=1e-6).view(shape)
        return locs, scales, self.fc_weight(h)


class Stack(nn.Module):
    def __init__(self, c: ResynthConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(c.dim, c.n_head, c.ff_dim) for _ in range(c.layers))


class Resynthesizer(nn.Module):
    """TransformerVAE: layers below ``plex_layer`` run on the current latents; there each output
    channel adds the projection of its "plex" (the FSQ embedding of the next latent: of the
    actual next input latent inside a prefill, of the sampled next token at the last position);
    the upper layers run once per channel with shared weights and their own KV rows; the shared
    mixture head reads the last position."""

    def __init__(self, c: ResynthConfig = ResynthConfig()) -> None:
        super().__init__()
        self.config = c
        self.io = MixtureIO(c.latent_dim, c.dim, c.components)
        self.stack = Stack(c)
        self.plex_projection = nn.Linear(c.plex_dim, c.dim)
        self.out_norm = Norm(c.dim)
        if c.split:
            self.io2 = MixtureIO(c.latent_dim, c.dim, c.components, heads=False)
            self.plex_projection2 = nn.Linear(c.plex_dim, c.dim)
        else:
            self.io2 = self.plex_projection2 = None

    def new_caches(self, rows: int, length: int, out_channels: int, dtype=None, device=None,
                   scratch: bool = False) -> tuple[KVCache, KVCache]:
        """(lower cache: one row per slot, upper cache: ``out_channels`` rows per slot). With
        ``scratch`` the lower cache has a scratch row (row ``rows``) and the upper cache the
        ``out_channels`` rows that scratch slot's channels map to (``per_channel``)."""
        c, w = self.config, self.plex_projection.weight
        dtype, device = dtype or w.dtype, device or w.device
        lower = KVCache(c.plex_layer, rows, c.n_head, length, c.head_dim, dtype, device, scratch=scratch)
        upper = KVCache(c.layers - c.plex_layer, (rows + int(scratch)) * out_channels, c.n_head, length, c.head_dim,
                        dtype, device)
        return lower, upper

    def forward(self, latents, next_tokens, quantizer: LatentQuantizer, caches, rows: Rows, rope,
                channels=(0,), hooks=None):
        """latents (B, T, 32 * C); next_tokens (B, len(channels)) the sampled next FSQ index of
        each output channel -> (locs, scales, weights) of the last position, each with a leading
        (len(channels), B) shape. Upper-cache row of (slot row r, k-th output channel) is
        r * len(channels) + k."""
        c = self.config
        lower, upper = caches
        xs = latents.chunk(c.channels, dim=-1)
        x = self.io.input_projection(xs[0])
        if c.split:
            x = x + self.io2.input_projection(xs[1])
        B, T, _ = x.shape
        r = _rope_for(rope, rows)
        for i, layer in enumerate(self.stack.layers[: c.plex_layer]):
            x = layer(x, r, lower.k[i], lower.v[i], rows)
            if hooks is not None:
                hooks.append(x)
        projections = (self.plex_projection, self.plex_projection2)
        paths = []
        for k, ch in enumerate(channels):
            plex_next = quantizer.embed_indices(next_tokens[:, k : k + 1]).to(x.dtype)  # (B, 1, P)
            if T > 1:  # position t is told the next latent t + 1 (roll by -1), the last the token
                plex = torch.roll(quantizer(xs[ch])[0].to(x.dtype), -1, dims=1)
                plex = torch.cat([plex[:, :-1], plex_next], dim=1)
            else:
                plex = plex_next
            paths.append(x + projections[ch](plex))
        n = len(channels)
        h = torch.stack(paths, dim=1).reshape(B * n, T, -1)  # row-major: (slot, channel)
        upper_rows = per_channel(rows, n)
        r2 = r if n == 1 else (r[0].repeat_interleave(n, dim=0), r[1].repeat_interleave(n, dim=0))
        for i, layer in enumerate(self.stack.layers[c.plex_layer :]):
            h = layer(h, r2, upper.k[i], upper.v[i], upper_rows)
            if hooks is not None:
                hooks.append(h)
        locs, scales, weights = self.io.output(self.out_norm(h[:, -1]))
        return (locs.view(B, n, *locs.shape[1:]).transpose(0, 1),
                scales.view(B, n, *scales.shape[1:]).transpose(0, 1),
                weights.view(B, n, -1).transpose(0, 1))
