"""``ModelReplica``: the Serve deployment class of one model. Each replica loads the model once on
its own device and holds one Service (session slots, batched scheduler), exactly as the
single-process server does; Serve routes at most ``max_sessions`` replies to it at once
(``max_ongoing_requests``, set in deploy.py), so a replica with free slots gets new work.

A reply leaves the replica as a stream of tagged items rather than exceptions, because an
exception crossing Ray arrives wrapped (``RayTaskError``) and its fields (HTTP status, kind) are
best carried as data: first ``("replica", tag)``, then ``("chunk", Chunk)`` (text-only chunks
are held up to TEXT_HOLD_S and sent with the next one: fewer items, the same audio and text),
``("refused", status, kind, message, headers)`` (busy, bad audio: before any chunk) or ``("failed", message)`` (the model failed mid-reply; already
logged and counted here with the replica's traceback). A replica process that dies mid-reply ends
the stream with a Ray error at the caller instead, which remote.py turns into a visible failure.
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import numpy as np

from zoo.core.admission import PREFILL_POSITIONS
from zoo.core.types import Chunk

from ..errors import ApiError, GenerationFailed, request_id
from ..service import Service

log = logging.getLogger("omni-zoo.replica")
# text-only chunks (a model's text before its first audio, or between audio blocks) wait up to this
# long for the next chunk and travel with it: each streamed item costs the replica and the front
# about a millisecond of CPU, which the model's own steps are short of on a busy machine
TEXT_HOLD_S = 0.05


def replica_tag() -> str:
    from ray import serve

    context = serve.get_replica_context()
    return context.replica_id.unique_id if getattr(context, "replica_id", None) else context.replica_tag


def merged(first: Chunk, second: Chunk) -> Chunk:
    """One chunk saying what two consecutive ones said."""
    audio = second.audio if not first.audio.size else np.concatenate([first.audio, second.audio])
    return Chunk(audio=audio, text=first.text + second.text, turn=second.turn)


class ModelReplica:
    """``spec``: ``model_args`` (the zoo/cli.py model flags as a dict: model, tiny, device, ...),
    ``max_sessions``, ``seed``, ``prefill_batch``, ``prefill_positions`` (see deploy.py ``ModelSpec``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from server import warm_up  # the single-process server's warm-up, so both start alike
        from zoo.cli import load_model, noise_notice

        from .local import keep_on_loopback

        keep_on_loopback()
        args = argparse.Namespace(**spec["model_args"])
        model = load_model(args, seed=spec.get("seed", 0))
        if model.random_weights:
            log.warning("%s", noise_notice(model))
        warm_up(model)
        self.service = Service(model, spec["max_sessions"], prefill_batch=spec.get("prefill_batch", 8),
                               prefill_positions=spec.get("prefill_positions", PREFILL_POSITIONS),
                               duplex_sessions=spec.get("duplex_sessions") or None)
        self.tag = replica_tag()
        log.info("replica of %s ready (%d session slots)", model.card.name, spec["max_sessions"])

    def info(self) -> dict[str, Any]:
        """What the front needs to validate options and describe the model without loading it."""
        model = self.service.model
        return {"card": model.card, "options_class": model.options_class, "random_weights": model.random_weights,
                "default_max_new_tokens": model.default_max_new_tokens, "max_sessions": self.service.max_sessions,
                "duplex_sessions": self.service.duplex.max_sessions if self.service.duplex is not None else 0}

    def load(self) -> dict[str, int]:
        return {"sessions": self.service.in_flight, "max_sessions": self.service.max_sessions}

    async def stream(self, audio, sample_rate: int | None, options, history: list | None, rid: str = "-",
                     image=None):
        """One reply (``Service.stream``), as tagged items. ``rid``: the front's request id, so the
        replica's log lines about this reply carry it too."""
        request_id.set(rid)  # each Serve request runs in its own task (context): no reset needed
        yield ("replica", self.tag)  # the front counts replies per replica (zoo_replica_replies_total)
        reply = self.service.stream(audio, sample_rate, options, received=time.perf_counter(), history=history,
                                     image=image)
        pending, since = None, 0.0  # text-only chunks held back to travel with the next one
        try:
            async for chunk in reply:
                now = time.perf_counter()
                if not chunk.audio.size and chunk.turn is None and (pending is None or now - since < TEXT_HOLD_S):
                    pending, since = (chunk, now) if pending is None else (merged(pending, chunk), since)
                    continue
                yield ("chunk", chunk if pending is None else merged(pending, chunk))
                pending = None
            if pending is not None:
                yield ("chunk", pending)
        except ApiError as err:  # refused (busy, bad audio): logged and counted by the service
            yield ("refused", err.status, err.kind, err.message, err.headers)
        except GenerationFailed as err:  # logged and counted by the service
            yield ("failed", str(err))
        finally:
            await reply.aclose()  # a caller that went away (cancelled) frees the slot here

    async def duplex(self, options, prompt, box, sid: str, rid: str = "-", chunks: bool = False):
        """One full-duplex session (serving/scale/duplex.py), for as long as the caller keeps the
        call: input frames pulled from ``box`` (a FrameBox) under ``sid``, answers yielded as
        ``("frame", ndarray)`` (``chunks``: ``("frame", Chunk)`` with the step's text piece);
        first ``("replica", tag)``; ``("refused", ...)`` when the slots are
        taken; ``("failed", message, is_input_error)`` when the session fails."""
        import asyncio

        import zoo
        from zoo.core.scheduler import Busy

        request_id.set(rid)
        hub = self.service.duplex
        if hub is None:
            yield ("refused", 400, "not_duplex", f"{self.service.model.card.name} is not a duplex model", {})
            return
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:  # the duplex worker thread
            loop.call_soon_threadsafe(answers.put_nowait, item)

        try:
            ticket = hub.reserve(options, deliver)
        except Busy as err:
            yield ("refused", 503, "busy", str(err), {"Retry-After": "1"})
            return
        if prompt is not None:
            ticket.prompt = prompt
        ticket.chunks = chunks

        async def pull() -> None:
            while (frames := await box.pull.remote(sid)) is not None:
                for frame in frames:
                    hub.push(ticket, frame)

        puller = asyncio.ensure_future(pull())
        try:
            yield ("replica", self.tag)
            while True:
                answer = asyncio.ensure_future(answers.get())
                await asyncio.wait({answer, puller}, return_when=asyncio.FIRST_COMPLETED)
                if not answer.done():  # the input ended: the session closed, or the front's box is gone
                    answer.cancel()
                    if not puller.cancelled() and puller.exception() is not None:
                        error = puller.exception()
                        log.error("duplex session %s: its input failed: %r", sid, error)
                        yield ("failed", f"the session's input was lost: {type(error).__name__}: {error}", False)
                    return
                item = answer.result()
                if isinstance(item, Exception):
                    yield ("failed", f"{type(item).__name__}: {item}", isinstance(item, zoo.ZooError))
                    return
                yield ("frame", item)
        finally:
            puller.cancel()
            hub.close(ticket)
