"""Live sessions over WebSocket, speaking a subset of the OpenAI Realtime (GA) event protocol, so
the official ``openai`` SDK realtime client (and tools built on it) can hold a conversation.

Client -> server: session.update, input_audio_buffer.append | commit | clear, response.create,
response.cancel. Server -> client: session.created | updated, input_audio_buffer.speech_started |
speech_stopped | committed | cleared, response.created, response.output_audio.delta,
response.output_audio_transcript.delta, response.output_audio.done,
response.output_audio_transcript.done, response.done, error.

Audio on the wire is base64 PCM16 mono at 24 kHz both ways, resampled to and from the model's rates
here. Turn detection: "server_vad" (Silero VAD; a pause ends the turn and starts the reply; speech
during a reply cancels it: barge-in) or null (the client commits and asks for a response).
Model options: ``session.max_output_tokens`` / ``response.max_output_tokens`` (decode steps) and
``session.zoo.options`` (any of the model's options, e.g. temperature).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import itertools
import json
import time
import uuid
from typing import Any

import numpy as np
import soxr
from fastapi import WebSocket, WebSocketDisconnect

from zoo.core.audio import resample, to_pcm16

from .service import ApiError, GenerationFailed, Service
from .vad import VAD_RATE, SpeechDetector

WIRE_RATE = 24000
MAX_WS_MESSAGE_BYTES = 16 * 1024 * 1024
MIN_COMMIT_MS = 100
IDLE_TIMEOUT_S = 300  # a session with no client event for this long is closed

DEFAULT_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                          "silence_duration_ms": 500, "create_response": True, "interrupt_response": True}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RealtimeSession:
    def __init__(self, ws: WebSocket, service: Service) -> None:
        self.ws, self.service, self.card = ws, service, service.model.card
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

    async def error(self, code: str, message: str, client_event: str | None = None) -> None:
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": code,
                                                     "message": message, "event_id": client_event}})

    async def run(self) -> None:
        await self.ws.accept()
        await self.send({"type": "session.created", "session": self.config})
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.receive(), IDLE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    await self.error("idle_timeout", f"no event for {IDLE_TIMEOUT_S} s: closing")
                    await self.ws.close(code=1000)
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
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError("not an object")
        except ValueError as err:
            await self.error("invalid_json", f"event is not a JSON object: {err}")
            return
        kind = event.get("type")
        handler = self.HANDLERS.get(kind)
        if handler is None:
            await self.error("unknown_event", f"unsupported event type {kind!r}; supported: {sorted(self.HANDLERS)}",
                             event.get("event_id"))
            return
        try:
            await handler(self, event)
        except ProtocolError as err:
            await self.error(err.code, str(err), event.get("event_id"))

    # -- session ------------------------------------------------------------------------------
    def _configure_vad(self) -> None:
        detection = self.config["audio"]["input"]["turn_detection"]
        self.detector = None if detection is None else SpeechDetector(
            threshold=float(detection.get("threshold", 0.5)),
            silence_ms=int(detection.get("silence_duration_ms", 500)),
            prefix_padding_ms=int(detection.get("prefix_padding_ms", 300)))

    async def on_session_update(self, event: dict) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            raise ProtocolError("invalid_session", "session.update needs a 'session' object")
        config = copy.deepcopy(self.config)
        audio = update.get("audio") or {}
        for direction in ("input", "output"):
            fmt = (audio.get(direction) or {}).get("format")
            if fmt is not None and (fmt.get("type") != "audio/pcm" or int(fmt.get("rate", WIRE_RATE)) != WIRE_RATE):
                raise ProtocolError("unsupported_format", f"only audio/pcm at {WIRE_RATE} Hz is supported, got {fmt}")
        if "input" in audio and "turn_detection" in audio["input"]:
            detection = audio["input"]["turn_detection"]
            if detection is not None and detection.get("type", "server_vad") != "server_vad":
                raise ProtocolError("unsupported_turn_detection", "turn_detection must be server_vad or null")
            config["audio"]["input"]["turn_detection"] = None if detection is None else {**DEFAULT_TURN_DETECTION, **detection}
        for key in ("instructions", "output_modalities", "max_output_tokens"):
            if key in update:
                config[key] = update[key]
        if "zoo" in update:
            options = (update["zoo"] or {}).get("options", {})
            try:
                self.service.options(options)
            except ApiError as err:
                raise ProtocolError(err.kind, err.message) from None
            config["zoo"]["options"] = options
        self.config = config
        self._configure_vad()
        await self.send({"type": "session.updated", "session": self.config})

    # -- input audio --------------------------------------------------------------------------
    async def on_append(self, event: dict) -> None:
        try:
            pcm = base64.b64decode(event.get("audio") or "", validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_audio", "'audio' must be base64 PCM16") from None
        if len(pcm) % 2:
            raise ProtocolError("invalid_audio", "PCM16 needs an even number of bytes")
        audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
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
                if self.config["audio"]["input"]["turn_detection"].get("create_response", True):
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

    # -- responses ----------------------------------------------------------------------------
    async def on_response_create(self, event: dict) -> None:
        await self.start_response(event.get("response") or {})

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
        limit = request.get("max_output_tokens", self.config.get("max_output_tokens", "inf"))
        if limit != "inf":
            values["max_new_tokens"] = limit
        try:
            options = self.service.options(values)
        except ApiError as err:
            raise ProtocolError(err.kind, err.message) from None
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
                                    history=list(self.history) if self.card.multi_turn else None)
        exchange = None
        try:
            async for chunk in reply:
                exchange = chunk.turn if chunk.turn is not None else exchange
                if chunk.audio.size:
                    pcm = to_pcm16(resample(chunk.audio, self.card.output_sample_rate, WIRE_RATE))
                    await self.send({"type": "response.output_audio.delta", **where,
                                     "delta": base64.b64encode(pcm).decode()})
                if chunk.text:
                    transcript.append(chunk.text)
                    await self.send({"type": "response.output_audio_transcript.delta", **where, "delta": chunk.text})
        except asyncio.CancelledError:
            status, reason = "cancelled", "client_cancelled"
        except ApiError as err:
            status, reason = "failed", err.message
            await self.error(err.kind, err.message)
        except GenerationFailed as err:
            status, reason = "failed", str(err)
        finally:
            await reply.aclose()
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
        "response.create": on_response_create,
        "response.cancel": on_response_cancel,
    }
