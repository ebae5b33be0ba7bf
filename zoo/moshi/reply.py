"""Moshi's ``respond()``, the half-duplex contract over its duplex step: the user's audio is fed
frame by frame (the model listening; what it says meanwhile, usually silence, is not part of the
reply), then silence, and the reply is Moshi's audio and text during those silent frames,
``max_new_tokens`` steps of 80 ms. This is what a caller of the reference server hears after
speaking and falling quiet; Moshi has no end-of-turn token, so a reply always runs its length.
Batched over session rows for zoo.core.scheduler (``ReplyStepper``)."""
from __future__ import annotations

import numpy as np
import torch

from ..core.audio import AudioSource, load_audio
from ..core.types import Chunk
from .duplex import DuplexHandle, DuplexStepper
from .mimi import FRAME_SAMPLES, SAMPLE_RATE
from .options import MoshiOptions


class Reply:
    """One reply being generated (a zoo.core.scheduler Job)."""

    def __init__(self, frames: np.ndarray, options: MoshiOptions) -> None:
        self.frames, self.options = frames, options  # (N, 1920) float32, the user's turn
        self.handle: DuplexHandle | None = None
        self.pending: list[Chunk] = []
        self.produced = 0
        self.done = False
        self._error: Exception | None = None

    @property
    def error(self) -> Exception | None:
        return self._error or (self.handle.error if self.handle is not None else None)

    def poll(self) -> Chunk | None:
        if not self.pending:
            return None
        chunks, self.pending = self.pending, []
        return Chunk(audio=np.concatenate([c.audio for c in chunks]), text="".join(c.text for c in chunks))


def prepare_reply(model, audio: AudioSource, sample_rate: int | None, options) -> Reply:
    """Validate the options and turn any audio into (N, 1920) float32 frames at 24 kHz (the last
    one completed with silence); no model work."""
    opts = model.options(options)
    wav = load_audio(audio, sample_rate, target_rate=SAMPLE_RATE, max_seconds=model.card.max_input_seconds)
    wav = np.pad(wav, (0, -wav.size % FRAME_SAMPLES))
    return Reply(wav.reshape(-1, FRAME_SAMPLES), opts)


class ReplyStepper:
    """Batched ``respond()``: one DuplexStepper of ``max_sessions`` rows."""

    def __init__(self, model, max_sessions: int) -> None:
        self.model = model
        self.duplex = DuplexStepper(model, max_sessions)

    def prepare(self, audio: AudioSource, sample_rate: int | None, options, history=None) -> Reply:
        """``history`` is not used: a Moshi conversation is one continuous duplex stream."""
        return prepare_reply(self.model, audio, sample_rate, options)

    @torch.inference_mode()
    def start(self, job: Reply) -> None:
        """Open a row and stream the user's turn through it."""
        job.handle = self.duplex.open(job.options)
        for frame in job.frames:
            (out,) = self.duplex.step([job.handle], [frame])
            if isinstance(out, Exception):
                job.done = True
                return
        self.step([job])

    @torch.inference_mode()
    def step(self, jobs: list[Reply]) -> None:
        live = [j for j in jobs if not j.done]
        if not live:
            return
        silence = np.zeros(FRAME_SAMPLES, np.float32)
        outs = self.duplex.step([j.handle for j in live], [silence] * len(live))
        for job, out in zip(live, outs):
            if isinstance(out, Exception):
                job.done = True
                continue
            job.pending.append(Chunk(audio=out, text=job.handle.text))
            job.produced += 1
            if job.produced >= job.options.max_new_tokens:
                job.done = True

    def release(self, job: Reply) -> None:
        if job.handle is not None:
            self.duplex.close(job.handle)
        job.done = True
