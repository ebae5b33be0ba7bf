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
from functools import partial

import torch

from ..core.devices import to_device
from ..core.graphs import DecodeGraphs, ShapeGraphs
from ..core.kv_cache import KVCache
from ..core.sampling import Plan, Sampling, UnusableLogits, draw_noise, is_zero_temperature, race, sample_rows
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
        # the depth transformer's dep_q codebook steps with their draws, one CUDA graph per batch
        # size on a GPU (each step samples the next one's input: eagerly, hundreds of launches)
        self.depformer = ShapeGraphs(partial(codebooks, lm), device=device, capture=graphs)

    def reset(self, rows: Sequence[int]) -> None:
        for r in rows:
            self.offsets[r] = 0
            self.cache.lengths[r] = 0
            self.tokens[r] = UNGENERATED

    def nbytes(self) -> int:
        return self.cache.nbytes() + self.tokens.numel() * self.tokens.element_size()


class Generator:
    """``step`` indexes every session's token ring at once: a handful of kernels per step whatever
    the batch (one write per session and stream would be hundreds of launches on a GPU), with the
    rows and offsets uploaded in one pinned copy and the streams' constants kept on the device."""

    def __init__(self, lm: MoshiLM) -> None:
        self.lm = lm
        c = lm.config
        self.max_delay = max(c.delays)
        device = lm.text_emb.weight.device
        self.delays = torch.tensor(c.delays, device=device)  # per stream: text, Moshi's dep_q, the user's
        self.initial = torch.tensor([c.text_card] + [c.card] * c.n_q, device=device)
        self.streams = torch.arange(c.n_q + 1, device=device)
        self.moshi = self.streams[: c.dep_q + 1]  # text and Moshi's codebooks
        self.user = self.streams[c.dep_q + 1:]

    @torch.no_grad()
    def step(self, state: LMState, rows: Sequence[int], user_codes: torch.Tensor,
             draws: Sequence[Draw]) -> list[torch.Tensor | None]:
        """user_codes (B, n_q - dep_q) for session rows ``rows`` -> per row None (the first
        ``max_delay`` steps) or the step's output (1 + dep_q,): text token, Moshi's codebooks."""
        c, ring = self.lm.config, state.depth
        offsets = [state.offsets[r] for r in rows]
        row, t = to_device([list(rows), offsets], state.tokens.device)
        row = row[:, None]
        # the user's codes go where their delayed streams will read them
        user = user_codes[:, : c.n_q - c.dep_q].to(state.tokens.device)
        state.tokens[row, self.user, (t[:, None] + self.delays[self.user]) % ring] = user
        inputs = state.tokens[row, self.streams, (t % ring)[:, None]]  # (B, 1 + n_q)
        inputs = torch.where(t[:, None] <= self.delays, self.initial, inputs)
        temporal, text_logits = state.graphs(inputs[:, :, None], list(rows), [state.cache.lengths[r] for r in rows])
        state.cache.advance(rows, 1)
        unusable = torch.zeros(len(rows), dtype=torch.bool, device=inputs.device)
        text = pick(text_logits[:, 0], draws, True, unusable)
        audio = self._depformer(text, temporal, draws, unusable, state)
        for draw, bad in zip(draws, unusable.tolist()):  # the step's one host sync of the draws
            if bad and draw.error is None:
                draw.error = UnusableLogits()
        t = t + 1
        state.tokens[row, self.moshi, (t % ring)[:, None]] = torch.cat([text[:, None], audio], dim=1)
        # each stream aligned by its delay (rows still within the delay read ring slots of no use)
        out = state.tokens[row, self.moshi, (t[:, None] - self.max_delay + self.delays[self.moshi]) % ring]
        for r in rows:
            state.offsets[r] += 1
        return [out[i] if offset + 1 > self.max_delay else None for i, offset in enumerate(offsets)]

    def _depformer(self, text: torch.Tensor, temporal: torch.Tensor, draws: Sequence[Draw],
                   unusable: torch.Tensor, state: LMState) -> torch.Tensor:
        """Moshi's codebooks of this step (B, dep_q): every session's noise for all of them drawn
        first (one call each), then the codebooks one after the other (``codebooks``)."""
        c = self.lm.config
        sessions = [d.sampling(False) for d in draws]
        plan = Plan.of(sessions, c.card, c.dep_q, text.device)
        noise = draw_noise(sessions, c.dep_q, plan.width, text.device)
        audio, bad = state.depformer(text, temporal, plan.settings, noise, narrow=plan.narrow)
        unusable |= bad
        return audio


def codebooks(lm: MoshiLM, text: torch.Tensor, temporal: torch.Tensor, settings: torch.Tensor, noise: torch.Tensor,
              *, narrow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The depth transformer's codebooks after the text token (B,), given the temporal output
    (B, 1, dim), the draws' settings and noise (zoo.core.sampling.Plan, draw_noise) -> (tokens
    (B, dep_q), unusable (B,)): tensor operations only, so a CUDA graph can capture it."""
    c = lm.config
    past = [[] for _ in lm.depformer.layers]
    previous, tokens, unusable = text, [], torch.zeros_like(text, dtype=torch.bool)
    rows = settings.view(-1, c.dep_q, settings.size(-1))
    for step in range(c.dep_q):
        logits = lm.depformer_logits(step, previous, temporal, past)
        previous, bad = race(logits, rows[:, step], noise[:, step : step + 1], narrow=narrow)
        unusable = unusable | bad
        tokens.append(previous)
    return torch.stack(tokens, dim=1), unusable
