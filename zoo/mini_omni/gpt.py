"""Mini-Omni's LLM: Qwen2-0.5B in litgpt form, with the published tensor names as attribute names
(so ``lit_model.pth`` loads unchanged), written for batched, per-row KV-cached decoding over zoo.core.kv_cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core import kv_cache
from ..core.kv_cache import Rows, attend
from ..core.quantize import QUANTIZED, is_plain_linear, quantize_linears, split_dtype
from .config import GPTConfig
from .tokens import AUDIO_LAYERS, PADDED_AUDIO_VOCAB, PADDED_TEXT_VOCAB


def precision(dtype: torch.dtype | str | None) -> tuple[torch.dtype, str | None]:
    """``dtype`` -> (compute dtype, quantisation or None). "int8" / "int4": the transformer
    layers' weights packed (``GPT.placed``) with bfloat16 activations, the kernels' fast input; the
    embeddings, the output head, the adapters and the other networks in bfloat16."""
    return split_dtype(dtype, QUANTIZED, torch.float32, quantized_compute=torch.bfloat16)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # litgpt normalises in float32 for low-precision inputs; float64 stays float64.
        compute = torch.promote_types(x.dtype, torch.float32)
        y = x if x.dtype == compute else x.to(compute)  # no cast (a dispatch each) when none is needed
        y = y * torch.rsqrt(torch.mean(y * y, dim=-1, keepdim=True) + self.eps)
        return (y if y.dtype == x.dtype else y.to(x.dtype)) * self.weight


class GatedMLP(nn.Module):
    """litgpt's LLaMAMLP (and Mini-Omni's whisperMLP): proj(silu(fc_1 x) * fc_2 x)."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(n_in, n_hidden, bias=bias)
        self.fc_2 = nn.Linear(n_in, n_hidden, bias=bias)
        self.proj = nn.Linear(n_hidden, n_out, bias=bias)
        self.fused_t: torch.Tensor | None = None

    @torch.no_grad()
    def pack(self) -> None:
        """Hold fc_1 and fc_2 as the two column blocks of one (n_in, 2 * n_hidden) matrix and
        multiply once: at decode batch sizes MKL runs this layout about twice as fast as two
        (out, in) products. The parameters become views into it, so names, values and memory stay
        the same. Call after the module has reached its final device and dtype. Quantised layers
        (zoo.core.quantize) keep their own layout."""
        if not (is_plain_linear(self.fc_1) and is_plain_linear(self.fc_2)):
            return
        fused = torch.cat([self.fc_1.weight, self.fc_2.weight]).t().contiguous()
        hidden = self.fc_1.out_features
        self.fc_1.weight = nn.Parameter(fused[:, :hidden].t(), requires_grad=False)
        self.fc_2.weight = nn.Parameter(fused[:, hidden:].t(), requires_grad=False)
        self.fused_t = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_t is None or self.fused_t.device != x.device or self.fc_1.bias is not None:
            return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))
        gate, up = (x @ self.fused_t).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class KVCache(kv_cache.KVCache):
    """The zoo's cache (zoo.core.kv_cache) shaped for a GPTConfig: one row per sequence, stored per
    KV group (not expanded to every query head as litgpt does)."""

    def __init__(self, config: GPTConfig, rows: int, max_len: int, dtype, device, scratch: bool = False) -> None:
        super().__init__(config.n_layer, rows, config.n_query_groups, max_len, config.head_size, dtype, device,
                         scratch=scratch)


def as_rows(rows: Rows | torch.Tensor, positions: torch.Tensor | None) -> Rows:
    """The engine passes ``Rows``; direct callers may pass a row tensor and the (B, T) positions of
    their tokens (read back to the host once, to build the ``Rows``)."""
    if isinstance(rows, Rows):
        return rows
    return Rows.make(rows.tolist(), positions[:, 0].tolist(), positions.size(1), positions.device)


def rope_tables(config: GPTConfig, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (block_size, rope_n_elem), computed in float32 like litgpt's
    build_rope_cache, then cast (so float64 runs see the reference's exact angles)."""
    n = config.rope_n_elem
    theta = 1.0 / (config.rope_base ** (torch.arange(0, n, 2, device=device).float() / n))
    positions = torch.arange(config.block_size, device=device).float()
    angles = torch.outer(positions, theta).repeat(1, 2)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        qkv_rows = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.attn = nn.Linear(config.n_embd, qkv_rows, bias=config.add_qkv_bias)
        self.proj = nn.Linear(config.head_size * config.n_head, config.n_embd, bias=config.bias)

    def forward(self, x, cos, sin, cache_k, cache_v, rows, positions=None):
        """x (B, T, C); cos/sin (B, T, n_elem); cache_k/v (rows_total, G, max_len, hs) of this
        layer; rows: the cache rows and positions of x's tokens (see ``as_rows``)."""
        c = self.config
        B, T, _ = x.shape
        q_per_kv = c.n_head // c.n_query_groups
        # litgpt's fused rows are interleaved per KV group: [q * q_per_kv, k, v] for each group.
        qkv = self.attn(x).view(B, T, c.n_query_groups, q_per_kv + 2, c.head_size)
        q = qkv[:, :, :, :q_per_kv].reshape(B, T, c.n_head, c.head_size).transpose(1, 2)
        k = qkv[:, :, :, q_per_kv].transpose(1, 2)  # (B, G, T, hs)
        v = qkv[:, :, :, q_per_kv + 1].transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        n = c.rope_n_elem
        if n == c.head_size:  # Qwen2 rotates every dimension: no slices and concatenation (launches)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            q = torch.cat((apply_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
            k = torch.cat((apply_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        y = attend(q, k, v, cache_k, cache_v, as_rows(rows, positions))
        return self.proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_size))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config.n_embd, config.intermediate_size, config.n_embd, config.bias)

    def forward(self, x, cos, sin, cache_k, cache_v, rows: Rows):
        x = x + self.attn(self.norm_1(x), cos, sin, cache_k, cache_v, rows)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Registration order matters for tied weights: load_state_dict copies lm_head.weight and
        # then transformer.wte.weight into the shared tensor, so wte wins, as in the reference.
        self.whisper_adapter = GatedMLP(
            config.whisper_adapter_dim, config.intermediate_size, config.n_embd, config.bias
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def placed(self, device: torch.device, dtype: torch.dtype, quantized: str | None = None) -> GPT:
        """This network on ``device`` in ``dtype`` for inference; ``quantized`` ("int8", see
        ``precision``): its transformer layers' Linear weights packed from their loaded values
        first (zoo.core.quantize), the output head kept (its text and audio slices are read as
        weight rows)."""
        if quantized:
            quantize_linears(self.transformer.h, quantized, dtype, device)
        return self.to(device=device, dtype=dtype).eval()

    def pack(self) -> GPT:
        """Faster weight layouts for inference (see GatedMLP.pack); call after .to(device, dtype)."""
        for module in self.modules():
            if isinstance(module, GatedMLP):
                module.pack()
        return self

    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.transformer.wte.weight
        if self._rope is None or self._rope[0].device != weight.device or self._rope[0].dtype != weight.dtype:
            self._rope = rope_tables(self.config, weight.dtype, weight.device)
        return self._rope

    def embed(self, tokens: torch.Tensor, audio_features: torch.Tensor | None = None, audio_start: int = 1) -> torch.Tensor:
        """tokens (B, 8, T) absolute ids -> (B, T, C): the mean of the 8 stream embeddings.
        ``audio_features`` (B, T_a, whisper_dim) replace the audio streams at positions
        ``audio_start``.. (the text stream keeps its embedding there), as the reference's
        concat_whisper_feat (position 1: right after ``_input_a``)."""
        return self.mean_of_streams(self.stream_embeddings(tokens, audio_features, audio_start))

    def stream_embeddings(self, tokens: torch.Tensor, audio_features: torch.Tensor | None = None,
                          audio_start: int = 1) -> torch.Tensor:
        """(B, 8, T, C): each stream's embeddings, the adapted audio features in place."""
        emb = self.transformer.wte(tokens)
        if audio_features is not None:
            self.place(emb, self.whisper_adapter(audio_features.to(emb.dtype)), audio_start)
        return emb

    @staticmethod
    def place(emb: torch.Tensor, adapted: torch.Tensor, start: int) -> None:
        """Adapter outputs (B, n, C) replace the 7 audio streams' embeddings at start..start+n-1."""
        emb[:, :AUDIO_LAYERS, start : start + adapted.size(1)] = adapted.unsqueeze(1)

    @staticmethod
    def mean_of_streams(emb: torch.Tensor) -> torch.Tensor:
        x = emb[:, 0]
        for stream in range(1, emb.size(1)):  # summed in the reference's order
            x = x + emb[:, stream]
        return x / emb.size(1)

    def forward(self, x: torch.Tensor, cache: kv_cache.KVCache, rows: Rows | torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) embeddings at ``rows`` (see ``as_rows``) -> final-normed hidden states (B, T, C)."""
        rows = as_rows(rows, positions)
        cos_table, sin_table = self.rope()
        cos, sin = cos_table[rows.positions], sin_table[rows.positions]
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, cache.k[i], cache.v[i], rows)
        return self.transformer.ln_f(x)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., 152000): the text slice of lm_head, computed alone."""
        return F.linear(hidden, self.lm_head.weight[:PADDED_TEXT_VOCAB])

    def audio_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., 7, 4160): the 7 audio-layer slices of lm_head."""
        end = PADDED_TEXT_VOCAB + AUDIO_LAYERS * PADDED_AUDIO_VOCAB
        logits = F.linear(hidden, self.lm_head.weight[PADDED_TEXT_VOCAB:end])
        return logits.unflatten(-1, (AUDIO_LAYERS, PADDED_AUDIO_VOCAB))
