"""Moshi's streaming generation over session rows: the reference's ``LMGen.step`` (moshi/models/
lm.py) for a batch of sessions, each at its own step.

Per session a small ring of tokens (17 streams x (max delay + 2) steps) realises the acoustic
delays: the user's codes are written where the delayed streams will read them, each step's input
is read at the session's offset (the initial tokens while ``offset <= delay``), and the step's
text and Moshi tokens are written one step ahead. The output of step t (from t = max delay on)
aligns each stream by its delay: text and semantic tokens of step t - 1 with acoustic tokens of
step t. Before that a step outputs nothing (the first 80 ms: the acoustic delay).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.graphs import DecodeGraphs
from ..core.kv_cache import KVCache
from ..core.sampling import Sampling, UnusableLogits, is_zero_temperature, sample_rows
from .lm import MoshiLM
from .options import MoshiOptions

UNGENERATED = -2


@dataclass
class Draw:
    """How one session samples: its options and its own generator (never the global RNG)."""

    options: MoshiOptions
    generator: torch.Generator | None
    error: Exception | None = None  # this session's own draw failed: it ends, the others go on

    def sampling(self, text: bool) -> Sampling:
        """How the text or the audio codebooks draw; greedy (0) for every stream at
        ``temperature`` 0, and for a session whose draw failed (placeholder tokens)."""
        o = self.options
        temperature = o.text_temperature if text else o.temperature
        if self.error is not None or is_zero_temperature(o.temperature):
            temperature = 0.0
        return Sampling(temperature, o.text_top_k if text else o.top_k, o.top_p, self.generator)


def pick(logits: torch.Tensor, draws: Sequence[Draw], text: bool, unusable: torch.Tensor) -> torch.Tensor:
    """logits (B, vocab) -> (B,), every session's draw in one pass (float32 logits, as the
    reference). ``unusable`` (B,) gathers on the device, without a host sync, the rows whose
    logits no draw can use: Generator.step fails those sessions."""
    tokens, bad = sample_rows(logits, [d.sampling(text) for d in draws])
    unusable |= bad
    return tokens


class LMState:
    """Token rings, host-known offsets and the temporal KV cache for ``rows`` session rows, with
    the shared decode-step mechanism over it (``graphs``: zoo.core.graphs.DecodeGraphs, the cache
    as a ring; ``graphs``/``buckets`` as the other engines take them: None, CUDA graphs on CUDA)."""

    def __init__(self, lm: MoshiLM, rows: int, dtype, device, *, graphs: bool | None = None,
                 buckets: bool | None = None) -> None:
        c = lm.config
        self.depth = max(c.delays) + 2
        self.tokens = torch.full((rows, c.n_q + 1, self.depth), UNGENERATED, dtype=torch.long, device=device)
        self.offsets = [0] * rows
        self.cache: KVCache = lm.new_cache(rows, dtype, device, scratch=True)
        context = lm.config.context
        self.graphs = DecodeGraphs(lambda tokens, rows: lm.forward_text(tokens, self.cache, rows),
                                   pad_row=self.cache.scratch, max_len=context, ring_context=context,
                                   device=device, capture=graphs, buckets=buckets)

    def reset(self, rows: Sequence[int]) -> None:
        for r in rows:
            self.offsets[r] = 0
            self.cache.lengths[r] = 0
            self.tokens[r] = UNGENERATED

    def nbytes(self) -> int:
        return self.cache.nbytes() + self.tokens.numel() * self.tokens.element_size()


class Generator:
    def __init__(self, lm: MoshiLM) -> None:
        self.lm = lm
        c = lm.config
        self.delays = list(c.delays)
        self.max_delay = max(c.delays)
        initial = [c.text_card] + [c.card] * c.n_q
        self.initial = torch.tensor(initial, dtype=torch.long)

    @torch.no_grad()
    def step(self, state: LMState, rows: Sequence[int], user_codes: torch.Tensor,
             draws: Sequence[Draw]) -> list[torch.Tensor | None]:
        """user_codes (B, n_q - dep_q) for session rows ``rows`` -> per row None (the first
        ``max_delay`` steps) or the step's output (1 + dep_q,): text token, Moshi's codebooks."""
        c, ring = self.lm.config, state.depth
        device = state.tokens.device
        offsets = [state.offsets[r] for r in rows]
        user = user_codes[:, : c.n_q - c.dep_q].to(device)
        # the user's codes go where their delayed streams will read them
        for i, (r, t) in enumerate(zip(rows, offsets)):
            for k in range(c.n_q - c.dep_q):
                stream = c.dep_q + 1 + k
                state.tokens[r, stream, (t + self.delays[stream]) % ring] = user[i, k]
        inputs = torch.stack([state.tokens[r, :, t % ring] for r, t in zip(rows, offsets)])  # (B, 1 + n_q)
        initial = self.initial.to(device)
        is_init = torch.tensor([[t <= d for d in self.delays] for t in offsets], device=device)
        inputs = torch.where(is_init, initial, inputs)
        temporal, text_logits = state.graphs(inputs[:, :, None], list(rows), [state.cache.lengths[r] for r in rows])
        state.cache.advance(rows, 1)
        unusable = torch.zeros(len(rows), dtype=torch.bool, device=device)
        text = pick(text_logits[:, 0], draws, True, unusable)
        audio = self._depformer(text, temporal, draws, unusable)
        for draw, bad in zip(draws, unusable.tolist()):  # the step's one host sync of the draws
            if bad and draw.error is None:
                draw.error = UnusableLogits()
        outs: list[torch.Tensor | None] = []
        for i, (r, t) in enumerate(zip(rows, offsets)):
            t += 1
            state.offsets[r] = t
            state.tokens[r, 0, t % ring] = text[i]
            state.tokens[r, 1: c.dep_q + 1, t % ring] = audio[i]
            if t <= self.max_delay:
                outs.append(None)
                continue
            slots = [(t - self.max_delay + d) % ring for d in self.delays[: c.dep_q + 1]]
            outs.append(state.tokens[r, torch.arange(c.dep_q + 1, device=device), torch.tensor(slots, device=device)])
        return outs

    def _depformer(self, text: torch.Tensor, temporal: torch.Tensor, draws: Sequence[Draw],
                   unusable: torch.Tensor) -> torch.Tensor:
        """Moshi's codebooks of this step, one after the other (B, dep_q)."""
        lm = self.lm
        past = [[] for _ in lm.depformer.layers]
        previous, tokens = text, []
        for step in range(lm.config.dep_q):
            logits = lm.depformer_logits(step, previous, temporal, past)
            previous = pick(logits, draws, False, unusable)
            tokens.append(previous)
        return torch.stack(tokens, dim=1)
