"""Hertz-dev's full duplex: sessions stepping 125 ms frames over one set of caches.

Batched serving (for server.py):

    stepper = model.duplex_stepper(max_sessions=8)           # one set of caches for 8 sessions
    a = stepper.open(options, prompt=None)                    # DuplexHandle (a session slot)
    b = stepper.open(options)
    outs = stepper.step([a, b], [frame_a, frame_b])           # one batched forward for both: per
                                                              #   handle a (2000,) float32 array, or
                                                              #   the Exception that ended (and
                                                              #   closed) that session alone
    stepper.close(a)                                          # frees the slot at once

``step`` runs codec encode, main model, resynthesizer and codec decode for every handle given in
one batched call each; handles join (``open``) and leave (``close``) between steps; any subset of
the open handles may step together. A stepper is not thread-safe: call it from one worker thread.
``model.duplex()`` is a one-slot stepper. ``model.stepper(max_sessions)`` is the same for
``respond()`` (zoo.core.scheduler protocol). Contexts: by default both transformers hold the
reference server's 1024 positions (its ``init_cache(length=1024)``: 128 s), where that server stops
with a full cache and a session here slides on (below). Memory: the KV caches take ``main_context``
x 0.5 MiB + ``resynth_context`` x 128 KiB per session slot in bfloat16, 0.625 GiB at the default
contexts (2 GiB at the trained 2048 / 8192 that ``respond()`` and the reference notebook use;
``stepper.nbytes()`` says what is held): the caches, not compute, bound the sessions a GPU holds. Per step, only
the model channel's output head and resynthesizer path are computed: the reference also predicts
the user's channel and throws it away (so its random draws differ from ours; the deterministic
mode is identical). Measured on an H200, bfloat16, random full-size weights: a step takes about
35 ms for 1 session, 42 ms for 8, 64 ms for 32 (real time is 125 ms); a context slide (a re-prefill
of the last 3/4 of the context) added ~75 ms once per 512 steps at 2048 positions; at 1024 it comes
once per 256 steps with half the latents to re-prefill.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.audio import AudioSource, read_audio, resample
from ..core.devices import to_device
from ..core.duplex import FrameChecks
from ..core.errors import AudioInputError, AudioTooLong
from ..core.isolation import isolate
from ..core.types import Options
from .codec import FRAME, SAMPLE_RATE, sample_posterior
from .engine import Engine, Slot
from .options import HertzOptions

SERVER_CONTEXT = 1024  # the reference inference_server.py's KV-cache length, for both transformers


@dataclass
class DuplexHandle:
    """One duplex session's slot in a DuplexStepper."""

    slot: Slot
    owner: int = 0  # id() of the stepper that opened it
    steps: int = 0
    closed: bool = False
    model_latents: list[torch.Tensor] = field(default_factory=list)  # last few, for inspection

    @property
    def options(self) -> Options:
        return self.slot.options


class DuplexStepper(FrameChecks):
    """Duplex sessions over one set of caches: ``open`` / ``step(handles, frames)`` / ``close``.
    Per slot: main-model and resynthesizer KV rows, a streaming encoder state per channel, a
    streaming decoder state, the model's previous output frame and a generator. ``model``: the
    HertzDev whose networks it runs. Argument checks and input frames: zoo.core.duplex.FrameChecks."""

    frame_samples, sample_rate = FRAME, SAMPLE_RATE

    def __init__(self, model, max_sessions: int, *, main_context: int = SERVER_CONTEXT,
                 resynth_context: int = SERVER_CONTEXT, keep: float = 0.75, graphs: bool | None = None) -> None:
        main, resynth = model.networks("split")
        self.model, self.codec = model, model.codec
        self.engine = Engine(main, resynth, model.quantizer, max_sessions, main_context=main_context,
                             resynth_context=resynth_context, out_channels=(1,), keep=keep, graphs=graphs)
        self.device, self.dtype = self.engine.device, self.engine.dtype
        self.encoding, self.decoding = self.codec.streaming_encoder, self.codec.streaming_decoder
        self.encoders = self.encoding.new_state(2 * max_sessions)  # row 2r: user, 2r + 1: model
        self.decoders = self.decoding.new_state(max_sessions)
        self.previous = torch.zeros(max_sessions, FRAME, dtype=self.dtype, device=self.device)
        self.max_sessions = max_sessions

    def row(self, handle: DuplexHandle) -> int:
        return handle.slot.row

    def failable(self, handle: DuplexHandle) -> Slot:
        return handle.slot

    def nbytes(self) -> int:
        """Device memory held for all slots (KV caches, histories excluded)."""
        return self.engine.nbytes() + self.encoders.nbytes() + self.decoders.nbytes()

    def open(self, options: HertzOptions | Mapping[str, Any] | None = None, prompt: AudioSource | None = None,
             sample_rate: int | None = None) -> DuplexHandle:
        (opened,) = self.open_many([options], prompt=prompt, sample_rate=sample_rate)
        if isinstance(opened, Exception):
            raise opened
        return opened

    def open_many(self, options: Sequence[HertzOptions | Mapping[str, Any] | None], prompt: AudioSource | None = None,
                  sample_rate: int | None = None) -> list[DuplexHandle | Exception]:
        """zoo.core.types.BatchOpener: sessions opening together with one prompt (a server's), which
        is prefilled for all of them in one forward per network. Per session its handle, or the
        Exception that kept it from opening (bad options, no free slot, its own draws failed on the
        prompt). A bad prompt raises for all."""
        prompt_audio = None if prompt is None else \
            read_duplex_prompt(prompt, sample_rate, self.model.card.max_input_seconds)
        if prompt_audio is not None:
            self.engine.check_prompt(prompt_audio.shape[-1] // FRAME)
        opened: list[DuplexHandle | Exception] = []
        for one in options:
            try:
                opened.append(self._open_slot(self.model.options(one)))
            except Exception as err:  # noqa: BLE001 - that session does not open; the others do
                opened.append(err)
        handles = [h for h in opened if isinstance(h, DuplexHandle)]
        if prompt_audio is not None and handles:
            try:
                self._prefill(handles, prompt_audio)
            except BaseException:
                for handle in handles:
                    self.close(handle)
                raise
            for i, h in enumerate(opened):
                if isinstance(h, DuplexHandle) and h.slot.error is not None:  # its own draws failed on the prompt
                    self.close(h)
                    opened[i] = h.slot.error
        return opened

    def _open_slot(self, options: HertzOptions) -> DuplexHandle:
        handle = DuplexHandle(self.engine.open(options), owner=id(self))
        rows = to_device([handle.slot.row], self.device)
        self.encoding.reset(self.encoders, rows=torch.stack([2 * rows, 2 * rows + 1]).T.reshape(-1))
        self.decoding.reset(self.decoders, rows=rows)
        self.previous[rows] = 0
        return handle

    @torch.inference_mode()
    def _prefill(self, handles: list[DuplexHandle], audio: np.ndarray) -> None:
        """The reference server's prompt: both channels encoded, prefilled; the model's first
        latent is decoded (fresh decoder, as the reference) and becomes its next input frame."""
        rows = to_device([h.slot.row for h in handles], self.device)
        x = torch.from_numpy(audio).to(self.device, self.dtype)[:, None]  # (2, 1, N): user, model
        latents = self._encode(handles, rows, x.repeat(len(handles), 1, 1))  # (B, P, 64)
        nxt = self.engine.advance([h.slot for h in handles], latents)
        self._decode(rows, nxt)

    def _encode(self, handles: list[DuplexHandle], rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x (2B, 1, N) rows (user, model) per slot -> latents (B, N / 2000, 64)."""
        enc_rows = torch.stack([2 * rows, 2 * rows + 1]).T.reshape(-1)
        mu, logvar = self.encoding.step(self.encoders, x, rows=enc_rows)
        z = []
        for i, h in enumerate(handles):
            m, lv = mu[2 * i : 2 * i + 2], logvar[2 * i : 2 * i + 2]
            latent = m  # also the placeholder of a session whose draw fails
            if not h.slot.deterministic:
                with isolate(h.slot):
                    latent = sample_posterior(m, lv, h.slot.generator)
            z.append(latent)
        z = torch.stack(z)  # (B, 2, T, 32)
        return torch.cat([z[:, 0], z[:, 1]], dim=-1)

    def _decode(self, rows: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        audio = self.decoding.step(self.decoders, nxt, rows=rows)[:, 0]  # (B, 2000)
        self.previous[rows] = audio
        return audio

    @torch.inference_mode()
    def step(self, handles: Sequence[DuplexHandle], frames: Sequence[Any]) -> list[np.ndarray | Exception]:
        """One 125 ms step for every handle: its user frame in, the model's next frame out, or the
        Exception that ended that session (a bad frame, its own sampling failed): its handle is
        closed and the others' frames are what they would be without it. Calling it wrongly
        (closed or foreign handles) or a failure of the batched networks raises for all."""
        if not self.check_step(handles, frames):
            return []
        user = torch.from_numpy(self.user_frames(handles, frames)).to(self.device, self.dtype)
        rows = to_device([h.slot.row for h in handles], self.device)  # no wait for the device
        x = torch.stack([user, self.previous[rows]], dim=1).reshape(-1, 1, FRAME)
        latents = self._encode(list(handles), rows, x)
        nxt = self.engine.advance([h.slot for h in handles], latents)  # (B, 1, 32)
        audio = self._decode(rows, nxt)
        outputs: list[np.ndarray | Exception] = []
        for h, z, frame in zip(handles, nxt[:, 0], audio.float().clamp(-1, 1).cpu().numpy()):
            if h.slot.error is not None:
                self.close(h)
                outputs.append(h.slot.error)
                continue
            h.steps += 1
            h.model_latents.append(z)
            del h.model_latents[:-8]
            outputs.append(frame)
        return outputs

    def close(self, handle: DuplexHandle) -> None:
        if not handle.closed:
            self.engine.close(handle.slot)
            handle.closed = True


def read_duplex_prompt(prompt: AudioSource, sample_rate: int | None, max_seconds: float) -> np.ndarray:
    """A prompt -> (2, N) float32 at 16 kHz, whole frames (the end trimmed, as the
    reference server); stereo is (user, model), mono is used for both."""
    data, rate = read_audio(prompt, sample_rate, max_seconds=max_seconds)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 1:
        data = np.stack([data, data])
    elif data.ndim == 2:
        data = data.T if data.shape[0] > data.shape[1] else data
        data = np.stack([data[0], data[-1]])
    else:
        raise AudioInputError(f"a prompt must be 1-D or 2-D audio, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise AudioInputError("the prompt contains NaN or infinite samples")
    if data.shape[1] / rate > max_seconds:  # an array given as (channels, samples)
        raise AudioTooLong(f"the prompt is {data.shape[1] / rate:.1f} s; at most {max_seconds:g} s")
    data = np.stack([resample(channel, rate, SAMPLE_RATE) for channel in data])
    frames = data.shape[1] // FRAME
    if frames < 1:
        raise AudioInputError(f"a prompt needs at least one frame ({FRAME} samples at {SAMPLE_RATE} Hz)")
    return np.ascontiguousarray(data[:, : frames * FRAME])
