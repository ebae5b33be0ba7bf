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
``model.duplex_stepper(max_sessions)``:

    handle = stepper.open(options, prompt=None, sample_rate=None)  # a slot (duplex worker thread)
    stepper.step(handles, frames)  # one input frame per handle -> per handle its next output frame,
                                   #   or the Exception that ended (and closed) that session alone
    stepper.close(handle)          # free its slot
    stepper.open_many(options, prompt, sample_rate)  # optional (BatchOpener): a burst, one prefill

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
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .admission import PREFILL_POSITIONS, Admissions
from .types import BatchOpener, BatchStarter, Chunk, ChunkedStarter, DuplexStepper, Job, Stepper

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


class Busy(Exception):
    """Every session slot (of replies, or of duplex sessions) is taken."""


class WorkerThread:
    """The one thread that owns a stepper: callers on other threads hand it work under ``_cv``
    and notify it; ``stop`` ends it between steps."""

    def __init__(self, name: str) -> None:
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)


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
