"""``RemoteService``: the Service port over a Serve deployment handle, so the protocol modules
(serving/protocols) and create_app run unchanged in the Ray front: ``model`` (a ``ModelView``:
the card and the option rules, nothing loaded), ``options`` and ``refuse`` (Service's own code),
``stream`` (one reply from whichever replica Serve picks, streamed as it is made), ``metrics``,
``in_flight``, ``max_sessions``, ``duplex`` (a duplex.py RemoteDuplexHub for duplex models, set by
the Ingress; None otherwise).

Failures stay visible: a replica's refusal becomes the same ApiError (503 busy, 413, 400) as in
the single-process server; a reply whose replica fails or dies mid-way raises GenerationFailed
(the chat route then cuts the stream, realtime sends an ``error`` event), logged with the request
id and counted (``zoo_errors_total{kind="replica_lost"}``); Serve's own back-pressure (every
replica full and the caller's queue full) is 503 busy at once.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

import zoo
from zoo.core.types import VoiceModel

from ..errors import ApiError, GenerationFailed, report_failure, request_id
from ..metrics import Metrics
from ..service import Service


class ModelView:
    """The parts of a loaded model the front reads (ModelReplica.info()), with the model's own
    option conversion (``VoiceModel.options``: defaults, reply cap, validation)."""

    options = VoiceModel.options

    def __init__(self, card: zoo.ModelCard, options_class: type, random_weights: str | None,
                 default_max_new_tokens: int | None, **_) -> None:
        self.card, self.options_class = card, options_class
        self.random_weights, self.default_max_new_tokens = random_weights, default_max_new_tokens


class RemoteService:
    """``handle``: the model's DeploymentHandle; ``info``: ModelReplica.info(); ``replicas``: a
    callable giving the number of running replicas (the capacity); ``per_replica``: a Counter
    labelled (model, replica) of the replies each replica took; ``dispatch``: a Histogram of the
    time from the call to the replica's first item."""

    options = Service.options
    refuse = Service.refuse

    def __init__(self, handle, info: dict[str, Any], metrics: Metrics, replicas=lambda: 1, per_replica=None,
                 dispatch=None) -> None:
        self.handle, self.model, self.metrics = handle, ModelView(**info), metrics
        self.slots_per_replica, self.replicas = info["max_sessions"], replicas
        self.in_flight = 0
        self.duplex = None
        self.per_replica = per_replica  # Counter(model, replica): is the load spread?
        self.dispatch = dispatch  # Histogram: call sent -> the replica's first item (what Ray adds per reply)

    @property
    def max_sessions(self) -> int:
        return self.slots_per_replica * self.replicas()

    def close(self) -> None:
        pass  # the replicas belong to Serve

    async def stream(self, audio: Any, sample_rate: int | None, options, received: float,
                     history: list | None = None, image: Any = None) -> AsyncIterator[zoo.Chunk]:
        """One reply, as Service.stream (``image``: bytes of an image file, cards with image_input). Closing the iterator early cancels the call, and the
        replica frees the slot."""
        if not self.replicas():  # none running (starting, restarting): refused at once, not queued
            raise self.refuse(503, "unavailable", f"no {self.model.card.name} replica is running yet; retry shortly "
                                                  "(GET /health says the replicas' states)", **{"Retry-After": "5"})
        if self.in_flight >= self.max_sessions:  # every running replica's slots are taken: refused at once
            raise self.refuse(503, "busy", f"all {self.max_sessions} {self.model.card.name} session slots are busy; "
                                           "retry shortly", **{"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.inc()
        sent = time.perf_counter()
        items = self.handle.options(stream=True).stream.remote(audio, sample_rate, options, history, request_id.get(), image)
        first_audio, finished = None, False
        try:
            try:
                async for item in items:
                    if item[0] == "replica":
                        if self.dispatch is not None:
                            self.dispatch.observe(time.perf_counter() - sent)
                        if self.per_replica is not None:
                            self.per_replica.labels(self.model.card.name, item[1]).inc()
                        continue
                    if item[0] == "refused":
                        _, status, kind, message, headers = item
                        finished = True
                        raise self.refuse(status, kind, message, **headers)
                    if item[0] == "failed":
                        finished = True
                        report_failure(self.metrics, "generation", f"{self.model.card.name}: {item[1]}")
                        raise GenerationFailed(item[1])
                    chunk = item[1]
                    if chunk.audio.size and first_audio is None:
                        first_audio = time.perf_counter()
                        self.metrics.ttfa.observe(first_audio - received)
                    yield chunk
                finished = True
            except BackPressureError:
                finished = True
                raise self.refuse(503, "busy", f"every {self.model.card.name} replica is busy; retry shortly",
                                  **{"Retry-After": "1"}) from None
            except DeploymentUnavailableError as err:
                finished = True
                raise self.refuse(503, "unavailable", f"{self.model.card.name} has no replica running: {err}",
                                  **{"Retry-After": "5"}) from None
            except (ApiError, GenerationFailed, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as err:  # noqa: BLE001 - a replica died or Ray failed: the reply fails visibly
                finished = True
                report_failure(self.metrics, "replica_lost",
                               f"{self.model.card.name}: the replica serving this reply failed: {err!r}", exc=err)
                raise GenerationFailed(f"the {self.model.card.name} replica serving this reply was lost "
                                       f"({type(err).__name__}); retry") from None
        finally:
            if not finished:
                self.metrics.stopped.inc()
                items.cancel()  # the replica's generator is cancelled: its slot is freed
            self.in_flight -= 1
            self.metrics.sessions_active.dec()
