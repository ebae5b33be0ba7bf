"""One model, many sessions: the two schedulers every server drives, both only through the
contract in zoo.core.types. ``Scheduler``: half-duplex replies; a worker thread runs the model's
batched decode step over every active session, admitting new sessions (prefill) and dropping
finished or cancelled ones between steps. ``DuplexScheduler``: full-duplex sessions stepped frame
by frame together (see its docstring).

A model takes part in replies by returning a ``Stepper`` from ``model.stepper(max_sessions)``:

    job = stepper.prepare(audio, sample_rate, options, history)  # validate + encode input (any thread)
    stepper.start(job)        # prefill: the job joins the batch (scheduler thread)
    stepper.start_many(jobs)  # optional (BatchStarter): several arrivals' prefills in one forward
    stepper.start_part(job, n)  # optional (ChunkedStarter): the next n positions of a long prompt
    stepper.step(jobs)        # one batched decode step for all active jobs (scheduler thread)
    job.poll() -> Chunk|None  # output produced since the last poll; job.done when finished
    stepper.release(job)      # free its slot (KV-cache rows)

and in full-duplex sessions (cards that say duplex) by returning a ``DuplexStepper`` from
``model.duplex_stepper(max_sessions)``: see zoo.core.duplex_scheduler (its ``DuplexScheduler`` is
found here too, beside ``Scheduler``). Who joins between two steps: zoo.core.admission.

Failures stay with their session. A stepper does each session's own share of a step (sampling
with its options, routing its ids, decoding its text and audio) inside ``isolate(job)`` (zoo.core.isolation): an
exception there sets ``job.error`` and ``job.done`` and the step goes on for the others, which
get exactly what they would have got with that session cancelled at that step. The scheduler
then hands ``job.error`` to that session's ticket only (so does an exception from its ``start``
or ``poll``). Only a failure of the batched work itself (the forward pass over every session,
a batched decode that cannot be split by session) still fails every session in the batch.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .admission import PREFILL_POSITIONS, Admissions
from .duplex_scheduler import DuplexScheduler, DuplexTicket, StepReport
from .types import BatchStarter, Chunk, ChunkedStarter, Job, Stepper
from .worker import Busy, WorkerThread

__all__ = ["Busy", "Delivery", "DuplexScheduler", "DuplexTicket", "OneSlotSteppers", "Scheduler", "StepReport",
           "Ticket", "WorkerThread"]

log = logging.getLogger("zoo.sessions")

# What a ticket's callback receives: a Chunk, an Exception (the job failed), or None (finished).
Delivery = Callable[["Chunk | Exception | None"], None]


@dataclass
class Ticket:
    id: int
    job: Job
    deliver: Delivery
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    error: Exception | None = None  # its job's poll() raised
    prefilled: int = 0  # prompt positions prefilled so far (a ChunkedStarter's job, in parts)


class Scheduler(WorkerThread):
    """Between two decode steps the waiting jobs that ``Admissions`` lets in join (in arrival
    order, at most ``prefill_batch`` of them, in one ``start_many`` when the stepper is a
    ``BatchStarter``): a burst of arrivals is prefilled in batches interleaved with the running
    sessions' steps, so it neither stalls the sessions already speaking for all its prefills nor
    waits in line one prefill each. A ``ChunkedStarter``'s prefill per step is also bounded by
    ``prefill_positions`` (``None``: no bound): a longer prompt starts in parts, one per step
    (zoo.core.admission)."""

    def __init__(self, stepper: Stepper, max_sessions: int, prefill_batch: int = 8,
                 prefill_positions: int | None = PREFILL_POSITIONS) -> None:
        super().__init__("zoo-scheduler")
        chunked = isinstance(stepper, ChunkedStarter)
        self._waiting: Admissions[Ticket] = Admissions(
            prefill_batch, prefill_positions, stepper.prompt_length if chunked else None)
        self.stepper, self.max_sessions = stepper, max_sessions
        self._active: list[Ticket] = []
        self._ids = itertools.count(1)
        self.steps = 0
        self._thread.start()

    @property
    def load(self) -> int:
        """Sessions admitted or waiting."""
        with self._cv:
            return len(self._waiting) + len(self._active)

    @property
    def prefill_positions(self) -> int | None:
        """The prompt positions prefilled at most between two steps (None: no bound, or a
        stepper that cannot start a job in parts)."""
        return self._waiting.positions

    def submit(self, job: Job, deliver: Delivery) -> Ticket:
        """Queue a prepared job; raises Busy when ``max_sessions`` are already in flight."""
        with self._cv:
            if len(self._waiting) + len(self._active) >= self.max_sessions:
                raise Busy(f"all {self.max_sessions} session slots are busy")
            ticket = Ticket(next(self._ids), job, deliver)
            self._waiting.pending.append(ticket)
            self._cv.notify()
            return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a session; its slot is freed before the next decode step."""
        with self._cv:
            ticket.cancelled = True
            self._cv.notify()

    # -- worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._active or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    return
                tick = self._waiting.tick()
            if tick.carried is not None:
                self._prefill_part(*tick.carried)
            self._join([t for t in tick.joining if not t.cancelled])
            if tick.parted is not None:
                self._prefill_part(*tick.parted)
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

    def _prefill_part(self, ticket: Ticket, positions: int) -> None:
        """The next ``positions`` of a long prompt; the job joins the running sessions once its
        whole prompt is in. A cancelled job gives its slot back; a failed one hears why alone."""
        if ticket.cancelled:
            with self._cv:
                self._waiting.drop_unfinished()
            self._finish(ticket, None)
            return
        try:
            finished = self.stepper.start_part(ticket.job, positions)
        except Exception as err:  # noqa: BLE001 - reported to that session only
            with self._cv:
                self._waiting.drop_unfinished()
            self._finish(ticket, err)
            return
        with self._cv:
            self._waiting.part_done(ticket, positions, finished)
        if finished:
            self._active.append(ticket)
            self._deliver(ticket)

    def _join(self, tickets: list[Ticket]) -> None:
        """Prefill the joining jobs: together when the stepper can, else one by one."""
        if len(tickets) > 1 and isinstance(self.stepper, BatchStarter):
            try:
                self.stepper.start_many([t.job for t in tickets])
            except Exception as err:  # noqa: BLE001 - a failed batched prefill fails its sessions
                log.exception("a batched prefill failed for %d session(s)", len(tickets))
                for ticket in tickets:
                    self._finish(ticket, err)
                return
            started = tickets  # a job that could not start carries its error: dropped after delivery
        else:
            started = []
            for ticket in tickets:
                try:
                    self.stepper.start(ticket.job)
                except Exception as err:  # noqa: BLE001 - reported to that session only
                    self._finish(ticket, err)
                    continue
                started.append(ticket)
        for ticket in started:
            self._active.append(ticket)
            self._deliver(ticket)

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
