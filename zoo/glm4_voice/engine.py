"""The GLM-4-Voice-9B decode loop as a step over a batch of session slots.

transformers' ``GlmForCausalLM`` holds the weights (loaded through the key map in ``llm.py``);
this module runs its layers itself with one preallocated KV cache whose rows are session slots,
so many sessions at different lengths decode in one batched forward, join (prefill) and leave
between steps. The arithmetic is the layers' own: their norms, projections, MLP and transformers'
GLM rotary embedding; only the attention is written here, over the slot cache (tested equal to
``GlmForCausalLM.forward``)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb


class SlotCache:
    """K and V for every layer: (slots + 1, kv_heads, max_len, head_dim), and each slot's length.
    The extra last row is scratch space that CUDA-graph captures write into instead of a live slot."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        shape = (layers, slots + 1, kv_heads, max_len, head_dim)
        self.scratch = slots
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
        # decode steps replay CUDA graphs on a GPU (one per batch size and width): a 9B model's
        # ~1800 kernel launches per token cost more host time than the GPU's weight reads
        self.graphs: dict[tuple[int, int], tuple] | None = {} if weight.device.type == "cuda" else None

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
        start, new = self.cache.lengths[slot], len(ids)
        positions = torch.arange(start, start + new, device=self.device)[None]
        keys, values = self.cache.k[:, slot : slot + 1], self.cache.v[:, slot : slot + 1]
        causal = torch.arange(start + new, device=self.device)[None, :] <= positions[0, :, None]

        def attend(index, q, k, v):
            keys[index, :, :, start : start + new] = k
            values[index, :, :, start : start + new] = v
            return F.scaled_dot_product_attention(q, keys[index, :, :, : start + new], values[index, :, :, : start + new],
                                                  attn_mask=causal, enable_gqa=True)

        logits = self._forward(torch.tensor([ids], device=self.device), positions, attend)
        self.cache.lengths[slot] += new
        return logits[0]

    @torch.inference_mode()
    def step(self, slots: list[int], ids: torch.Tensor) -> torch.Tensor:
        """One new token per slot: ids (B,) -> logits (B, vocab)."""
        for slot in slots:
            if self.room(slot) < 1:
                raise ValueError(f"slot {slot} is at the model's context limit ({self.max_len})")
        rows = torch.tensor(slots, device=self.device)
        lengths = torch.tensor([self.cache.lengths[s] for s in slots], device=self.device)
        tokens = ids.view(-1, 1).to(self.device)
        if self.graphs is None:
            logits = self.decode(tokens, rows, lengths, self.width(slots))
        else:
            logits = self.replay(tokens, rows, lengths, self.width(slots))
        for slot in slots:
            self.cache.lengths[slot] += 1
        return logits

    def width(self, slots: list[int]) -> int:
        """Cache positions a step reads: the longest slot's length + 1, rounded up to a power of
        two (at least 256) so that few shapes occur (each is one CUDA graph)."""
        needed = max(self.cache.lengths[s] for s in slots) + 1
        return min(self.max_len, max(256, 1 << (needed - 1).bit_length()))

    def replay(self, tokens: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
        key = (len(rows), width)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(*key)
            except RuntimeError as err:  # e.g. a quantised layer that syncs with the host
                warnings.warn(f"CUDA graph capture failed ({err}); decoding without graphs")
                self.graphs = None
                return self.decode(tokens, rows, lengths, width)
        graph, inputs, logits = self.graphs[key]
        for static, value in zip(inputs, (tokens, rows, lengths)):
            static.copy_(value)
        graph.replay()
        return logits.clone()  # the next replay overwrites the static output

    def _capture(self, batch: int, width: int) -> tuple:
        """Record ``decode`` for this shape; warm-up and capture write only the scratch row."""
        inputs = (torch.zeros(batch, 1, dtype=torch.long, device=self.device),
                  torch.full((batch,), self.cache.scratch, dtype=torch.long, device=self.device),
                  torch.zeros(batch, dtype=torch.long, device=self.device))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.decode(*inputs, width)  # allocations and lazy initialisations happen outside the graph
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.decode(*inputs, width)
        return graph, inputs, logits

    def decode(self, tokens: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """The step as tensor operations only (no host reads), so a CUDA graph can capture it:
        tokens (B, 1) of slots ``rows`` at positions ``lengths`` -> logits (B, vocab). Reads
        ``width`` cache positions; those at or beyond a slot's position are masked."""
        positions = lengths[:, None]
        visible = (torch.arange(width, device=self.device)[None, :] <= positions)[:, None, None, :]
        cache = self.cache

        def attend(index, q, k, v):
            keys, values = cache.k[index], cache.v[index]
            keys[rows[:, None], :, positions] = k.transpose(1, 2)
            values[rows[:, None], :, positions] = v.transpose(1, 2)
            return F.scaled_dot_product_attention(q, keys[:, :, :width].index_select(0, rows),
                                                  values[:, :, :width].index_select(0, rows),
                                                  attn_mask=visible, enable_gqa=True)

        return self._forward(tokens, positions, attend)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The layers with ``attend(layer_index, q, k, v)`` writing and reading the cache; returns
        the logits of the last position (B, vocab)."""
        model = self.model
        batch, new = tokens.shape
        x = model.model.embed_tokens(tokens)
        cos, sin = model.model.rotary_emb(x, positions)
        for index, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out = attend(index, q, k, v)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, new, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(model.model.norm(x[:, -1]))
