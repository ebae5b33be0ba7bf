"""Full-duplex sessions stepped frame by frame together (``DuplexScheduler``), only through the
contract in zoo.core.types. A model takes part by returning a ``DuplexStepper`` from
``model.duplex_stepper(max_sessions)`` (cards that say duplex):

    handle = stepper.open(options, prompt=None, sample_rate=None)  # a slot (duplex worker thread)
    stepper.step(handles, frames)  # one input frame per handle -> per handle its next output frame,
                                   #   or the Exception that ended (and closed) that session alone
    stepper.close(handle)          # free its slot
    stepper.open_many(options, prompt, sample_rate)  # optional (BatchOpener): a burst, one prefill

A session's failure stays its own, as in zoo.core.scheduler.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .types import BatchOpener, Chunk, DuplexStepper
from .worker import Busy, WorkerThread

log = logging.getLogger("zoo.sessions")


class DuplexTicket:
    """One duplex session as the worker sees it. ``deliver`` is called on the worker thread with
    each output frame (np.ndarray; a Chunk with the step's text piece when ``chunks`` is set) or
    an Exception (the session failed)."""

    def __init__(self, number: int, options: Any, prompt: Any, deliver: Callable[[Any], None]) -> None:
        self.number, self.options, self.prompt, self.deliver = number, options, prompt, deliver
        self.inbox: deque[np.ndarray] = deque()
        self.state = "new"  # new -> queued (waits for open) -> taken (the worker has it) ; closed
        self.handle = None
        self.closed = False
        # deliver a Chunk (the frame and the handle's ``text``, the step's text piece) instead of
        # the bare frame; set before the first push
        self.chunks = False


# what DuplexScheduler reports after each successful step: (seconds, sessions stepped, frames answered)
StepReport = Callable[[float, int, int], None]


class DuplexScheduler(WorkerThread):
    """Full-duplex sessions on a model's ``DuplexStepper``, one worker thread owning it. Each tick
    it applies the sessions that left (``close``) and joined (``open``, with the prompt's
    prefill), then steps every session that has a pending input frame in ONE batched
    ``stepper.step(handles, frames)`` call: one frame per session per tick, so every session
    advances frame-synchronously and a session with a backlog catches up one frame per tick. A
    session leaving frees its slot before the next step. ``reserve`` / ``push`` / ``close`` are
    called from any thread; the stepper only from the worker. ``prompt``: (audio, rate) that seeds
    every session unless its ``reserve`` caller replaces ``ticket.prompt`` before the first push."""

    def __init__(self, stepper: DuplexStepper, max_sessions: int, frame_samples: int, *,
                 prompt: tuple[np.ndarray, int] | None = None, warm_up: bool = True,
                 on_step: StepReport | None = None) -> None:
        super().__init__("zoo-duplex")
        self.stepper, self.max_sessions, self.frame = stepper, max_sessions, frame_samples
        self.prompt = prompt
        self.on_step = on_step
        if warm_up:  # the first step builds lazy state (and loads the duplex networks); a bad prompt fails here
            audio, rate = prompt if prompt is not None else (None, None)
            handle = self.stepper.open(None, prompt=audio, sample_rate=rate)
            self.stepper.step([handle], [np.zeros(self.frame, np.float32)])
            self.stepper.close(handle)
        self.reserved = 0
        self.steps = 0
        self._opening: list[DuplexTicket] = []
        self._closing: list[DuplexTicket] = []
        self._active: list[DuplexTicket] = []  # worker thread only
        self._numbers = itertools.count(1)
        self._thread.start()

    def nbytes(self) -> int:
        return self.stepper.nbytes()

    def reserve(self, options: Any, deliver: Callable[[Any], None]) -> DuplexTicket:
        """A slot for a new session (opened in the stepper when its first frame arrives); raises
        Busy at once when ``max_sessions`` are taken."""
        with self._cv:
            if self.reserved >= self.max_sessions:
                raise Busy(f"all {self.max_sessions} duplex session slots are busy; retry shortly")
            self.reserved += 1
            return DuplexTicket(next(self._numbers), options, self.prompt, deliver)

    def push(self, ticket: DuplexTicket, frame: np.ndarray) -> None:
        with self._cv:
            if ticket.closed:
                return
            ticket.inbox.append(frame)
            if ticket.state == "new":
                ticket.state = "queued"
                self._opening.append(ticket)
            self._cv.notify()

    def close(self, ticket: DuplexTicket) -> None:
        """The session leaves: its frames are dropped, its slot freed before the next step."""
        with self._cv:
            if ticket.closed:
                return
            ticket.closed = True
            ticket.inbox.clear()
            self.reserved -= 1
            if ticket.state == "queued":
                self._opening.remove(ticket)  # never opened: nothing to free
            elif ticket.state == "taken":
                self._closing.append(ticket)
            self._cv.notify()

    # -- worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._opening or self._closing
                           or any(t.inbox for t in self._active)):
                    self._cv.wait()
                if self._stopping:
                    return
                closing, self._closing = self._closing, []
                opening, self._opening = self._opening, []
                for ticket in opening:
                    ticket.state = "taken"
            for ticket in closing:  # leave first, so their slots are free for those joining
                self._release(ticket)
            self._open(opening)
            with self._cv:
                batch = [t for t in self._active if t.inbox and not t.closed]
                frames = [t.inbox.popleft() for t in batch]
            if batch:
                self._step(batch, frames)

    def _open(self, tickets: list[DuplexTicket]) -> None:
        """Open the arrivals' sessions: those with the same prompt (usually the scheduler's)
        together, one prefill for all, when the stepper is a BatchOpener, else one by one; a
        session that cannot open hears why alone."""
        groups: dict[int, list[DuplexTicket]] = {}
        for ticket in tickets:
            groups.setdefault(id(ticket.prompt), []).append(ticket)
        for group in groups.values():
            audio, rate = group[0].prompt if group[0].prompt is not None else (None, None)
            if len(group) > 1 and isinstance(self.stepper, BatchOpener):
                try:
                    opened = self.stepper.open_many([t.options for t in group], prompt=audio, sample_rate=rate)
                except Exception as err:  # noqa: BLE001 - the batched open failed: each of them hears it
                    opened = [err] * len(group)
            else:
                opened = [self._open_one(t.options, audio, rate) for t in group]
            for ticket, handle in zip(group, opened):
                self._admit(ticket, handle)

    def _open_one(self, options: Any, audio: Any, rate: int | None) -> Any:
        try:
            return self.stepper.open(options, prompt=audio, sample_rate=rate)
        except Exception as err:  # noqa: BLE001 - reported to that session only
            return err

    def _admit(self, ticket: DuplexTicket, handle: Any) -> None:
        if isinstance(handle, Exception):
            with self._cv:
                ticket.inbox.clear()
            ticket.deliver(handle)
            return
        ticket.handle = handle
        with self._cv:
            closed = ticket.closed
        if closed:  # it left while being opened
            self.stepper.close(ticket.handle)
        else:
            self._active.append(ticket)

    def _release(self, ticket: DuplexTicket) -> None:
        if ticket.handle is not None:
            self.stepper.close(ticket.handle)
        if ticket in self._active:
            self._active.remove(ticket)

    def _step(self, batch: list[DuplexTicket], frames: list[np.ndarray]) -> None:
        """One batched step. The stepper answers each session with its frame, or with the
        Exception that ended that session alone (its handle is closed): that session gets the
        error, the others their frames. Only a failure of the whole step fails every session."""
        started = time.perf_counter()
        try:
            outputs = self.stepper.step([t.handle for t in batch], frames)
        except Exception as err:  # noqa: BLE001 - a failed batched step fails the sessions in it
            log.exception("duplex step failed for %d session(s)", len(batch))
            outputs = [err] * len(batch)
        else:
            self.steps += 1
            if self.on_step is not None:
                answered = sum(not isinstance(out, Exception) for out in outputs)
                self.on_step(time.perf_counter() - started, len(batch), answered)
        for ticket, out in zip(batch, outputs):
            if isinstance(out, Exception):
                self._fail(ticket, out)
            elif ticket.chunks:
                ticket.deliver(Chunk(audio=out, text=getattr(ticket.handle, "text", "")))
            else:
                ticket.deliver(out)

    def _fail(self, ticket: DuplexTicket, err: Exception) -> None:
        """The session ended in the worker: its slot is freed, its waiting frames dropped."""
        self._release(ticket)
        with self._cv:
            ticket.inbox.clear()
        ticket.deliver(err)
