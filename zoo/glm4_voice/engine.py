"""The GLM-4-Voice-9B decode loop as a step over a batch of session slots.

transformers' ``GlmForCausalLM`` holds the weights (loaded through the key map in ``llm.py``);
this module runs its layers itself with one preallocated KV cache whose rows are session slots,
so many sessions at different lengths decode in one batched forward, join (prefill) and leave
between steps. The arithmetic is the layers' own: their norms, projections, MLP and transformers'
GLM rotary embedding; only the attention is written here, over the slot cache (tested equal to
``GlmForCausalLM.forward``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb


class SlotCache:
    """K and V for every layer: (slots, kv_heads, max_len, head_dim), and each slot's length."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * slots
        self.max_len = max_len


class SlotEngine:
    def __init__(self, model: nn.Module, slots: int, max_len: int | None = None) -> None:
        config = model.config
        self.model, self.config = model, config
        self.max_len = max_len or config.max_position_embeddings
        weight = model.model.embed_tokens.weight
        self.cache = SlotCache(config.num_hidden_layers, slots, config.num_key_value_heads, self.max_len,
                               config.head_dim, weight.dtype, weight.device)
        self.free = list(range(slots))[::-1]

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def acquire(self) -> int:
        if not self.free:
            raise RuntimeError("no free session slot")
        slot = self.free.pop()
        self.cache.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
        self.free.append(slot)

    def room(self, slot: int) -> int:
        return self.max_len - self.cache.lengths[slot]

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Append ``ids`` to the slot's context; returns the logits after the last one (vocab,)."""
        if len(ids) > self.room(slot):
            raise ValueError(f"the conversation needs {len(ids)} more positions; {self.room(slot)} are left "
                             f"of the model's {self.max_len}")
        tokens = torch.tensor([ids], device=self.device)
        return self._forward(tokens, [slot])[0, -1]

    @torch.inference_mode()
    def step(self, slots: list[int], ids: torch.Tensor) -> torch.Tensor:
        """One new token per slot: ids (B,) -> logits (B, vocab)."""
        for slot in slots:
            if self.room(slot) < 1:
                raise ValueError(f"slot {slot} is at the model's context limit ({self.max_len})")
        return self._forward(ids.view(-1, 1).to(self.device), slots)[:, -1]

    def _forward(self, tokens: torch.Tensor, slots: list[int]) -> torch.Tensor:
        model, cache = self.model, self.cache
        batch, new = tokens.shape
        lengths = [cache.lengths[s] for s in slots]
        positions = torch.tensor(lengths, device=self.device)[:, None] + torch.arange(new, device=self.device)
        total = max(lengths) + new
        # contiguous slots are read as a view; others are gathered
        rows = slice(slots[0], slots[0] + batch) if slots == list(range(slots[0], slots[0] + batch)) else \
            torch.tensor(slots, device=self.device)
        x = model.model.embed_tokens(tokens)
        cos, sin = model.model.rotary_emb(x, positions)
        if batch == 1 and new == 1:
            mask = None  # one query sees the whole context
        else:  # key j is visible to query i of slot b when j <= length_b + i: causal, and a shorter
            # slot's stale rows beyond its length stay hidden
            visible = torch.arange(total, device=self.device)[None, None, :] <= positions[:, :, None]
            mask = visible[:, None]  # (B, 1, new, total)
        for index, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = cache.k[index], cache.v[index]
            if batch == 1:  # the common single-slot case: a slice write, no scatter
                start = lengths[0]
                keys[slots[0], :, start:start + new] = k[0]
                values[slots[0], :, start:start + new] = v[0]
            else:
                index_rows = torch.tensor(slots, device=self.device)[:, None]
                keys[index_rows, :, positions] = k.transpose(1, 2)
                values[index_rows, :, positions] = v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys[rows, :, :total], values[rows, :, :total],
                                                 attn_mask=mask, enable_gqa=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, new, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        for slot in slots:
            cache.lengths[slot] += new
        return model.lm_head(model.model.norm(x[:, -1:]))
