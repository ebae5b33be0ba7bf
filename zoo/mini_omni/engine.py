"""Generation as a step over a batch of session slots. Each session owns one or two KV-cache rows
(the batch trick uses two), its own position and sampling state; sessions join (prefill) and leave
between steps, and one ``step`` advances every active session with a single batched forward."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.admission import part_end
from ..core.devices import to_device
from ..core.graphs import DecodeGraphs
from ..core.isolation import admit_each, isolate
from ..core.kv_cache import Rows, at_ends, padded_ends
from ..core.sampling import Sampling, UnusableLogits, sample_rows
from ..core.types import Options
from .gpt import GPT, KVCache
from .prompts import Task
from .tokens import AUDIO_LAYERS, EOA, EOT, PAD_A, PAD_T, layershift

_PAD_AUDIO_INPUT = [layershift(PAD_A, layer) for layer in range(AUDIO_LAYERS)]


@dataclass
class UnfinishedPrompt:
    """A prompt being prefilled in parts: the embeddings of the rows that run it (``x``: rows, T,
    C; ``rows`` of them, see ``Engine._prompt_rows``) and the positions already in the cache."""

    x: torch.Tensor
    rows: int
    done: int = 0


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
    next_input: torch.Tensor | None = None  # (rows, 8), on the host
    generator: torch.Generator | None = None
    error: Exception | None = None  # its own sampling or bookkeeping failed (then done)
    audio_start: int = 1  # the prompt position of the first audio feature
    image_features: torch.Tensor | None = None  # (1, n, vision_dim): models with vision (gpt.embed)
    unfinished: UnfinishedPrompt | None = None  # a prompt being prefilled in parts (Engine.start_part)

    @property
    def prompt_length(self) -> int:
        return self.prompt.size(-1)


class Engine:
    """``graphs`` / ``buckets``: how decode steps run (zoo.core.graphs.DecodeGraphs; by default
    captured CUDA graphs on a GPU, exact eager steps on CPU). ``share_prefix``: see ``_prefill``."""

    def __init__(self, gpt: GPT, max_rows: int, *, graphs: bool | None = None, buckets: bool | None = None,
                 share_prefix: bool | None = None) -> None:
        self.gpt = gpt
        weight = gpt.transformer.wte.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.share_prefix = self.device.type != "cuda" if share_prefix is None else share_prefix
        padded = self.device.type == "cuda" if graphs is None and buckets is None else bool(graphs or buckets)
        block = gpt.config.block_size
        self.cache = KVCache(gpt.config, max_rows, block, self.dtype, self.device, scratch=padded)
        self.graphs = DecodeGraphs(self._decode, pad_row=self.cache.scratch, max_len=block, device=self.device,
                                   capture=graphs, buckets=buckets)

    @property
    def free_rows(self) -> list[int]:
        return self.cache.free_rows

    # -- joining and leaving ------------------------------------------------------------------
    def start(self, session: Session) -> None:
        """Allocate rows, run the prefill and record output position 0; raises if the session
        cannot start (its prompt does not fit, no free rows)."""
        self._admit(session)
        self._prefill_and_record([session])

    def start_many(self, sessions: list[Session]) -> None:
        """``start`` for several sessions with their prompts in one forward (padded to the
        longest): a burst of arrivals costs about one prefill, not one each. A session that cannot
        start gets its own ``error`` (then done); the others start."""
        admitted = admit_each(sessions, self._admit)
        if admitted:
            self._prefill_and_record(admitted)

    def _admit(self, session: Session) -> None:
        T = session.prompt_length
        if T >= self.gpt.config.block_size:
            raise ValueError(f"prompt of {T} tokens does not fit the {self.gpt.config.block_size}-token context")
        session.rows = self.cache.allocate(session.task.rows)
        session.generator = torch.Generator().manual_seed(int(session.options.seed))

    def start_part(self, session: Session, positions: int) -> bool:
        """The next ``positions`` of the session's prompt into its rows' cache (chunked prefill,
        zoo.core.types.ChunkedStarter); the first call takes its rows and raises as ``start``
        does. True once the whole prompt is in and output position 0 is recorded, as ``start``
        records it. The prompt is embedded once, on the first call (its audio and image features
        land at their positions), and its parts run through the layers in order."""
        end = part_end(session.unfinished.done if session.unfinished else 0, positions, session.prompt_length)
        with torch.inference_mode():
            if session.rows is None:
                self._admit(session)
                first = self._prompt_rows(session)
                session.unfinished = UnfinishedPrompt(self._embed(session, first, session.prompt_length), first)
            part = session.unfinished
            rows = session.rows[: part.rows]
            hidden = self.gpt(part.x[:, part.done : end], self.cache, self.cache.rows_for(rows, end - part.done))
            self.cache.advance(rows, end - part.done)
            part.done = end
            if end < session.prompt_length:
                return False
            session.unfinished = None
            self._record_first([session], self._with_shared_rows([session], [part.rows], hidden[:, -1]))
        return True

    def _prefill_and_record(self, sessions: list[Session]) -> None:
        with torch.inference_mode():
            self._record_first(sessions, self._prefill(sessions))

    def _record_first(self, sessions: list[Session], hidden: torch.Tensor) -> None:
        """Output position 0 of each session from its rows' last prompt position (``hidden``)."""
        for session, pick in zip(sessions, self._sample(sessions, hidden)):
            if pick is not None:
                session.position = session.prompt_length
                with isolate(session):
                    self._record(session, *pick, first=True)
            if session.done:
                self.release(session)

    def _prefill(self, sessions: list[Session]) -> torch.Tensor:
        """Run the prompts through the model; returns the last position's hidden state of every
        session's rows, in order (sum of rows, C). All the prompts go through one forward, right-
        padded to the longest: a row's padding lands in its cache beyond its length, where later
        steps overwrite it before any mask lets them read it."""
        firsts = [self._prompt_rows(s) for s in sessions]
        longest = max(s.prompt_length for s in sessions)
        x = torch.cat([self._embed(s, first, longest) for s, first in zip(sessions, firsts)])
        prefill_rows = [row for s, first in zip(sessions, firsts) for row in s.rows[:first]]
        hidden = self.gpt(x, self.cache, self.cache.rows_for(prefill_rows, longest))
        lengths = [s.prompt_length for s, first in zip(sessions, firsts) for _ in range(first)]
        last = at_ends(hidden, padded_ends(lengths, self.device))
        for s, first in zip(sessions, firsts):
            self.cache.advance(s.rows[:first], s.prompt_length)
        return self._with_shared_rows(sessions, firsts, last)

    def _prompt_rows(self, session: Session) -> int:
        """How many of the session's rows run its prompt. With ``share_prefix`` (the default on
        CPU, where compute is the cost), rows whose prompts differ only in the last token (the
        batch trick's two rows) share the prefix: only the first runs it, and the others get it
        copied (``_with_shared_rows``). On a GPU the host's launches are the cost and every row
        runs the prompt."""
        tokens = session.prompt
        shared = self.share_prefix and session.prompt_length > 1 and all(
            torch.equal(tokens[0, :, :-1], t[:, :-1]) for t in tokens[1:])
        return 1 if shared else tokens.size(0)

    def _with_shared_rows(self, sessions: list[Session], firsts: list[int], last: torch.Tensor) -> torch.Tensor:
        """``last`` (the last prompt position of the rows that ran the prompts) completed with the
        rows that share a prefix: the prefix copied from the first row, then each such row's last
        token run as a single step (causal attention makes this the same computation)."""
        others = [s for s, first in zip(sessions, firsts) if first < s.task.rows]
        if not others:
            return last
        stepped = self._last_token_step(others)
        out, done, taken = [], 0, 0
        for s, first in zip(sessions, firsts):
            out.append(last[done : done + first])
            done += first
            if first < s.task.rows:
                rest = s.task.rows - first
                out.append(stepped[taken : taken + rest])
                taken += rest
        return torch.cat(out)

    def _embed(self, session: Session, first: int, length: int) -> torch.Tensor:
        """The first ``first`` rows of a session's prompt embedded, right-padded to ``length``."""
        tokens = to_device(session.prompt[:first], self.device)
        features = session.features
        if features is not None:
            features = features.to(self.device, self.dtype).expand(first, -1, -1)
        extra = {}
        if session.image_features is not None:  # a model with vision: its gpt.embed takes them
            extra["image_features"] = session.image_features.to(self.device, self.dtype).expand(first, -1, -1)
        x = self.gpt.embed(tokens, features, session.audio_start, **extra)
        pad = length - x.size(1)
        return x if pad == 0 else torch.nn.functional.pad(x, (0, 0, 0, pad))

    def _last_token_step(self, sessions: list[Session]) -> torch.Tensor:
        """The shared-prefix sessions' other rows: the prefix copied from the first row, then
        the last token of every such row in one batched step."""
        rows, x = [], []
        for s in sessions:
            others = s.rows[1:]
            self.cache.copy_prefix(s.rows[0], others, s.prompt_length - 1)
            rows += others
            # the last position is never a feature position (whisper or image features end by T-3)
            x.append(self.gpt.embed(to_device(s.prompt[1:, :, -1:], self.device)))
        hidden = self.gpt(torch.cat(x), self.cache, self.cache.rows_for(rows, 1))[:, 0]
        self.cache.advance(rows, 1)
        return hidden

    def release(self, session: Session) -> None:
        if session.rows is not None:
            self.cache.release(session.rows)
            session.rows = None
        session.unfinished = None
        session.done = True

    # -- one decode step for every active session ---------------------------------------------
    @torch.inference_mode()
    def step(self, sessions: list[Session]) -> None:
        active = [s for s in sessions if not s.done]
        if not active:
            return
        rows = [row for s in active for row in s.rows]
        # built on the host, one asynchronous copy per step (not one blocking copy per session)
        tokens = to_device(torch.cat([s.next_input for s in active]).unsqueeze(-1), self.device)  # (B, 8, 1)
        hidden = self.graphs(tokens, rows, [self.cache.lengths[r] for r in rows])
        self.cache.advance(rows, 1)
        for s, pick in zip(active, self._sample(active, hidden)):
            if pick is not None:
                s.position += 1
                with isolate(s):
                    self._record(s, *pick, first=False)
            if s.done:
                self.release(s)

    def _decode(self, tokens: torch.Tensor, rows: Rows) -> torch.Tensor:
        """(B, 8, 1) ids at ``rows`` -> the hidden state of each (B, C): tensor operations only."""
        return self.gpt(self.gpt.embed(tokens), self.cache, rows)[:, 0]

    # -- per-task sampling and bookkeeping ----------------------------------------------------
    def _sample(self, sessions: list[Session], hidden: torch.Tensor) -> list[tuple[list[int] | None, int] | None]:
        """hidden: the sessions' rows, in order. Each session's text comes from its last row (row 1
        in the batch trick) and its audio from its first row. The logits of all sessions are
        computed in one product per head (the text head alone is 545 MB of fp32 weights) and drawn
        in one pass per head, each session with its own options and generator (text, then its 7
        codebooks); the ids come back to the host in one read. None for a session that failed
        (its logits unusable), which ends alone."""
        firsts, lasts, start = [], [], 0
        for s in sessions:
            firsts.append(start)
            start += s.task.rows
            lasts.append(start - 1)
        speaking = [i for i, s in enumerate(sessions) if s.task.speaks]
        sampling = [Sampling.of(s.options, s.generator) for s in sessions]
        text_ids, text_bad = sample_rows(self.gpt.text_logits(hidden[lasts]), sampling)  # (S, 152000)
        picks, bad = [text_ids], [text_bad]
        if speaking:
            audio_logits = self.gpt.audio_logits(hidden[[firsts[i] for i in speaking]])  # (speaking, 7, vocab)
            audio_ids, audio_bad = sample_rows(audio_logits, [sampling[i] for i in speaking])
            picks.append(audio_ids.flatten())
            bad.append(audio_bad)
        ids = torch.cat(picks + [b.long() for b in bad]).tolist()  # one read back to the host for the batch
        n_text, n_audio = len(sessions), len(speaking) * AUDIO_LAYERS
        text_ids, audio_flat = ids[:n_text], ids[n_text : n_text + n_audio]
        unusable = ids[n_text + n_audio :]  # the sessions', then the speaking sessions' audio
        audio_unusable = dict(zip(speaking, unusable[n_text:]))
        out = []
        for i, s in enumerate(sessions):
            pick = None
            with isolate(s):
                if unusable[i] or audio_unusable.get(i, False):
                    raise UnusableLogits()
                audio = None
                if s.task.speaks:
                    a = speaking.index(i) * AUDIO_LAYERS
                    audio = audio_flat[a : a + AUDIO_LAYERS]
                pick = audio, text_ids[i]
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
        return torch.tensor(rows, dtype=torch.long)  # on the host: ``step`` moves the whole batch at once
