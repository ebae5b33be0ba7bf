"""One model, many sessions: a worker thread runs the model's batched decode step over every active
session, admitting new sessions (prefill) and dropping finished or cancelled ones between steps.

A model takes part by returning a ``Stepper`` from ``model.stepper(max_sessions)``:

    job = stepper.prepare(audio, sample_rate, options, history)  # validate + encode input (any thread)
    stepper.start(job)        # prefill: the job joins the batch (scheduler thread)
    stepper.step(jobs)        # one batched decode step for all active jobs (scheduler thread)
    job.poll() -> Chunk|None  # output produced since the last poll; job.done when finished
    stepper.release(job)      # free its slot (KV-cache rows)

Failures stay with their session. A stepper does each session's own share of a step (sampling
with its options, routing its ids, decoding its text and audio) inside ``isolate(job)``: an
exception there sets ``job.error`` and ``job.done`` and the step goes on for the others, which
get exactly what they would have got with that session cancelled at that step. The scheduler
then hands ``job.error`` to that session's ticket only (so does an exception from its ``start``
or ``poll``). Only a failure of the batched work itself (the forward pass over every session,
a batched decode that cannot be split by session) still fails every session in the batch.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from .types import Chunk

log = logging.getLogger("zoo.sessions")

# What a ticket's callback receives: a Chunk, an Exception (the job failed), or None (finished).
Delivery = Callable[["Chunk | Exception | None"], None]


class Job(Protocol):
    done: bool
    error: Exception | None  # why the job failed (then done is set too); None otherwise

    def poll(self) -> Chunk | None: ...


class Failable(Protocol):
    """What ``isolate`` marks: a job, or the per-session state a model's engine steps."""

    done: bool
    error: Exception | None


@contextlib.contextmanager
def isolate(session: Failable) -> Iterator[None]:
    """Run one session's share of a batched step: an exception ends that session only (recorded
    in ``session.error``, ``session.done`` set, logged) and is not raised, so the caller goes on
    with the next session. The caller skips, or feeds a placeholder for, a failed session."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - reported to that session only
        log.exception("one session failed; the others in its batch go on")
        if session.error is None:
            session.error = err
        session.done = True


class Stepper(Protocol):
    def prepare(self, audio: Any, sample_rate: int | None, options: Any, history: Any = None) -> Job: ...
    def start(self, job: Job) -> None: ...
    def step(self, jobs: list[Job]) -> None: ...
    def release(self, job: Job) -> None: ...


@dataclass
class Ticket:
    id: int
    job: Job
    deliver: Delivery
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    error: Exception | None = None  # its job's poll() raised


class Busy(Exception):
    """Every session slot is taken."""


class Scheduler:
    def __init__(self, stepper: Stepper, max_sessions: int) -> None:
        self.stepper, self.max_sessions = stepper, max_sessions
        self._pending: deque[Ticket] = deque()
        self._active: list[Ticket] = []
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="zoo-scheduler", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        """Sessions admitted or waiting."""
        with self._cv:
            return len(self._pending) + len(self._active)

    def submit(self, job: Job, deliver: Delivery) -> Ticket:
        """Queue a prepared job; raises Busy when ``max_sessions`` are already in flight."""
        with self._cv:
            if len(self._pending) + len(self._active) >= self.max_sessions:
                raise Busy(f"all {self.max_sessions} session slots are busy")
            ticket = Ticket(next(self._ids), job, deliver)
            self._pending.append(ticket)
            self._cv.notify()
            return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a session; its slot is freed before the next decode step."""
        with self._cv:
            ticket.cancelled = True
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._pending or self._active or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    return
                joining = list(self._pending)
                self._pending.clear()
            for ticket in joining:  # prefill between steps, in arrival order
                if ticket.cancelled:
                    continue
                try:
                    self.stepper.start(ticket.job)
                except Exception as err:  # noqa: BLE001 - reported to that session only
                    self._finish(ticket, err)
                    continue
                self._active.append(ticket)
                self._deliver(ticket)
            self._active = [t for t in self._active if not self._drop_if_over(t)]
            running = [t for t in self._active if not t.job.done]
            if running:
                try:
                    self.stepper.step([t.job for t in running])
                    self.steps += 1
                except Exception as err:  # noqa: BLE001 - a failed batched pass fails its sessions
                    log.exception("a batched step failed for %d session(s)", len(running))
                    for ticket in running:
                        self._finish(ticket, err)
                    self._active = [t for t in self._active if t not in running]
                    continue
                for ticket in running:
                    self._deliver(ticket)
            self._active = [t for t in self._active if not self._drop_if_over(t)]

    def _deliver(self, ticket: Ticket) -> None:
        """Its output so far (even from a job that just failed), then its error comes with
        ``_drop_if_over``."""
        try:
            chunk = ticket.job.poll()
        except Exception as err:  # noqa: BLE001 - reported to that session only
            log.exception("a session's poll failed")
            ticket.error = err
            return
        if chunk is not None and not ticket.cancelled:
            ticket.deliver(chunk)

    def _drop_if_over(self, ticket: Ticket) -> bool:
        error = ticket.error or ticket.job.error
        if ticket.cancelled or ticket.job.done or error is not None:
            self._finish(ticket, error)
            return True
        return False

    def _finish(self, ticket: Ticket, error: Exception | None) -> None:
        try:
            self.stepper.release(ticket.job)
        finally:
            if not ticket.cancelled:  # a cancelled session's reader is gone
                ticket.deliver(error)


class OneSlotSteppers:
    """``respond()`` as a thin loop over a model's batched step: one job driven alone on a
    one-slot stepper. The stepper (and its caches) is kept for the next reply; a reply that starts
    while another is running gets a fresh one, so concurrent calls never share a slot."""

    def __init__(self, make: Callable[[], Stepper]) -> None:
        self._make = make
        self._idle: Stepper | None = None
        self._lock = threading.Lock()

    def stream(self, job: Job) -> Iterator[Chunk]:
        with self._lock:
            stepper, self._idle = self._idle, None
        stepper = stepper or self._make()
        try:
            stepper.start(job)
            while True:
                chunk = job.poll()
                if chunk is not None:
                    yield chunk
                if job.error is not None:
                    raise job.error
                if job.done:
                    break
                stepper.step([job])
        finally:
            stepper.release(job)
            with self._lock:
                self._idle = stepper
