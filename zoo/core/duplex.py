"""What every model's full-duplex stepper shares: checking a step's arguments, turning each
session's input frame into samples inside ``isolate`` (a refused frame ends that session only),
and ``model.duplex()`` as a one-slot session over the model's own ``DuplexStepper``. A model
supplies only what differs: its networks' step, where a handle keeps its row, what a session
failing marks, and its frame size.

    class DuplexStepper(FrameChecks):
        frame_samples, sample_rate = 1920, 24000
        def row(self, handle): return handle.row          # distinct per open session
        def failable(self, handle): return handle          # what ``isolate`` marks
        def step(self, handles, frames):
            if not self.check_step(handles, frames):
                return []
            user = self.user_frames(handles, frames)       # (B, frame_samples) floats
            ...

    def duplex(self, options): stepper = DuplexStepper(self, 1); return OneSlotDuplex(stepper, stepper.open(options))
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import AudioInputError
from .isolation import Failable, isolate
from .types import Chunk


def user_frame(frame: Any, samples: int, sample_rate: int, *, keep_float64: bool = False) -> np.ndarray:
    """One duplex input frame -> (samples,) float32; int PCM is scaled, anything else (other
    sizes, non-numbers, NaN or infinity) is refused with AudioInputError. ``keep_float64``: float64
    stays float64 (a float64 model then sees the exact samples, as in parity checks)."""
    array = np.asarray(frame)
    if array.dtype.kind == "i":
        array = array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
    elif array.dtype.kind != "f":
        raise AudioInputError(f"a duplex frame must hold numbers, got dtype {array.dtype}")
    kind = np.float64 if keep_float64 and array.dtype == np.float64 else np.float32
    array = array.astype(kind, copy=False).reshape(-1)
    if array.size != samples:
        raise AudioInputError(f"a duplex frame is {samples} samples at {sample_rate} Hz, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise AudioInputError("the frame contains NaN or infinite samples")
    return array


class FrameChecks:
    """The shared half of a model's ``DuplexStepper``: argument checks and input frames. A
    subclass sets ``frame_samples`` and ``sample_rate`` (the card's), ``keep_float64`` if its
    networks take float64 frames as given, and says where a handle's row is (``row``) and what
    ``isolate`` marks when that session's frame is refused (``failable``)."""

    frame_samples: int
    sample_rate: int
    keep_float64: bool = False

    def row(self, handle: Any) -> int:
        raise NotImplementedError

    def failable(self, handle: Any) -> Failable:
        return handle

    def check_step(self, handles: Sequence[Any], frames: Sequence[Any]) -> bool:
        """Raises for a wrong call (as many frames as handles, open handles of this stepper, each
        once); False when there is nothing to step."""
        if len(handles) != len(frames):
            raise ValueError(f"{len(handles)} sessions but {len(frames)} frames")
        if any(h.closed for h in handles):
            raise RuntimeError("a closed duplex session cannot step")
        if any(h.owner != id(self) for h in handles) or len({self.row(h) for h in handles}) != len(handles):
            raise ValueError("every handle must be a distinct session opened by this stepper")
        return bool(handles)

    def user_frames(self, handles: Sequence[Any], frames: Sequence[Any]) -> np.ndarray:
        """(B, frame_samples): each session's frame, or zeros for a refused one (that session's
        error is set by ``isolate``, the step goes on for the others)."""
        user = []
        for h, f in zip(handles, frames):
            frame = np.zeros(self.frame_samples, np.float32)  # the placeholder of a refused frame
            with isolate(self.failable(h)):
                frame = self.user_frame(f)
            user.append(frame)
        return np.stack(user)

    def user_frame(self, frame: Any) -> np.ndarray:
        return user_frame(frame, self.frame_samples, self.sample_rate, keep_float64=self.keep_float64)


class OneSlotDuplex:
    """``model.duplex()``: one session (a ``zoo.core.types.DuplexSession``) on a one-slot
    ``DuplexStepper`` (a ``FrameChecks``) of its own. Its chunks carry the handle's ``text`` (the text piece of the
    last step) where the model's handles have one."""

    def __init__(self, stepper: FrameChecks, handle: Any) -> None:
        self.stepper, self.handle = stepper, handle

    @property
    def steps(self) -> int:
        return self.handle.steps

    def step(self, frame: np.ndarray) -> Chunk:
        """One input frame -> the model's next frame (and text piece). A refused frame raises and
        the session goes on; any other failure ends it."""
        (out,) = self.stepper.step([self.handle], [self.stepper.user_frame(frame)])
        if isinstance(out, Exception):
            raise out
        return Chunk(audio=out, text=getattr(self.handle, "text", ""))

    def close(self) -> None:
        self.stepper.close(self.handle)

    def __enter__(self) -> OneSlotDuplex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
