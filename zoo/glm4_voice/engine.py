"""The GLM-4-Voice-9B decode loop as a step over a batch of session slots.

transformers' ``GlmForCausalLM`` holds the weights (loaded through the key map in ``llm.py``);
this module runs its layers itself over zoo.core.kv_cache, whose rows are session slots,
so many sessions at different lengths decode in one batched forward, join (prefill) and leave
between steps. The arithmetic is the layers' own: their norms, projections, MLP and transformers'
GLM rotary embedding; only the attention is the zoo's ``attend`` over the slot cache (tested equal to
``GlmForCausalLM.forward``)."""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

from ..core.devices import to_device
from ..core.graphs import DecodeGraphs
from ..core.kv_cache import KVCache, Rows, at_ends, attend, padded_ends


class SlotEngine:
    """Session slots are rows of one zoo.core.kv_cache.KVCache; ``prefill`` appends to a slot's
    context (multi-turn), ``step`` decodes one token for many slots at once."""

    def __init__(self, model: nn.Module, slots: int, max_len: int | None = None, *,
                 graphs: bool | None = None, buckets: bool | None = None) -> None:
        config = model.config
        self.model, self.config = model, config
        self.max_len = max_len or config.max_position_embeddings
        weight = model.model.embed_tokens.weight
        cuda = weight.device.type == "cuda"
        padded = cuda if graphs is None and buckets is None else bool(graphs or buckets)
        self.cache = KVCache(config.num_hidden_layers, slots, config.num_key_value_heads, self.max_len,
                             config.head_dim, weight.dtype, weight.device, scratch=padded)
        # decode steps replay CUDA graphs on a GPU (zoo.core.graphs: one per batch bucket and width):
        # a 9B model's ~1800 kernel launches per token cost more host time than the GPU's weight reads
        self.graphs = DecodeGraphs(self.decode, pad_row=self.cache.scratch, max_len=self.max_len,
                                   device=weight.device, capture=graphs, buckets=buckets)

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def free_rows(self) -> list[int]:
        return self.cache.free_rows

    def acquire(self) -> int:
        return self.cache.allocate()[0]

    def release(self, slot: int) -> None:
        self.cache.release([slot])

    def room(self, slot: int) -> int:
        return self.cache.room(slot)

    def check_room(self, slot: int, new: int) -> None:
        """Raises ValueError when ``new`` more positions do not fit the slot's context."""
        if new > self.room(slot):
            raise ValueError(f"the conversation needs {new} more positions; {self.room(slot)} are left "
                             f"of the model's {self.max_len}")

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Append ``ids`` to the slot's context; returns the logits after the last one (vocab,)."""
        return self.prefill_many([slot], [ids])[0]

    @torch.inference_mode()
    def prefill_many(self, slots: list[int], ids_lists: list[list[int]]) -> torch.Tensor:
        """Append each slot's ids to its context (a slot may hold earlier turns); returns the
        logits after each slot's last id (len(slots), vocab). The slots share one forward, their
        ids right-padded to the longest, so a burst of arrivals costs about one prefill. Raises
        ValueError, before writing anything, when a slot's own ids do not fit its room."""
        for slot, ids in zip(slots, ids_lists):
            self.check_room(slot, len(ids))
        # padding to the longest must not run a slot with history past the context: such a slot
        # (rare: a conversation near the limit) gets a forward of its own, unpadded
        longest = max(len(ids) for ids in ids_lists)
        together = [i for i, slot in enumerate(slots) if self.room(slot) >= longest]
        groups = [together] + [[i] for i in range(len(slots)) if i not in together]
        logits = [None] * len(slots)
        for group in groups:
            rows = self._prefill([slots[i] for i in group], [ids_lists[i] for i in group])
            for i, row in zip(group, rows):
                logits[i] = row
        return torch.stack(logits)

    def _prefill(self, slots: list[int], ids_lists: list[list[int]]) -> torch.Tensor:
        """One forward over the slots' ids, right-padded to the longest: a slot's padding lands in
        its cache beyond its length, where later steps overwrite it before any mask lets them
        read it (the padding id is arbitrary for the same reason)."""
        lengths = [len(ids) for ids in ids_lists]
        longest = max(lengths)
        tokens = torch.tensor([ids + [0] * (longest - len(ids)) for ids in ids_lists])
        logits = self.decode(to_device(tokens, self.device), self.cache.rows_for(slots, longest),
                             padded_ends(lengths, self.device))
        for slot, length in zip(slots, lengths):
            self.cache.advance([slot], length)
        return logits

    @torch.inference_mode()
    def step(self, slots: list[int], ids: torch.Tensor) -> torch.Tensor:
        """One new token per slot: ids (B,) -> logits (B, vocab)."""
        for slot in slots:
            if self.room(slot) < 1:
                raise ValueError(f"slot {slot} is at the model's context limit ({self.max_len})")
        tokens = to_device(ids.view(-1, 1), self.device)  # no stall behind the queued kernels
        logits = self.graphs(tokens, slots, [self.cache.lengths[s] for s in slots])
        self.cache.advance(slots, 1)
        return logits

    def decode(self, tokens: torch.Tensor, rows: Rows, ends: torch.Tensor | None = None) -> torch.Tensor:
        """The layers over ``tokens`` (B, T) at ``rows`` as tensor operations only (no host reads,
        so a CUDA graph can capture a step) -> the logits of each row's last position (B, vocab):
        ``ends`` (B,) where rows are right-padded (zoo.core.kv_cache.padded_ends), else T - 1."""
        model = self.model
        batch, new = tokens.shape
        x = model.model.embed_tokens(tokens)
        cos, sin = model.model.rotary_emb(x, rows.positions)
        for index, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out = attend(q, k, v, self.cache.k[index], self.cache.v[index], rows)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, new, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(model.model.norm(at_ends(x, ends)))
