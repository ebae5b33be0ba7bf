"""The loaded model behind every route: admission (session slots), input preparation off the event
loop, the batched scheduler, and metrics. ``Service.stream`` is one reply as an async iterator."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any, AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

import zoo
from zoo.core.scheduler import Busy, Scheduler

from .errors import report_failure


class ApiError(Exception):
    """A refusal with an HTTP status and a short machine-readable kind."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None, *,
                 reported: bool = False) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}
        self.reported = reported  # already logged and counted (Service.refuse): not again


class GenerationFailed(Exception):
    """The model failed during a reply (already logged and counted by Service.stream)."""


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self.sessions_active = Gauge("zoo_sessions_active", "replies being generated or prepared", registry=r)
        self.sessions_total = Counter("zoo_sessions_total", "replies accepted", registry=r)
        self.ttfa = Histogram("zoo_ttfa_seconds", "request complete -> first audio", registry=r,
                              buckets=(0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.rtf = Histogram("zoo_rtf", "compute time / audio time per reply", registry=r,
                             buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 5, 10))
        self.errors = Counter("zoo_errors_total", "refused or failed requests, by kind", ["kind"], registry=r)
        self.stopped = Counter("zoo_replies_stopped_total",
                               "replies stopped before their end (client gone, cancel, barge-in)", registry=r)
        # full-duplex sessions (serving/duplex.py)
        self.duplex_sessions_active = Gauge("zoo_duplex_sessions_active", "duplex sessions connected", registry=r)
        self.duplex_sessions_total = Counter("zoo_duplex_sessions_total", "duplex sessions accepted", registry=r)
        self.duplex_step_seconds = Histogram("zoo_duplex_step_seconds", "one batched duplex step (all sessions in it)",
                                             registry=r, buckets=(0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.125,
                                                                  0.15, 0.2, 0.3, 0.5, 1, 2))
        self.duplex_batch_size = Histogram("zoo_duplex_batch_size", "sessions stepped together per duplex step",
                                           registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        self.duplex_frames = Counter("zoo_duplex_frames_total", "duplex input frames stepped", registry=r)
        self.duplex_dropped = Counter("zoo_duplex_frames_dropped_total",
                                      "duplex input frames dropped (client over its backlog)", registry=r)
        self.duplex_frame_latency = Histogram("zoo_duplex_frame_latency_seconds",
                                              "duplex input frame received -> its answer sent", registry=r,
                                              buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5))


class Service:
    """``duplex_sessions``: slots of the full-duplex worker (serving/duplex.py), built only when
    the model's card says duplex (default: ``max_sessions``); ``duplex_prompt``: (audio, rate)
    that seeds every duplex session unless its client gives one."""

    def __init__(self, model: zoo.VoiceModel, max_sessions: int, *, duplex_sessions: int | None = None,
                 duplex_prompt=None) -> None:
        self.model, self.max_sessions = model, max_sessions
        self.stepper = model.stepper(max_sessions)
        self.scheduler = Scheduler(self.stepper, max_sessions)
        # input decoding and audio encoding run here: off the event loop and off the decode thread
        self.prepare_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zoo-prepare")
        self.in_flight = 0
        self.metrics = Metrics()
        self.option_names = {f.name for f in fields(model.options_class)}
        self.duplex = None
        if model.card.duplex:
            from .duplex import DuplexHub

            self.duplex = DuplexHub(model, duplex_sessions or max_sessions, self.metrics, prompt=duplex_prompt)

    def close(self) -> None:
        if self.duplex is not None:
            self.duplex.shutdown()
        self.scheduler.close()
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)

    def options(self, values: dict[str, Any]):
        if not isinstance(values, dict):
            raise ApiError(400, "bad_request", f"options must be an object of name: value, got {type(values).__name__}")
        unknown = sorted(set(values) - self.option_names)
        if unknown:
            raise ApiError(400, "bad_request", f"unknown option(s) {unknown}; known: {sorted(self.option_names)}")
        try:
            return self.model.options(values)
        except zoo.OptionsError as err:
            raise ApiError(422, "bad_option", str(err)) from None

    def refuse(self, status: int, kind: str, message: str, **headers) -> ApiError:
        """A refusal, logged (with the request id) and counted."""
        report_failure(self.metrics, kind, message, level=logging.WARNING)
        return ApiError(status, kind, message, headers=headers, reported=True)

    def _admit(self) -> None:
        if self.in_flight >= self.max_sessions:
            raise self.refuse(503, "busy", f"all {self.max_sessions} session slots are busy; retry shortly",
                              **{"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.inc()

    def _leave(self) -> None:
        self.in_flight -= 1
        self.metrics.sessions_active.dec()

    async def stream(self, audio: Any, sample_rate: int | None, options, received: float,
                     history: list | None = None) -> AsyncIterator[zoo.Chunk]:
        """One reply. ``received``: when the request was complete (perf_counter), for TTFA.
        ``history``: earlier ``chunk.turn`` records (multi-turn models).
        Closing the iterator early stops the generation and frees the slot before the next step."""
        self._admit()
        try:
            loop = asyncio.get_running_loop()
            try:
                job = await loop.run_in_executor(self.prepare_pool, self.stepper.prepare, audio, sample_rate, options,
                                                 history)
            except zoo.AudioTooLong as err:
                raise self.refuse(413, "audio_too_long", str(err)) from None
            except zoo.AudioInputError as err:
                raise self.refuse(400, "bad_audio", str(err)) from None
            except zoo.ZooError as err:
                raise self.refuse(400, "bad_request", str(err)) from None
            queue: asyncio.Queue = asyncio.Queue()
            try:
                ticket = self.scheduler.submit(job, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
            except Busy as err:
                raise self.refuse(503, "busy", str(err), **{"Retry-After": "1"}) from None
            first_audio, samples, finished = None, 0, False
            try:
                while True:
                    item = await queue.get()
                    if item is None:
                        finished = True
                        return
                    if isinstance(item, Exception):
                        finished = True
                        report_failure(self.metrics, "generation", f"the model failed mid-reply: {item!r}", exc=item)
                        raise GenerationFailed(f"the model failed: {type(item).__name__}: {item}")
                    if item.audio.size and first_audio is None:
                        first_audio = time.perf_counter()
                        self.metrics.ttfa.observe(first_audio - received)
                    samples += item.audio.size
                    yield item
            finally:
                if not finished:
                    self.metrics.stopped.inc()
                self.scheduler.cancel(ticket)
                if samples:
                    seconds = samples / self.model.card.output_sample_rate
                    self.metrics.rtf.observe((time.perf_counter() - received) / seconds)
        finally:
            self._leave()
