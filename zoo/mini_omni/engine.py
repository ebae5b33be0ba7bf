"""Generation as a step over a batch of session slots. Each session owns one or two KV-cache rows
(the batch trick uses two), its own position and sampling state; sessions join (prefill) and leave
between steps, and one ``step`` advances every active session with a single batched forward."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.sampling import is_zero_temperature, sample
from ..core.scheduler import isolate
from ..core.types import Options
from .gpt import GPT, KVCache
from .prompts import Task
from .tokens import AUDIO_LAYERS, EOA, EOT, PAD_A, PAD_T, layershift

_PAD_AUDIO_INPUT = [layershift(PAD_A, layer) for layer in range(AUDIO_LAYERS)]


@dataclass
class Session:
    """One reply being generated. ``outputs[p]`` is the step at output position p: 7 audio codes
    (local ids; PAD_A for text-only tasks) and the text id. Position 0 comes from the prefill."""

    task: Task
    prompt: torch.Tensor  # (rows, 8, T) absolute ids
    features: torch.Tensor | None  # (1, T_a, whisper_dim)
    options: Options
    max_outputs: int
    outputs: list[list[int]] = field(default_factory=list)
    done: bool = False
    text_ended: bool = False
    rows: list[int] | None = None  # its KV-cache rows
    position: int = 0
    next_input: torch.Tensor | None = None  # (rows, 8)
    generator: torch.Generator | None = None
    error: Exception | None = None  # its own sampling or bookkeeping failed (then done)
    audio_start: int = 1  # the prompt position of the first audio feature
    image_features: torch.Tensor | None = None  # (1, n, vision_dim): models with vision (gpt.embed)

    @property
    def prompt_length(self) -> int:
        return self.prompt.size(-1)


def _is_greedy(options: Options) -> bool:
    return is_zero_temperature(options.temperature) or options.top_k == 1


class Engine:
    def __init__(self, gpt: GPT, max_rows: int) -> None:
        self.gpt = gpt
        weight = gpt.transformer.wte.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cache = KVCache(gpt.config, max_rows, gpt.config.block_size, self.dtype, self.device)

    @property
    def free_rows(self) -> list[int]:
        return self.cache.free_rows

    # -- joining and leaving ------------------------------------------------------------------
    def start(self, session: Session) -> None:
        """Allocate rows, run the prefill and record output position 0."""
        T = session.prompt_length
        if T >= self.gpt.config.block_size:
            raise ValueError(f"prompt of {T} tokens does not fit the {self.gpt.config.block_size}-token context")
        session.rows = self.cache.allocate(session.task.rows)
        session.generator = torch.Generator().manual_seed(int(session.options.seed))
        with torch.inference_mode():
            hidden = self._prefill(session)
            (pick,) = self._sample([session], hidden)
        if pick is not None:
            session.position = T
            with isolate(session):
                self._record(session, *pick, first=True)
        if session.done:
            self.release(session)

    def _prefill(self, session: Session) -> torch.Tensor:
        """Run the prompt through the model; returns the last position's hidden state per row.
        Rows whose prompts differ only in the last token (the batch trick's two rows) share the
        prefix: it is computed once and copied into the other rows' cache, then each other row
        runs its last token as a single step. Causal attention makes this the same computation."""
        tokens = session.prompt.to(self.device)
        rows, T = session.rows, session.prompt_length
        features = None
        if session.features is not None:
            features = session.features.to(self.device, self.dtype)
        shared = T > 1 and all(torch.equal(tokens[0, :, :-1], t[:, :-1]) for t in tokens[1:])
        first = 1 if shared else tokens.size(0)
        extra = {}
        if session.image_features is not None:  # a model with vision: its gpt.embed takes them
            extra["image_features"] = session.image_features.to(self.device, self.dtype).expand(first, -1, -1)
        x = self.gpt.embed(tokens[:first], None if features is None else features.expand(first, -1, -1),
                           session.audio_start, **extra)
        hidden = self.gpt(x, self.cache, self.cache.rows_for(rows[:first], T))[:, -1]
        self.cache.advance(rows[:first], T)
        if first == tokens.size(0):
            return hidden
        others = rows[first:]
        self.cache.copy_prefix(rows[0], others, T - 1)
        # the last position is never a feature position (whisper or image features end by T-3)
        last = self.gpt.embed(tokens[first:, :, -1:])
        step = self.gpt(last, self.cache, self.cache.rows_for(others, 1))[:, 0]
        self.cache.advance(others, 1)
        return torch.cat([hidden, step])

    def release(self, session: Session) -> None:
        if session.rows is not None:
            self.cache.release(session.rows)
            session.rows = None
        session.done = True

    # -- one decode step for every active session ---------------------------------------------
    @torch.inference_mode()
    def step(self, sessions: list[Session]) -> None:
        active = [s for s in sessions if not s.done]
        if not active:
            return
        rows = [row for s in active for row in s.rows]
        tokens = torch.cat([s.next_input for s in active]).unsqueeze(-1)  # (B, 8, 1)
        hidden = self.gpt(self.gpt.embed(tokens), self.cache, self.cache.rows_for(rows, 1))[:, 0]
        self.cache.advance(rows, 1)
        for s, pick in zip(active, self._sample(active, hidden)):
            if pick is not None:
                s.position += 1
                with isolate(s):
                    self._record(s, *pick, first=False)
            if s.done:
                self.release(s)

    # -- per-task sampling and bookkeeping ----------------------------------------------------
    def _sample(self, sessions: list[Session], hidden: torch.Tensor) -> list[tuple[list[int] | None, int] | None]:
        """hidden: the sessions' rows, in order. Each session's text comes from its last row (row 1
        in the batch trick) and its audio from its first row. The logits of all sessions are
        computed in one product per head (the text head alone is 545 MB of fp32 weights); each
        session draws with its own options, isolated: None for a session whose draw failed."""
        firsts, lasts, start = [], [], 0
        for s in sessions:
            firsts.append(start)
            start += s.task.rows
            lasts.append(start - 1)
        speaking = [i for i, s in enumerate(sessions) if s.task.speaks]
        text_logits = self.gpt.text_logits(hidden[lasts])  # (S, 152000)
        audio_logits = self.gpt.audio_logits(hidden[[firsts[i] for i in speaking]]) if speaking else None
        greedy = [_is_greedy(s.options) for s in sessions]
        text_ids = text_logits.argmax(-1).tolist() if any(greedy) else None
        audio_ids = audio_logits.argmax(-1).tolist() if speaking and any(greedy) else None
        out = []
        for i, s in enumerate(sessions):
            o = s.options
            a = speaking.index(i) if s.task.speaks else None
            pick = None
            with isolate(s):
                if greedy[i]:
                    pick = (audio_ids[a] if a is not None else None), text_ids[i]
                else:
                    text = int(sample(text_logits[i : i + 1], o.temperature, o.top_k, o.top_p, s.generator))
                    audio = sample(audio_logits[a], o.temperature, o.top_k, o.top_p, s.generator).tolist() if a is not None else None
                    pick = audio, text
            out.append(pick)
        return out

    def _record(self, s: Session, audio: list[int] | None, text: int, first: bool) -> None:
        """The reference's stop rules: text-only tasks end at _eot; speaking tasks end when audio
        layer 6 emits _eoa, and after _eot their text is forced to _pad_t. The stopping step is
        not recorded. The prefill's step is always recorded."""
        if not first:
            if not s.task.speaks:
                if text == EOT:
                    s.done = True
                    return
            else:
                if s.text_ended:
                    text = PAD_T
                if audio[-1] == EOA:
                    s.done = True
                    return
                if text == EOT:
                    s.text_ended = True
        codes = audio if audio is not None else [PAD_A] * AUDIO_LAYERS
        s.outputs.append([*codes, text])
        if len(s.outputs) >= s.max_outputs:
            s.done = True
        s.next_input = self._next_input(s, codes, text)

    def _next_input(self, s: Session, codes: list[int], text: int) -> torch.Tensor:
        spoken = [layershift(c, layer) for layer, c in enumerate(codes)] if s.task.speaks else _PAD_AUDIO_INPUT
        rows = [spoken + [text]]
        if s.task.rows == 2:  # the text row listens to padding, not to its own speech
            rows.append(_PAD_AUDIO_INPUT + [text])
        return torch.tensor(rows, dtype=torch.long, device=self.device)
