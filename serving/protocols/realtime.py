"""``WS /v1/realtime``, served for every model: live sessions over WebSocket, speaking a subset of
the OpenAI Realtime (GA) event protocol, so the official ``openai`` SDK realtime client (and tools
built on it) can hold a conversation.

Client -> server: session.update, input_audio_buffer.append | commit | clear,
conversation.item.create (an image: a user message with one ``input_image`` part, for cards with
image_input; the latest image goes with every later turn of the session), response.create,
response.cancel. Server -> client: session.created | updated, input_audio_buffer.speech_started |
speech_stopped | committed | cleared, conversation.item.added | done, response.created,
response.output_audio.delta,
response.output_audio_transcript.delta, response.output_audio.done,
response.output_audio_transcript.done, response.done, error.

Audio on the wire is base64 PCM16 mono at 24 kHz both ways, resampled to and from the model's rates
here. Turn detection: "server_vad" (Silero VAD; a pause ends the turn and starts the reply; speech
during a reply cancels it: barge-in) or null (the client commits and asks for a response).
Model options: ``session.max_output_tokens`` / ``response.max_output_tokens`` (decode steps) and
``session.zoo.options`` (any of the model's options, e.g. temperature).

Every field of every client event is checked (serving/protocols/realtime_schema.py): a malformed event gets
an ``error`` event (``error: {type, code, message, event_id}``, echoing the client's event_id) and
the session goes on. A reply that fails gets an ``error`` event (type ``server_error``) and a
``response.done`` with status ``failed``; the failure is logged with the session and request ids
and counted. A session is closed after ``idle_timeout_s`` without a client event unless a reply
is running; the close reason says why.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import itertools
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
import soxr
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from zoo.core.audio import float_to_pcm16, pcm16_to_float, resample
from zoo.core.errors import ImageInputError
from zoo.core.image import load_image

from ..errors import ApiError, GenerationFailed, report_failure
from ..http_input import decode_base64_image
from ..parsing import json_object
from ..service import Service
from ..vad import VAD_RATE, SpeechDetector
from . import realtime_schema as schema
from .realtime_schema import DEFAULT_TURN_DETECTION, WIRE_RATE, ProtocolError

MAX_WS_MESSAGE_BYTES = 16 * 1024 * 1024
MIN_COMMIT_MS = 100
IDLE_TIMEOUT_S = 300.0  # a session with no client event (and no reply running) for this long is closed


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeSession:
    def __init__(self, ws: WebSocket, service: Service, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.ws, self.service, self.card = ws, service, service.model.card
        self.idle_timeout_s = idle_timeout_s
        self.replied_at = -float("inf")  # when the last reply ended (time.monotonic)
        self.config: dict[str, Any] = {
            "type": "realtime", "object": "realtime.session", "id": _id("sess"), "model": self.card.name,
            "output_modalities": ["audio"], "instructions": "", "max_output_tokens": "inf",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": WIRE_RATE},
                                "turn_detection": dict(DEFAULT_TURN_DETECTION)},
                      "output": {"format": {"type": "audio/pcm", "rate": WIRE_RATE}}},
            "zoo": {"options": {}, "random_weights": service.model.random_weights is not None},
        }
        self.buffer: list[np.ndarray] = []  # input audio at 24 kHz since the last commit
        self.turn: np.ndarray | None = None  # the last committed turn
        self.history: list = []  # the finished exchanges of this session (chunk.turn records)
        self.image: bytes | None = None  # the latest input_image (cards with image_input)
        self.detector: SpeechDetector | None = None
        self.to_vad = soxr.ResampleStream(WIRE_RATE, VAD_RATE, 1, dtype="float32")
        self.response: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()
        self.events = itertools.count(1)
        self._configure_vad()

    # -- plumbing -----------------------------------------------------------------------------
    async def send(self, event: dict) -> None:
        event = {"event_id": f"event_{next(self.events)}", **event}
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event))

    async def error(self, code: str, message: str, client_event: str | None = None,
                    kind: str = "invalid_request_error", *, reported: bool = False) -> None:
        """An ``error`` event; logged and counted as ``realtime_<code>`` unless ``reported`` already."""
        if not reported:
            report_failure(self.service.metrics, f"realtime_{code}", f"session {self.config['id']}: {message}",
                           level=logging.WARNING)
        await self.send({"type": "error", "error": {"type": kind, "code": code,
                                                     "message": message, "event_id": client_event}})

    async def run(self) -> None:
        await self.ws.accept()
        await self.send({"type": "session.created", "session": self.config})
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.receive(), self.idle_timeout_s)
                except TimeoutError:
                    if self.response is not None or time.monotonic() - self.replied_at < self.idle_timeout_s:
                        continue  # the client is listening to a reply (or just heard one): not idle
                    reason = f"idle timeout: no client event for {self.idle_timeout_s:g} s"
                    await self.error("idle_timeout", reason)
                    await self.ws.close(code=1000, reason=reason)
                    return
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is None:
                    await self.error("binary_not_supported", "send JSON text events")
                    continue
                await self.handle(message["text"])
        except WebSocketDisconnect:
            return
        finally:
            await self.cancel_response()

    async def handle(self, text: str) -> None:
        try:
            event = json_object(text)
        except ValueError as err:
            await self.error("invalid_json", f"event is not a JSON object: {err}")
            return
        client_event = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        try:
            schema.event_id(event)
            kind = event.get("type")
            handler = self.HANDLERS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise ProtocolError("unknown_event", f"unsupported event type {kind!r}; supported: {sorted(self.HANDLERS)}")
            await handler(self, event)
        except ProtocolError as err:
            await self.error(err.code, str(err), client_event)
        except WebSocketDisconnect:
            raise
        except Exception as err:  # noqa: BLE001 - a bug must not end the session; it is logged and counted
            report_failure(self.service.metrics, "realtime_internal",
                           f"session {self.config['id']}: event {event.get('type')!r} failed: {err!r}", exc=err)
            await self.error("server_error", "the server failed on this event; its log has the details",
                             client_event, kind="server_error", reported=True)

    # -- session ------------------------------------------------------------------------------
    def _configure_vad(self) -> None:
        detection = self.config["audio"]["input"]["turn_detection"]
        self.detector = None if detection is None else SpeechDetector(
            threshold=float(detection["threshold"]), silence_ms=detection["silence_duration_ms"],
            prefix_padding_ms=detection["prefix_padding_ms"])

    async def on_session_update(self, event: dict) -> None:
        update = schema.expect_object(event.get("session"), "session.update's 'session'")
        config = copy.deepcopy(self.config)
        audio = schema.expect_object(update.get("audio"), "session.audio", optional=True)
        for direction in ("input", "output"):
            settings = schema.expect_object(audio.get(direction), f"session.audio.{direction}", optional=True)
            if settings.get("format") is not None:
                schema.audio_format(settings["format"], f"session.audio.{direction}.format")
        inputs = schema.expect_object(audio.get("input"), "session.audio.input", optional=True)
        if "turn_detection" in inputs:
            config["audio"]["input"]["turn_detection"] = schema.turn_detection(inputs["turn_detection"])
        if "instructions" in update:
            config["instructions"] = schema.instructions(update["instructions"])
        if "output_modalities" in update:
            config["output_modalities"] = schema.output_modalities(update["output_modalities"])
        if "max_output_tokens" in update:
            config["max_output_tokens"] = self._checked_tokens(update["max_output_tokens"])
        if "zoo" in update:
            zoo_settings = schema.expect_object(update["zoo"], "session.zoo", optional=True)
            options = schema.expect_object(zoo_settings.get("options"), "session.zoo.options", optional=True)
            self._model_options(options)
            config["zoo"]["options"] = options
        self.config = config
        self._configure_vad()
        await self.send({"type": "session.updated", "session": self.config})

    def _model_options(self, values: dict):
        try:
            return self.service.options(values)
        except ApiError as err:
            raise ProtocolError(err.kind, err.message) from None

    def _checked_tokens(self, value) -> int | str:
        value = schema.max_output_tokens(value)
        if value != "inf":
            self._model_options({**self.config["zoo"]["options"], "max_new_tokens": value})
        return value

    # -- input audio --------------------------------------------------------------------------
    async def on_append(self, event: dict) -> None:
        encoded = event.get("audio")
        if not isinstance(encoded, str):
            raise ProtocolError("invalid_audio", f"'audio' must be a base64 PCM16 string, got {type(encoded).__name__}")
        # a first, rough check on the base64 length, so a huge event is refused before it is decoded
        if self.buffered_seconds() + len(encoded) * 3 / 4 / 2 / WIRE_RATE > self.card.max_input_seconds + 1:
            raise ProtocolError("input_too_long", f"the input audio buffer holds at most {self.card.max_input_seconds:g} s; commit or clear it")
        try:
            pcm = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_audio", "'audio' must be base64 PCM16") from None
        if len(pcm) % 2:
            raise ProtocolError("invalid_audio", "PCM16 needs an even number of bytes")
        audio = pcm16_to_float(pcm)
        if self.buffered_seconds() + audio.size / WIRE_RATE > self.card.max_input_seconds:
            raise ProtocolError("input_too_long", f"the input audio buffer holds at most {self.card.max_input_seconds:g} s; commit or clear it")
        self.buffer.append(audio)
        if self.detector is None:
            return
        events = await asyncio.to_thread(self.detector.feed, self.to_vad.resample_chunk(audio))
        for kind in events:
            if kind == "start":
                await self.send({"type": "input_audio_buffer.speech_started", "item_id": _id("item"),
                                 "audio_start_ms": int(self.buffered_seconds() * 1000)})
                if self.response and self.config["audio"]["input"]["turn_detection"].get("interrupt_response", True):
                    await self.cancel_response()  # barge-in
            else:
                await self.send({"type": "input_audio_buffer.speech_stopped", "item_id": _id("item"),
                                 "audio_end_ms": int(self.buffered_seconds() * 1000)})
                await self.commit()
                if self.config["audio"]["input"]["turn_detection"]["create_response"]:
                    await self.start_response({})
        if not self.detector.speaking:  # between turns keep only the pre-speech padding
            self._trim_to_padding()

    def buffered_seconds(self) -> float:
        return sum(a.size for a in self.buffer) / WIRE_RATE

    def _trim_to_padding(self) -> None:
        detection = self.config["audio"]["input"]["turn_detection"] or {}
        keep = int(WIRE_RATE * (detection.get("prefix_padding_ms", 300) + 500) / 1000)
        audio = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.float32)
        self.buffer = [audio[-keep:]] if audio.size else []

    async def commit(self) -> None:
        audio = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.float32)
        if audio.size < WIRE_RATE * MIN_COMMIT_MS / 1000:
            raise ProtocolError("input_audio_buffer_commit_empty",
                                f"buffer too small: at least {MIN_COMMIT_MS} ms of audio is needed to commit")
        self.turn, self.buffer = audio, []
        await self.send({"type": "input_audio_buffer.committed", "item_id": _id("item"), "previous_item_id": None})

    async def on_commit(self, event: dict) -> None:
        await self.commit()

    async def on_clear(self, event: dict) -> None:
        self.buffer = []
        if self.detector is not None:
            self.detector.reset()
        await self.send({"type": "input_audio_buffer.cleared"})

    # -- conversation items: images ------------------------------------------------------------
    async def on_item_create(self, event: dict) -> None:
        url = schema.input_image(event.get("item"))
        if not self.card.image_input:
            raise ProtocolError("image_not_supported", f"{self.card.name} does not take images")
        try:
            data = decode_base64_image(url, "input_image.image_url")
            await asyncio.to_thread(load_image, data)  # refused now (bounded decode), not at the next turn
        except ApiError as err:
            raise ProtocolError("invalid_image", err.message) from None
        except ImageInputError as err:
            raise ProtocolError("invalid_image", str(err)) from None
        self.image = data
        item_id = event["item"].get("id") if isinstance(event["item"].get("id"), str) else _id("item")
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_image"}]}  # the image itself is not echoed back
        for kind in ("conversation.item.added", "conversation.item.done"):
            await self.send({"type": kind, "previous_item_id": None, "item": item})

    # -- responses ----------------------------------------------------------------------------
    async def on_response_create(self, event: dict) -> None:
        await self.start_response(schema.expect_object(event.get("response"), "response.create's 'response'",
                                                       optional=True))

    async def on_response_cancel(self, event: dict) -> None:
        if self.response is None:
            raise ProtocolError("response_cancel_not_active", "there is no response in progress")
        await self.cancel_response()

    async def start_response(self, request: dict) -> None:
        if self.turn is None:
            raise ProtocolError("no_input", "commit some audio before asking for a response")
        if self.response is not None:
            raise ProtocolError("conversation_already_has_active_response", "a response is already in progress")
        values = dict(self.config["zoo"]["options"])
        limit = schema.max_output_tokens(request.get("max_output_tokens", self.config["max_output_tokens"]))
        if limit != "inf":
            values["max_new_tokens"] = limit
        options = self._model_options(values)
        turn, self.turn = self.turn, None
        self.response = asyncio.create_task(self._respond(turn, options))

    async def cancel_response(self) -> None:
        task, self.response = self.response, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _respond(self, turn: np.ndarray, options) -> None:
        response_id, item_id = _id("resp"), _id("item")
        base = {"object": "realtime.response", "id": response_id}
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        await self.send({"type": "response.created", "response": {**base, "status": "in_progress", "output": []}})
        transcript, status, reason = [], "completed", None
        reply = self.service.stream(turn, WIRE_RATE, options, received=time.perf_counter(),
                                    history=list(self.history) if self.card.multi_turn else None, image=self.image)
        exchange = None
        try:
            async for chunk in reply:
                exchange = chunk.turn if chunk.turn is not None else exchange
                if chunk.audio.size:
                    pcm = float_to_pcm16(resample(chunk.audio, self.card.output_sample_rate, WIRE_RATE)).tobytes()
                    await self.send({"type": "response.output_audio.delta", **where,
                                     "delta": base64.b64encode(pcm).decode()})
                if chunk.text:
                    transcript.append(chunk.text)
                    await self.send({"type": "response.output_audio_transcript.delta", **where, "delta": chunk.text})
        except asyncio.CancelledError:
            status, reason = "cancelled", "client_cancelled"
        except ApiError as err:  # refused (busy, bad audio): logged and counted by the service
            status, reason = "failed", err.message
            await self.error(err.kind, err.message, reported=err.reported)
        except GenerationFailed as err:  # logged and counted by the service
            status, reason = "failed", str(err)
            await self.error("generation_failed", str(err), kind="server_error", reported=True)
        except Exception as err:  # noqa: BLE001 - a bug fails this reply, not the session
            report_failure(self.service.metrics, "realtime_internal",
                           f"session {self.config['id']}: response {response_id} failed: {err!r}", exc=err)
            status, reason = "failed", "the server failed on this response; its log has the details"
            await self.error("server_error", reason, kind="server_error", reported=True)
        finally:
            await reply.aclose()
            self.replied_at = time.monotonic()
            if self.response is asyncio.current_task():
                self.response = None
        text = "".join(transcript)
        if status == "completed" and exchange is not None:
            self.history.append(exchange)  # the conversation goes on from here (multi-turn models)
        if status == "completed":
            await self.send({"type": "response.output_audio.done", **where})
            await self.send({"type": "response.output_audio_transcript.done", **where, "transcript": text})
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "completed" if status == "completed" else "incomplete",
                "content": [{"type": "output_audio", "transcript": text}]}
        details = None if reason is None else {"type": status, "reason": reason}
        await self.send({"type": "response.done", "response": {**base, "status": status,
                                                                "status_details": details, "output": [item]}})

    HANDLERS = {
        "session.update": on_session_update,
        "input_audio_buffer.append": on_append,
        "input_audio_buffer.commit": on_commit,
        "input_audio_buffer.clear": on_clear,
        "conversation.item.create": on_item_create,
        "response.create": on_response_create,
        "response.cancel": on_response_cancel,
    }


def install(app: FastAPI, service: Service, *, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
    """Every model answers turns (``respond`` is part of the contract): always served."""

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket):
        await RealtimeSession(websocket, service, idle_timeout_s=idle_timeout_s).run()
