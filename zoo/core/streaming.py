"""One streaming vocabulary for the audio codecs and decoders of every model.

A streaming module turns a sequence that arrives piece by piece (codec frames, speech tokens,
latents, audio frames) into its output piece by piece. What it must remember between pieces lives
in a state object that the module makes, never in the module itself, so one module (its weights)
serves any number of streams at once:

    state = module.new_state(...)      # a fresh stream; the arguments are the module's own
    y = module.step(state, x)          # the output that piece x makes final (may be empty)
    y = module.finish(state, x)        # x (optional) is the last piece: all output still held back
    module.reset(state)                # the state is fresh again

The outputs of ``step`` and ``finish`` concatenated are the module's one-pass result over the
whole sequence, exactly or as the module documents (a decoder with bounded context is close, not
equal). ``finish`` leaves the state fresh, as ``reset`` does, so the same pieces streamed again
give the same output again.

A batched module decodes many sessions in one call: its state has one row per session and
``rows`` (a LongTensor of row indices, keyword-only) says which rows a call is about:
``step(state, x, rows=rows)`` advances those rows with x's batch (row i of x is session
rows[i]), ``reset(state, rows=rows)`` restarts them for a new session, and the other rows stay as
they are. Without ``rows`` a call is about every row (``x`` has the state's batch size).

A module whose every layer is causal holds no output back; it derives from
``CausalStreamingModule``, whose ``finish`` is the last ``step`` (the Hertz-dev codec's and Mimi's
halves, batched over a ``BufferState`` of per-row buffers).

What stays each module's own: the arguments of ``new_state`` (windows of context, a reference's
block schedule, seeds of its noise) and the types of its pieces and outputs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import torch

State = TypeVar("State", bound="StreamingState")
Piece = TypeVar("Piece")
Output = TypeVar("Output")


class StreamingState(ABC):
    """What a stream remembers between pieces. ``reset()`` makes it fresh (all rows, or ``rows``
    of a batched state)."""

    @abstractmethod
    def reset(self, rows: torch.Tensor | None = None) -> None: ...


class StreamingModule(ABC, Generic[State, Piece, Output]):
    """A module that streams: ``new_state`` / ``step`` / ``finish`` / ``reset`` (module docstring)."""

    @abstractmethod
    def new_state(self, *args, **kwargs) -> State: ...

    @abstractmethod
    def step(self, state: State, piece: Piece, *, rows: torch.Tensor | None = None) -> Output: ...

    @abstractmethod
    def finish(self, state: State, piece: Piece | None = None, *, rows: torch.Tensor | None = None) -> Output: ...

    def reset(self, state: State, *, rows: torch.Tensor | None = None) -> None:
        state.reset(rows)


class CausalStreamingModule(StreamingModule[State, Piece, Output]):
    """A streaming module that holds no output back (every layer causal: a piece's output is
    final when it is made), so ``finish`` is the last ``step`` (or, without a last piece, an empty
    output for the rows) and a reset. The Hertz-dev codec's and Mimi's halves."""

    def finish(self, state: State, piece: Piece | None = None, *, rows: torch.Tensor | None = None) -> Output:
        out = self.empty(state, rows) if piece is None else self.step(state, piece, rows=rows)
        self.reset(state, rows=rows)
        return out

    @abstractmethod
    def empty(self, state: State, rows: torch.Tensor | None) -> Output:
        """What ``step`` returns for no input: an output of length 0 for the rows (all: None)."""

    @staticmethod
    def batch(state: State, rows: torch.Tensor | None) -> int:
        """How many rows a call is about: ``rows``', or every row of the state (its ``rows``)."""
        return state.rows if rows is None else rows.numel()


def one_row_only(rows: torch.Tensor | None, module: str) -> None:
    """For modules whose states are one stream each: refuse ``rows`` (a caller expecting a
    batched state would otherwise stream into the wrong session)."""
    if rows is not None:
        raise TypeError(f"{module} streams one sequence per state; it takes no rows")


class BufferState(StreamingState):
    """A streaming state made of named per-row buffers (the past input a causal convolution needs,
    the overlap a transposed convolution still owes, a flag per row): row i of every buffer belongs
    to session row i. ``take(rows)`` copies those rows out for one call, ``put(rows, part)`` writes
    them back, ``reset(rows)`` returns them to their initial values (``fill`` per buffer, 0 unless
    given)."""

    def __init__(self, buffers: dict[str, torch.Tensor], fill: dict[str, float | bool] | None = None) -> None:
        self.buffers = buffers
        self.fill = dict(fill or {})

    def take(self, rows: torch.Tensor) -> BufferState:
        return type(self)({k: v[rows] for k, v in self.buffers.items()}, self.fill)

    def put(self, rows: torch.Tensor, part: BufferState) -> None:
        for k, v in part.buffers.items():
            self.buffers[k][rows] = v

    def reset(self, rows: torch.Tensor | None = None) -> None:
        rows = slice(None) if rows is None else rows
        for k, v in self.buffers.items():
            v[rows] = self.fill.get(k, 0)

    @property
    def rows(self) -> int:
        """How many session rows the state holds."""
        return next(iter(self.buffers.values())).size(0)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.buffers.values())
