"""Moshi's language model: the Helium temporal transformer over 17 streams per 80 ms step
(text, Moshi's 8 codebooks, the user's 8) and the depth transformer ("depformer") that samples
Moshi's 8 codebooks of a step one after the other.

Names are the published ones of ``model.safetensors``: ``emb.N`` (one embedding per audio stream,
``card + 1`` rows: the last is the initial token), ``text_emb``, ``transformer.layers.N``,
``out_norm``, ``text_linear``, ``depformer_in.K`` (one projection per codebook: multi_linear),
``depformer_text_emb``, ``depformer_emb.K`` (codebooks 1..7), ``depformer.layers.N`` (one set of
attention and gating weights per codebook: weights_per_step) and ``linears.K``; the attention
projections are named per step as in the reference's modules (``self_attn.in_projs.K``;
transformer.py maps the published stacked spelling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.kv_cache import KVCache, Rows
from .transformer import (
    Gating,
    StreamingTransformer,
    TransformerConfig,
    make_norm,
    per_step_names,
    projections,
    split_heads,
)

ZERO_TOKEN = -1  # "no input": the embedding is exactly zero


@dataclass(frozen=True)
class LMConfig:
    """The reference's ``_lm_kwargs`` (Moshi 7B, configs/moshi_7b_202409.json); ``from_dict``
    reads the same keys from a checkpoint's config.json."""

    dim: int = 4096
    text_card: int = 32000
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    n_q: int = 16
    dep_q: int = 8
    card: int = 2048
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int = 3000
    max_period: float = 10000.0
    depformer_dim: int = 1024
    depformer_dim_feedforward: int = int(4.125 * 1024)
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)

    # what this port implements of the reference's options; anything else in a config.json is refused
    FIXED = {"causal": True, "layer_scale": None, "gating": "silu", "norm": "rms_norm_f32",
             "positional_embedding": "rope", "depformer_layer_scale": None, "depformer_multi_linear": True,
             "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
             "depformer_weights_per_step_schedule": None, "depformer_low_rank_embeddings": None,
             "norm_emb": False, "bias_proj": False, "depformer_norm": None, "demux_second_text_stream": False,
             "text_card_out": None, "extra_heads_num_heads": 0, "conditioners": None, "fuser": None,
             "cross_attention": False, "kv_repeat": 1, "lora": False}
    IGNORED = {"depformer_context", "depformer_max_period", "depformer_causal", "extra_heads_dim",
               "gradient_checkpointing"}

    @classmethod
    def from_dict(cls, raw: dict) -> LMConfig:
        known = set(cls.__dataclass_fields__)
        values, problems = {}, []
        for key, value in raw.items():
            if key in known:
                values[key] = tuple(value) if key == "delays" else value
            elif key in cls.FIXED:
                if value != cls.FIXED[key] and not (value in ({}, [], 0) and cls.FIXED[key] in (None, 0, False)):
                    problems.append(f"{key}={value!r}")
            elif key not in cls.IGNORED:
                problems.append(f"{key} (unknown)")
        if problems:
            raise ValueError(f"Moshi config.json: unsupported settings {problems}")
        config = cls(**values)
        if len(config.delays) != config.n_q + 1 or config.n_q != 2 * config.dep_q:
            raise ValueError(f"Moshi config.json: expected n_q = 2 dep_q and n_q + 1 delays, got n_q={config.n_q}, "
                             f"dep_q={config.dep_q}, {len(config.delays)} delays")
        return config

    @property
    def temporal(self) -> TransformerConfig:
        return TransformerConfig(self.dim, self.num_heads, self.num_layers, int(self.hidden_scale * self.dim),
                                 self.context, self.max_period, norm="rms_norm_f32", gating="silu")

    @property
    def depth(self) -> TransformerConfig:
        return TransformerConfig(self.depformer_dim, self.depformer_num_heads, self.depformer_num_layers,
                                 self.depformer_dim_feedforward, self.dep_q, norm="rms_norm_f32", gating="silu")


class ScaledEmbedding(nn.Embedding):
    """An embedding whose ZERO_TOKEN (-1) input gives exactly zero (the reference's zero_idx)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        y = super().forward(tokens.clamp(min=0))
        return torch.where((tokens == ZERO_TOKEN)[..., None], torch.zeros((), dtype=y.dtype, device=y.device), y)


class DepthAttention(nn.Module):
    """Self-attention with one set of weights per codebook (``in_projs.K``: q, k, v fused;
    ``out_projs.K``) and no positional embedding."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.heads = c.num_heads
        self.in_projs = projections(c.d_model, 3 * c.d_model, c.context)
        self.out_projs = projections(c.d_model, c.d_model, c.context)

    def forward(self, x: torch.Tensor, step: int, past: list[torch.Tensor]) -> torch.Tensor:
        """x (B, 1, D) at codebook ``step``; ``past`` holds this layer's earlier keys and values of
        the same 80 ms step (the depformer restarts every step)."""
        q, k, v = split_heads(self.in_projs[step](x), self.heads)
        past.append((k, v))
        keys = torch.cat([p[0] for p in past], dim=2)
        values = torch.cat([p[1] for p in past], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values)
        return self.out_projs[step](out.transpose(1, 2).flatten(2))


class DepthLayer(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = DepthAttention(c)
        self.norm1 = make_norm(c.norm, c.d_model)
        self.norm2 = make_norm(c.norm, c.d_model)
        self.gating = nn.ModuleList(Gating(c.d_model, c.dim_feedforward) for _ in range(c.context))

    def forward(self, x: torch.Tensor, step: int, past: list) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), step, past)
        return x + self.gating[step](self.norm2(x))


class Depformer(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DepthLayer(c) for _ in range(c.num_layers))

    def forward(self, x: torch.Tensor, step: int, past: list[list]) -> torch.Tensor:
        for layer, layer_past in zip(self.layers, past):
            x = layer(x, step, layer_past)
        return x


class MoshiLM(nn.Module):
    def __init__(self, c: LMConfig = LMConfig()) -> None:
        super().__init__()
        self.config = c
        self.emb = nn.ModuleList(ScaledEmbedding(c.card + 1, c.dim) for _ in range(c.n_q))
        self.text_emb = ScaledEmbedding(c.text_card + 1, c.dim)
        self.text_linear = nn.Linear(c.dim, c.text_card, bias=False)
        self.transformer = StreamingTransformer(c.temporal)
        self.out_norm = make_norm("rms_norm_f32", c.dim)
        self.depformer_in = nn.ModuleList(nn.Linear(c.dim, c.depformer_dim, bias=False) for _ in range(c.dep_q))
        self.depformer_emb = nn.ModuleList(ScaledEmbedding(c.card + 1, c.depformer_dim) for _ in range(c.dep_q - 1))
        self.depformer_text_emb = ScaledEmbedding(c.text_card + 1, c.depformer_dim)
        self.depformer = Depformer(c.depth)
        self.linears = nn.ModuleList(nn.Linear(c.depformer_dim, c.card, bias=False) for _ in range(c.dep_q))

    def new_cache(self, rows: int, dtype, device, scratch: bool = False) -> KVCache:
        return self.transformer.new_cache(rows, dtype, device, scratch)

    def forward_text(self, tokens: torch.Tensor, cache: KVCache, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, 1 + n_q, 1) -> (temporal output after out_norm (B, 1, dim), text logits (B, 1, text_card))."""
        x = None
        for k, emb in enumerate(self.emb):  # audio streams first, then text: the reference's sum order
            e = emb(tokens[:, 1 + k])
            x = e if x is None else x + e
        x = x + self.text_emb(tokens[:, 0])
        out = self.out_norm(self.transformer(x, cache, rows))
        return out, self.text_linear(out)

    def depformer_logits(self, step: int, previous: torch.Tensor, temporal: torch.Tensor, past: list) -> torch.Tensor:
        """Logits (B, card) of Moshi's codebook ``step`` given the previous token of the step (the
        text token for codebook 0) and the temporal output (B, 1, dim)."""
        emb = self.depformer_text_emb if step == 0 else self.depformer_emb[step - 1]
        x = self.depformer_in[step](temporal) + emb(previous[:, None])
        return self.linears[step](self.depformer(x, step, past))[:, 0]


def lm_names(state: dict[str, torch.Tensor], config: LMConfig) -> dict[str, torch.Tensor]:
    """Any spelling the reference loader accepts -> this module's names: the depth transformer's
    projections cut into its ``dep_q`` steps, the temporal transformer's fused one kept whole."""
    return per_step_names(state, lambda key: config.dep_q if key.startswith("depformer.") else 1)
