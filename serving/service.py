"""The loaded model behind every route: admission (session slots), input preparation off the event
loop, the batched scheduler, and metrics. ``Service.stream`` is one reply as an async iterator."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zoo
from zoo.core.admission import PREFILL_POSITIONS
from zoo.core.errors import UnknownOption
from zoo.core.scheduler import Busy, DuplexScheduler, Scheduler
from zoo.core.types import prepare_job

from .errors import ApiError, GenerationFailed, report_failure
from .metrics import Metrics


class Service:
    """``duplex_sessions``: slots of the full-duplex scheduler (zoo.core.scheduler), built only when
    the model's card says duplex (default: ``max_sessions``); ``duplex_prompt``: (audio, rate)
    that seeds every duplex session unless its client gives one; ``prefill_batch``: how many new
    replies join between two decode steps, ``prefill_positions``: how many prompt positions at most
    are prefilled between two steps (None: no bound; a longer prompt starts in parts), both
    zoo.core.scheduler.Scheduler's."""

    def __init__(self, model: zoo.VoiceModel, max_sessions: int, *, duplex_sessions: int | None = None,
                 duplex_prompt=None, prefill_batch: int = 8,
                 prefill_positions: int | None = PREFILL_POSITIONS) -> None:
        self.model, self.max_sessions = model, max_sessions
        self.stepper = model.stepper(max_sessions)
        self.scheduler = Scheduler(self.stepper, max_sessions, prefill_batch=prefill_batch,
                                   prefill_positions=prefill_positions)
        # input decoding and audio encoding run here: off the event loop and off the decode thread
        self.prepare_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zoo-prepare")
        self.in_flight = 0
        self.metrics = Metrics()
        self.duplex = None
        if model.card.duplex:
            slots = duplex_sessions or max_sessions
            self.duplex = DuplexScheduler(model.duplex_stepper(slots), slots, model.card.frame_samples,
                                          prompt=duplex_prompt, on_step=self.metrics.duplex_step)

    def close(self) -> None:
        if self.duplex is not None:
            self.duplex.stop()
        self.scheduler.stop()
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)

    def options(self, values: dict[str, Any]):
        if not isinstance(values, dict):
            raise ApiError(400, "bad_request", f"options must be an object of name: value, got {type(values).__name__}")
        try:
            return self.model.options(values)
        except UnknownOption as err:  # a field this request should not carry at all
            raise ApiError(400, "bad_request", str(err)) from None
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
                     history: list | None = None, image: Any = None) -> AsyncIterator[zoo.Chunk]:
        """One reply. ``received``: when the request was complete (perf_counter), for TTFA.
        ``history``: earlier ``chunk.turn`` records (multi-turn models). ``image``: what the
        question is about (cards with image_input; others answer 400 unsupported).
        Closing the iterator early stops the generation and frees the slot before the next step."""
        self._admit()
        try:
            loop = asyncio.get_running_loop()
            try:
                job = await loop.run_in_executor(self.prepare_pool, prepare_job, self.stepper, self.model.card, audio,
                                                 sample_rate, options, history, image)
            except zoo.UnsupportedError as err:
                raise self.refuse(400, "unsupported", str(err)) from None
            except zoo.ImageInputError as err:
                raise self.refuse(400, "bad_image", str(err)) from None
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
