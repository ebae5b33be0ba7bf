"""Moshi's full duplex: sessions stepping 80 ms frames (1920 samples at 24 kHz) over one set of
caches, the way the reference server (moshi/moshi/server.py) streams a connection.

    stepper = model.duplex_stepper(max_sessions=8)
    a = stepper.open(options)                       # a DuplexHandle (a session row)
    outs = stepper.step([a, b], [frame_a, frame_b]) # one batched step: per handle (1920,) float32
                                                    #   or the Exception that ended that session
    a.text                                          # the text piece of a's last step ("" if none)
    stepper.close(a)

Per step and session, as the reference: ``mimi.encode`` of the user's frame, ``LMGen.step``,
``mimi.decode`` of Moshi's codebooks; the text token becomes a piece (SentencePiece's piece, "▁"
as a space; the pad and end-of-padding ids give ""). The server resets Mimi's streaming state
after encoding a connection's first frame (that frame is in the model's past: the first step's
inputs are all initial tokens), so the encoder of a session restarts after its first frame here
too. The reference sends nothing at the first step (the acoustic delay); the zoo's duplex
contract answers every frame, so the first answer is 1920 zeros (80 ms of silence, the same
timing on the wire). Audio leaves clamped to [-1, 1] (the PCM range; the reference's Opus
writer takes floats). Sessions run without a time limit: the temporal transformer's cache is a
ring of 3000 steps (240 s) as the reference's.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.duplex import FrameChecks
from ..core.errors import AudioInputError
from .generate import Draw, LMState
from .mimi import FRAME_SAMPLES, SAMPLE_RATE
from .options import MoshiOptions


@dataclass
class DuplexHandle:
    """One duplex session's row in a DuplexStepper."""

    row: int
    draw: Draw
    owner: int = 0  # id() of the stepper that opened it
    steps: int = 0
    text: str = ""  # the text piece of the last step
    tokens: torch.Tensor | None = None  # the last step's output: text token, Moshi's codebooks (None at first)
    closed: bool = False
    error: Exception | None = None
    done: bool = False  # set with ``error`` by zoo.core.isolation.isolate

    @property
    def options(self) -> MoshiOptions:
        return self.draw.options


class DuplexStepper(FrameChecks):
    """Duplex sessions over one set of caches: ``open`` / ``step(handles, frames)`` / ``close``.
    ``model``: the Moshi whose networks it runs. Not thread-safe: one worker thread calls it.
    Argument checks and input frames: zoo.core.duplex.FrameChecks (float64 frames stay float64).
    ``graphs`` / ``buckets``: how the temporal transformer's steps run (generate.LMState; by default
    CUDA graphs on CUDA, exact eager steps elsewhere)."""

    frame_samples, sample_rate, keep_float64 = FRAME_SAMPLES, SAMPLE_RATE, True

    def __init__(self, model, max_sessions: int, *, graphs: bool | None = None, buckets: bool | None = None) -> None:
        self.model, self.max_sessions = model, max_sessions
        self.mimi, self.lm, self.generator = model.mimi, model.lm, model.generator
        self.device, self.dtype = model.device, model.dtype
        self.encoding, self.decoding = self.mimi.streaming_encoder, self.mimi.streaming_decoder
        self.encoders = self.encoding.new_state(max_sessions)
        self.decoders = self.decoding.new_state(max_sessions)
        self.state = LMState(self.lm, max_sessions, self.dtype, self.device, graphs=graphs, buckets=buckets)

    def row(self, handle: DuplexHandle) -> int:
        return handle.row

    def nbytes(self) -> int:
        return self.state.nbytes() + self.encoders.nbytes() + self.decoders.nbytes()

    def open(self, options: MoshiOptions | Mapping[str, Any] | None = None, prompt: Any = None,
             sample_rate: int | None = None) -> DuplexHandle:
        """A new session. Moshi's reference server takes no prompt: ``prompt`` must be None."""
        if prompt is not None:
            raise AudioInputError("Moshi sessions take no prompt (the reference server has none)")
        opts = self.model.options(options)
        (row,) = self.state.cache.allocate()  # the lowest free row: a freed one is reused first
        rows = torch.tensor([row])
        self.encoding.reset(self.encoders, rows=rows)
        self.decoding.reset(self.decoders, rows=rows)
        self.state.reset([row])
        generator = torch.Generator(device="cpu").manual_seed(opts.seed)
        return DuplexHandle(row, Draw(opts, generator), owner=id(self))

    @torch.inference_mode()
    def step(self, handles: Sequence[DuplexHandle], frames: Sequence[Any]) -> list[np.ndarray | Exception]:
        """One 80 ms step for every handle: its user frame in, Moshi's frame out (its text piece on
        ``handle.text``), or the Exception that ended that session alone (a bad frame, its own
        sampling failed: its handle is closed). Wrong calls (closed or foreign handles) raise."""
        if not self.check_step(handles, frames):
            return []
        user = self.user_frames(handles, frames)
        rows = [h.row for h in handles]
        ids = torch.tensor(rows)
        x = torch.from_numpy(user).to(self.device, self.mimi.dtype)[:, None]  # float32 beside a bf16 LM
        codes = self.encoding.step(self.encoders, x, rows=ids)  # (B, K, 1)
        first = [h.row for h in handles if h.steps == 0]
        if first:  # the reference server's reset after a connection's first frame
            self.encoding.reset(self.encoders, rows=torch.tensor(first))
        outs = self.generator.step(self.state, rows, codes[:, :, 0], [h.draw for h in handles])
        audio = np.zeros((len(handles), FRAME_SAMPLES), np.float32)
        ready = [i for i, out in enumerate(outs) if out is not None]
        texts = {}
        if ready:
            tokens = torch.stack([outs[i] for i in ready])  # (R, 1 + dep_q)
            pcm = self.decoding.step(self.decoders, tokens[:, 1:, None], rows=ids[ready])
            audio[ready] = pcm[:, 0].float().clamp(-1, 1).cpu().numpy()
            texts = dict(zip(ready, tokens[:, 0].tolist()))  # one read for every session's text
        answers: list[np.ndarray | Exception] = []
        for i, h in enumerate(handles):
            h.error = h.error or h.draw.error
            if h.error is not None:
                self.close(h)
                answers.append(h.error)
                continue
            h.steps += 1
            h.tokens = outs[i]
            h.text = self.model.piece(texts[i]) if i in texts else ""
            answers.append(audio[i])
        return answers

    def close(self, handle: DuplexHandle) -> None:
        if not handle.closed:
            handle.closed = True
            self.state.cache.release([handle.row])
