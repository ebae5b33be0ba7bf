"""Who joins the running sessions between two decode steps (zoo.core.scheduler.Scheduler's queue).

Waiting jobs join in arrival order, at most ``batch`` of them per step (prefilled together by a
``BatchStarter``). With a ``ChunkedStarter`` stepper the prefill per step is also bounded in
prompt positions (``positions``, as vLLM's token budget): jobs join whole while their prompts fit
what is left of it, and the first one that does not fit starts in parts, one part per step, one
such job at a time. A long prompt then delays the running sessions' next step by at most one
part's prefill, however long it is, and the arrivals behind it wait for it only as long as
arrival order demands.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

# prompt positions prefilled between two decode steps by default: vLLM's long-standing chunked-
# prefill token budget. On an H100 that is tens of milliseconds of a 9B model's prefill at most.
PREFILL_POSITIONS = 2048


def part_end(done: int, positions: int, length: int) -> int:
    """Where a ChunkedStarter's next prompt part ends: ``positions`` more after the ``done``
    already in, at most the prompt's ``length``. A part of no position is the caller's error."""
    if positions < 1:
        raise ValueError(f"a prefill part needs at least one position, got {positions}")
    return min(length, done + positions)


class Waiting(Protocol):
    job: object
    cancelled: bool
    prefilled: int  # prompt positions prefilled so far (a job started in parts)


T = TypeVar("T", bound=Waiting)


@dataclass
class Tick(Generic[T]):
    """One step's prefill work, in arrival order: the next part of the job already starting in
    parts (``carried``: its positions), the jobs that join whole, and a job that starts in parts
    (``parted``: its first part's positions)."""

    carried: tuple[T, int] | None = None
    joining: list[T] = field(default_factory=list)
    parted: tuple[T, int] | None = None


class Admissions(Generic[T]):
    """The waiting jobs. ``prompt_length`` (a ChunkedStarter's) with ``positions`` bounds the
    prompt positions prefilled per step; without them only ``batch`` bounds a step's arrivals."""

    def __init__(self, batch: int, positions: int | None = None,
                 prompt_length: Callable[[object], int] | None = None) -> None:
        if batch < 1:
            raise ValueError(f"prefill_batch must be >= 1, got {batch}")
        if positions is not None and positions < 1:
            raise ValueError(f"prefill_positions must be >= 1 (or None: no bound), got {positions}")
        self.batch = batch
        self.positions = positions if prompt_length is not None else None
        self._length = prompt_length
        self.pending: deque[T] = deque()
        self.unfinished: T | None = None  # its prompt is being prefilled in parts

    def __len__(self) -> int:
        """Jobs waiting or starting in parts."""
        return len(self.pending) + (self.unfinished is not None)

    def tick(self) -> Tick[T]:
        """Take this step's prefill work off the queue."""
        if self.positions is None:
            return Tick(joining=[self.pending.popleft() for _ in range(min(self.batch, len(self.pending)))])
        tick, budget = Tick(), self.positions
        if self.unfinished is not None:
            part = min(budget, self._length(self.unfinished.job) - self.unfinished.prefilled)
            tick.carried, budget = (self.unfinished, part), budget - part
        while self.pending and len(tick.joining) < self.batch:
            head = self.pending[0]
            length = 0 if head.cancelled else self._length(head.job)
            if length > budget:
                if tick.carried is None and budget > 0:
                    self.unfinished = self.pending.popleft()
                    tick.parted = (self.unfinished, budget)
                break
            tick.joining.append(self.pending.popleft())
            budget -= length
        return tick

    def part_done(self, ticket: T, positions: int, finished: bool) -> None:
        """``positions`` more of the unfinished job's prompt are in; ``finished``: all of it."""
        ticket.prefilled += positions
        if finished:
            self.unfinished = None

    def drop_unfinished(self) -> None:
        """The job starting in parts left (cancelled, or its part failed)."""
        self.unfinished = None
