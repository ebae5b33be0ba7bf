"""Hertz-dev's ``respond()``: a half-duplex continuation of the user's audio, batched over session
slots for zoo.core.scheduler (``ReplyStepper``); one ``Reply`` per request."""
from __future__ import annotations

import numpy as np
import torch

from ..core.admission import part_end
from ..core.audio import AudioSource
from ..core.devices import to_device
from ..core.isolation import admit_each
from ..core.types import Chunk
from .codec import StreamState, sample_posterior
from .engine import Engine, Slot
from .options import HertzOptions
from .transformer import MAIN_CONTEXT


class Reply:
    """One continuation being generated (a zoo.core.scheduler Job). After (or while) streaming,
    ``prompt_latents`` (1, P, 32) and ``latents`` (list of (32,) tensors) hold what was fed and
    generated, ``tokens`` the sampled FSQ indices."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor, options: HertzOptions) -> None:
        self.mu, self.logvar, self.options = mu, logvar, options
        self.variant = "ablation" if options.pure_audio_ablation else "mono"
        self.max_frames = options.max_new_tokens
        self.prompt_latents: torch.Tensor | None = None
        self.prefilled = 0  # prompt latents in its slot's caches (chunked prefill)
        self.latents: list[torch.Tensor] = []
        self.pending: list[np.ndarray] = []
        self.slot: Slot | None = None
        self._error: Exception | None = None
        self.done = False

    @property
    def tokens(self) -> list[int]:
        return [t[0] for t in self.slot.tokens] if self.slot is not None else []

    @property
    def error(self) -> Exception | None:
        """Its own (it could not start) or its slot's (its share of a step failed)."""
        return self._error or (self.slot.error if self.slot is not None else None)

    @error.setter
    def error(self, error: Exception | None) -> None:
        self._error = error

    def poll(self) -> Chunk | None:
        if not self.pending:
            return None
        audio, self.pending = np.concatenate(self.pending), []
        return Chunk(audio=audio)


class ReplyStepper:
    """Batched ``respond()`` for zoo.core.scheduler: one engine (KV caches for ``max_sessions``)
    and one streaming-decoder bank per network set of ``model`` (a HertzDev), built when first
    needed."""

    def __init__(self, model, max_sessions: int, context: int = MAIN_CONTEXT) -> None:
        self.model, self.max_sessions, self.context = model, max_sessions, context
        self.engines: dict[str, tuple[Engine, StreamState]] = {}
        self.decoding = model.codec.streaming_decoder

    def _engine(self, variant: str):
        if variant not in self.engines:
            main, resynth = self.model.networks(variant)
            engine = Engine(main, resynth, self.model.quantizer, self.max_sessions, main_context=self.context,
                            resynth_context=self.context, out_channels=(0,), record_tokens=1 << 16)
            self.engines[variant] = (engine, self.decoding.new_state(self.max_sessions))
        return self.engines[variant]

    def prepare(self, audio: AudioSource, sample_rate: int | None, options, history=None) -> Reply:
        """``history`` is not used: Hertz-dev continues the audio it is given. Loads the networks
        of the reply's set if needed (e.g. ``pure_audio_ablation``'s): prepare runs off the
        scheduler thread, so loading stalls no other session; ``start`` then only builds caches."""
        job = self.model.start_reply(audio, sample_rate, options)
        self.model.networks(job.variant)
        return job

    @torch.inference_mode()
    def start(self, job: Reply) -> None:
        """Prefill the prompt, seed the streaming decoder with its last latents, emit frame 1."""
        self._open(job)
        self._prefill([job])

    @torch.inference_mode()
    def start_many(self, jobs: list[Reply]) -> None:
        """zoo.core.types.BatchStarter: ``start`` for several arrivals, those of one network set
        and prompt length prefilled in one forward. A job that cannot start gets its own error."""
        groups: dict[tuple[str, int], list[Reply]] = {}
        for job in admit_each(jobs, self._open):
            groups.setdefault((job.variant, job.prompt_latents.size(1)), []).append(job)
        for group in groups.values():
            self._prefill(group)

    def prompt_length(self, job: Reply) -> int:
        return job.mu.size(1)

    @torch.inference_mode()
    def start_part(self, job: Reply, positions: int) -> bool:
        """zoo.core.types.ChunkedStarter: the next ``positions`` prompt latents into the job's slot
        (``Engine.extend``); the last part is prefilled as ``start`` prefills a whole prompt, and
        draws the first frame."""
        end = part_end(job.prefilled, positions, self.prompt_length(job))
        if job.slot is None:
            self._open(job)
        if end < self.prompt_length(job):
            engine, _ = self._engine(job.variant)
            engine.extend(job.slot, job.prompt_latents[:, job.prefilled : end], job.prompt_latents[:, end : end + 1])
            job.prefilled = end
            return False
        self._prefill([job], start=job.prefilled)
        return True

    def _open(self, job: Reply) -> None:
        """A slot for the job and its prompt's latents, refused here (for this job alone) when they
        do not fit the context."""
        engine, _ = self._engine(job.variant)
        job.slot = engine.open(job.options)
        engine.check_prompt(job.mu.size(1))
        job.prompt_latents = job.mu if job.slot.deterministic else \
            sample_posterior(job.mu, job.logvar, job.slot.generator)

    def _prefill(self, jobs: list[Reply], start: int = 0) -> None:
        """Jobs of one network set and prompt length: their prompts from latent ``start`` on (the
        last part of a chunked prefill) in one forward per network."""
        engine, decoder = self._engine(jobs[0].variant)
        z = torch.cat([job.prompt_latents for job in jobs])
        nxt = engine.advance([job.slot for job in jobs], z[:, start:])
        for job in jobs:
            job.prefilled = z.size(1)
        rows = to_device([job.slot.row for job in jobs], engine.device)
        self.decoding.reset(decoder, rows=rows)
        self.decoding.step(decoder, z[:, -self.model.codec.decoder_context():], rows=rows)  # left context only
        self._emit(jobs, rows, nxt)

    @torch.inference_mode()
    def step(self, jobs: list[Reply]) -> None:
        for variant in {j.variant for j in jobs}:
            group = [j for j in jobs if j.variant == variant and not j.done]
            if group:
                engine, _ = self._engine(variant)
                last = torch.stack([j.latents[-1] for j in group])[:, None]
                rows = to_device([j.slot.row for j in group], engine.device)
                self._emit(group, rows, engine.advance([j.slot for j in group], last))

    def _emit(self, jobs: list[Reply], rows: torch.Tensor, nxt: torch.Tensor) -> None:
        """Jobs of one network set: their next latents ``nxt`` decoded (decoder ``rows``) and kept."""
        _, decoder = self._engine(jobs[0].variant)
        audio = self.decoding.step(decoder, nxt, rows=rows)[:, 0]
        out = audio.float().clamp(-1, 1).cpu().numpy()
        for job, z, a in zip(jobs, nxt[:, 0], out):
            if job.error is not None:  # its draw failed in this step: this frame is not its output
                job.done = True
                continue
            job.latents.append(z)
            job.pending.append(a)
            if len(job.latents) >= job.max_frames:
                job.done = True

    def release(self, job: Reply) -> None:
        if job.slot is not None and job.variant in self.engines:
            self.engines[job.variant][0].close(job.slot)
        job.done = True
