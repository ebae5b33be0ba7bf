"""The transformer layers Moshi's reference shares between Mimi (encoder and decoder
transformers: LayerNorm, GELU MLP, layer scale, context 250) and Helium (the temporal
transformer: RMSNorm computed in float32, SiLU gating, no layer scale, context 3000).

Module names are the reference's (moshi 0.2): ``layers.N.self_attn.in_projs.0`` (q, k, v fused)
and ``out_projs.0``, ``norm1``/``norm2`` (``.weight``/``.bias`` for LayerNorm, ``.alpha`` for
RMSNorm), ``linear1``/``linear2`` or ``gating.linear_in``/``gating.linear_out``,
``layer_scale_1.scale``/``layer_scale_2.scale``. The published files spell the projections the
older way (``in_proj_weight``, ``out_proj.weight``; stacked over the steps of a layer with one
set of weights per step): ``per_step_names`` and ``stacked_names`` map between the two, as the
reference's ``StreamingMultiheadAttention._load_hook`` does. Every projection is an nn.Linear, so
zoo.core.quantize can pack it.

Attention runs over a zoo.core.kv_cache.KVCache used as a ring (``Rows.ring``): the reference's
RingKVCache holds ``context`` positions and a token sees the last ``context`` positions, so a
session runs for as long as it likes (quality degrades past the context, as upstream).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.kv_cache import KVCache, Rows, attend
from ..core.rope import rope_interleaved


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    context: int
    max_period: float = 10_000.0
    norm: str = "layer_norm"  # or "rms_norm_f32"
    gating: str = "none"  # or "silu"
    layer_scale: float | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


class RMSNormF32(nn.Module):
    """``alpha`` (1, 1, dim); the reference's ``rms_norm_f32``: statistics and scaling in float32
    (eps 1e-8), the result cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        var = self.eps + x32.pow(2).mean(dim=-1, keepdim=True)
        return (x32 * (self.alpha.float() * torch.rsqrt(var))).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5)
    if kind == "rms_norm_f32":
        return RMSNormF32(dim)
    raise ValueError(f"unsupported norm {kind!r} (Moshi and Mimi use layer_norm and rms_norm_f32)")


def gating_hidden(dim: int, dim_feedforward: int) -> int:
    """The reference's ActivationGating width: 2/3 of the feed-forward size (21/8 of dim when the
    feed-forward size is exactly 4 dim), so the gated FFN keeps the plain FFN's weight count."""
    return (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3


class Gating(nn.Module):
    """SiLU-gated FFN: ``linear_in`` (dim -> 2 hidden: gate then value), ``linear_out``."""

    def __init__(self, dim: int, dim_feedforward: int) -> None:
        super().__init__()
        hidden = gating_hidden(dim, dim_feedforward)
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.linear_in(x).view(*x.shape[:-1], 2, -1).unbind(-2)
        return self.linear_out(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def projections(dim: int, out: int, steps: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(dim, out, bias=False) for _ in range(steps))


# the published files' spellings -> the per-step module lists (the reference's _load_hook)
_STACKED = {"in_proj_weight": "in_projs", "in_proj.weight": "in_projs", "out_proj.weight": "out_projs"}
SCALES = "_scb"  # suffix of the int8 files' scales (moshi.utils.quantize), mapped like the weights


def per_step_names(state: dict[str, torch.Tensor], steps_of) -> dict[str, torch.Tensor]:
    """Stacked or fused attention projections (``X.self_attn.in_proj_weight``, ``in_proj.weight``,
    ``out_proj.weight``, and their ``_scb`` scales) -> ``X.self_attn.in_projs.K.weight`` per step:
    ``steps_of(key)`` steps, the stacked matrix cut into equal row blocks. A size that does not
    divide is left under its own name, for the strict load to report."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, tail = key.partition(".self_attn.")
        name = tail.removesuffix(SCALES)
        steps = steps_of(key)
        if name not in _STACKED or value.shape[0] % steps:
            out[key] = value
            continue
        suffix = tail[len(name):]
        for i, part in enumerate(value.chunk(steps)):
            out[f"{head}.self_attn.{_STACKED[name]}.{i}.weight{suffix}"] = part
    return out


def stacked_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse, as the published files spell them: ``in_proj_weight`` and ``out_proj.weight``
    with the steps' matrices stacked, each where its first step was (for writing files in the
    published layout, in the published order)."""
    out: dict[str, torch.Tensor | None] = {}
    steps: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        head, _, tail = key.partition(".self_attn.")
        kind, _, rest = tail.partition(".")
        index, _, last = rest.partition(".")
        if kind in ("in_projs", "out_projs") and index.isdigit() and last.removesuffix(SCALES) == "weight":
            name = f"{head}.self_attn." + ("in_proj_weight" if kind == "in_projs" else "out_proj.weight") + \
                last[len("weight"):]
            out.setdefault(name, None)
            steps.setdefault(name, {})[int(index)] = value
        else:
            out[key] = value
    for key, parts in steps.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out


def split_heads(projected: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, T, 3 H D) fused q, k, v -> three (B, H, T, D)."""
    b, t, _ = projected.shape
    return projected.view(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class Attention(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.heads, self.max_period = c.num_heads, c.max_period
        self.in_projs = projections(c.d_model, 3 * c.d_model, 1)
        self.out_projs = projections(c.d_model, c.d_model, 1)

    def forward(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, rows: Rows) -> torch.Tensor:
        q, k, v = split_heads(self.in_projs[0](x), self.heads)
        positions = rows.absolute_positions
        q, k = rope_interleaved(q, positions, self.max_period), rope_interleaved(k, positions, self.max_period)
        out = attend(q, k, v, cache_k, cache_v, rows)
        return self.out_projs[0](out.transpose(1, 2).flatten(2))


class TransformerLayer(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.norm1 = make_norm(c.norm, c.d_model)
        self.norm2 = make_norm(c.norm, c.d_model)
        if c.gating == "none":
            self.linear1 = nn.Linear(c.d_model, c.dim_feedforward, bias=False)
            self.linear2 = nn.Linear(c.dim_feedforward, c.d_model, bias=False)
        elif c.gating == "silu":
            self.gating = Gating(c.d_model, c.dim_feedforward)
        else:
            raise ValueError(f"unsupported gating {c.gating!r}")
        scale = (lambda: LayerScale(c.d_model, c.layer_scale)) if c.layer_scale is not None else nn.Identity
        self.layer_scale_1, self.layer_scale_2 = scale(), scale()
        self.gated = c.gating != "none"

    def forward(self, x: torch.Tensor, cache_k, cache_v, rows: Rows) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), cache_k, cache_v, rows))
        h = self.norm2(x)
        h = self.gating(h) if self.gated else self.linear2(F.gelu(self.linear1(h)))
        return x + self.layer_scale_2(h)


class StreamingTransformer(nn.Module):
    """``layers.N``; ``forward(x, cache, rows)`` appends x's T steps to each row's ring cache."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.config = c
        self.layers = nn.ModuleList(TransformerLayer(c) for _ in range(c.num_layers))

    def new_cache(self, rows: int, dtype, device, scratch: bool = False) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, rows, c.num_heads, c.context, c.head_dim, dtype, device, scratch=scratch)

    def rows(self, cache: KVCache, rows: list[int], new: int) -> Rows:
        """Ring rows at each row's host-known absolute length (``cache.lengths`` counts every
        position ever written, not only those still held)."""
        return ring_rows(cache, rows, new, self.config.context)

    def forward(self, x: torch.Tensor, cache: KVCache, rows: Rows) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, cache.k[i], cache.v[i], rows)
        return x


def ring_rows(cache: KVCache, rows: list[int], new: int, context: int) -> Rows:
    return Rows.ring(rows, [cache.lengths[r] for r in rows], new, cache.max_len, context, cache.device)
