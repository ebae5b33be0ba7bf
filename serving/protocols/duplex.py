"""Full-duplex live sessions, served when the model's card says ``duplex=True``: the user's audio
streams in and the model's audio streams out at the same time, one fixed-size frame each way per
model step (``card.frame_samples`` at ``card.input_sample_rate``, e.g. 2000 samples = 125 ms at
16 kHz). No turns, no VAD: the model decides when to speak. ``DuplexSocket`` runs one connection
for any wire (``Wire``: this module's binary one, or a reference client's, e.g.
serving/protocols/hertz_reference.py, serving/protocols/kyutai_reference.py): the wire says how
audio, text pieces and errors are written; slots, backlog, limits and failures are handled here
once.

``WS /v1/duplex`` (ours)
  server -> client, text, on connect: ``{"type": "session.created", "session": {...}}`` with
  ``model``, ``sample_rate`` (input), ``output_sample_rate``, ``frame_samples``, ``format``
  ("pcm_s16le"), ``channels`` (1), ``max_backlog_frames``, ``max_message_bytes``,
  ``idle_timeout_s``, ``options`` (the session's model options), ``prompt`` (bool),
  ``random_weights``, ``text_output`` (bool: whether ``text.delta`` events come).
  client -> server, binary: PCM16 little-endian mono at ``sample_rate``; any size (one frame per
  message is the natural choice; messages are re-framed, a partial frame waits for the rest).
  server -> client, binary: for each complete input frame, in order, the model's next frame
  (``frame_samples * output_sample_rate / sample_rate`` samples, PCM16 LE), sent as soon as its
  step is done.
  server -> client, text, for models whose card says ``text_output`` (e.g. Moshi's inner
  monologue): ``{"type": "text.delta", "delta": "..."}`` right before the audio frame of the step
  that produced the piece (steps without text send none).
  client -> server, text (optional, only before the first audio byte):
  ``{"type": "session.update", "options": {...model options...}, "prompt": "<base64 audio file>"}``
  -> ``{"type": "session.updated", "session": {...}}``. ``prompt`` seeds the session (as the model's
  ``duplex_stepper().open(prompt=)`` reads it) instead of the server's ``--duplex-prompt``; ``null``
  means none.
  server -> client, text: ``{"type": "error", "error": {"code": ..., "message": ...}}``; the session
  goes on unless said otherwise. Codes: ``invalid_json``, ``unknown_event``, ``bad_request`` /
  ``bad_option`` (options), ``bad_audio`` / ``audio_too_long`` (prompt; its length is read from
  the file header before decoding), ``too_late`` (session.update after audio),
  ``message_too_large`` (the message is dropped), ``backlog_full`` (``frames_dropped``: the
  last k complete frames of that message were dropped: the client sends faster than the model
  steps), ``busy`` (every duplex slot is taken: close code 1013 follows at once),
  ``not_duplex`` (the model is half-duplex: close 1008; the route answers only that),
  ``idle_timeout`` (close 1000), ``max_duration`` (the server's ``--duplex-max-s``: close 1000),
  ``generation`` (the model failed: close 1011; logged with the session number and request id).
  A close's reason is the error's code. So every complete input frame gets exactly one
  output frame or is counted in one ``backlog_full`` error.

Scheduling: zoo.core.scheduler.DuplexScheduler (one batched step per tick, one frame per session).
Input is bounded here: a session may have at most ``max_backlog_frames`` frames received and not
yet answered; more are dropped with ``backlog_full``. A disconnect closes the session's slot
before the next step.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import time
from collections import deque
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

import zoo
from zoo.core.audio import float_to_pcm16, pcm16_to_float, read_audio
from zoo.core.scheduler import Busy, DuplexScheduler, DuplexTicket

from ..errors import ApiError, report_failure
from ..metrics import Metrics
from ..parsing import json_object

MAX_BACKLOG_FRAMES = 8  # frames received and not yet answered, per session (1 s of 125 ms frames)
MAX_MESSAGE_FRAMES = 16  # audio messages over this many frames are refused
MAX_CONFIG_BYTES = 8 * 1024 * 1024  # a session.update with a prompt (base64 audio file)
IDLE_TIMEOUT_S = 60.0  # no client message (and nothing owed to it) for this long: closed


class Wire:
    """How audio travels on one route; this one is ``/v1/duplex``'s binary PCM16 LE. One wire
    object per connection (it may keep a connection's codec state)."""

    name = "binary"
    in_scale = 32768.0  # int16 -> float
    json_events = True  # session.created on connect, text messages are session.update events
    # whether the model's text pieces go out too (send_text); None: when the card says text_output
    sends_text: bool | None = None

    def __init__(self) -> None:
        self._odd = b""  # a sample's first byte whose second byte comes in the next message

    def initial_options(self) -> dict:
        """The model options a new session starts with (before any session.update)."""
        return {}

    def opening_frames(self, prompt: tuple[np.ndarray, int] | None, card: zoo.ModelCard) -> list[np.ndarray]:
        """Frames that answer the first input frames instead of the model (none here)."""
        return []

    def decode(self, message: dict) -> bytes:
        """A received message -> PCM16 bytes (raises ProtocolError)."""
        if message.get("bytes") is None:
            raise ProtocolError("bad_message", "audio goes in binary messages (PCM16 LE)")
        return message["bytes"]

    def samples(self, message: dict) -> np.ndarray:
        """A received message -> its float32 samples at the card's input rate (raises
        ProtocolError); this PCM16 one keeps a split sample's first byte for the next message."""
        data = self._odd + self.decode(message)
        even = len(data) // 2 * 2
        self._odd = data[even:]
        return pcm16_to_float(data[:even], self.in_scale)

    async def greet(self, socket: DuplexSocket) -> None:
        """What the client gets once the session has its slot: ``session.created`` on a wire with
        JSON events, nothing otherwise."""
        if self.json_events:
            await socket.send_json({"type": "session.created", "session": socket.session_info()})

    def error_message(self, code: str, message: str, **extra) -> str | bytes:
        """An error as this wire sends it (text: a JSON ``error`` event; bytes: a binary message)."""
        return json.dumps({"type": "error", "error": {"code": code, "message": message, **extra}})

    async def send_audio(self, ws: WebSocket, audio: np.ndarray) -> None:
        await ws.send_bytes(float_to_pcm16(audio).tobytes())

    def carries_text(self, card: zoo.ModelCard) -> bool:
        """Whether this connection sends the model's text pieces (``sends_text``, else the card)."""
        return card.text_output if self.sends_text is None else self.sends_text

    async def send_text(self, ws: WebSocket, text: str) -> None:
        """A non-empty text piece of the model's (when ``carries_text``): a ``text.delta`` event."""
        await ws.send_text(json.dumps({"type": "text.delta", "delta": text}))


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, **extra) -> None:
        super().__init__(message)
        self.code, self.extra = code, extra


@dataclasses.dataclass
class DuplexSettings:
    """Server-wide settings of the duplex routes. ``max_session_s``: a session is closed after
    this long (0: no limit)."""

    max_backlog_frames: int = MAX_BACKLOG_FRAMES
    idle_timeout_s: float = IDLE_TIMEOUT_S
    max_session_s: float = 0.0


class DuplexSocket:
    """One client connection on a duplex route, speaking ``wire``."""

    def __init__(self, ws: WebSocket, service, settings: DuplexSettings, wire: Wire) -> None:
        self.ws, self.service, self.settings, self.wire = ws, service, settings, wire
        self.hub: DuplexScheduler = service.duplex
        self.metrics: Metrics = service.metrics
        self.card = service.model.card
        self.frame = self.card.frame_samples or 0
        self.frame_bytes = 2 * self.frame
        self.max_message_bytes = MAX_MESSAGE_FRAMES * self.frame_bytes
        self.pending = np.zeros(0, np.float32)  # received samples not yet a whole frame
        self.in_flight: deque[float] = deque()  # receive times of frames pushed and not yet answered
        self.started_audio = False
        self.options_values: dict = wire.initial_options()
        self.replay: list[np.ndarray] = []
        self.conn: DuplexTicket | None = None
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.send_lock = asyncio.Lock()
        self.receiving: asyncio.Future | None = None  # the pending ws.receive()

    # -- plumbing ---------------------------------------------------------------------------------
    async def send_json(self, event: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event))

    async def error(self, code: str, message: str, *, exc: BaseException | None = None, **extra) -> None:
        number = self.conn.number if self.conn is not None else "-"
        report_failure(self.metrics, f"duplex_{code}", f"duplex session {number} ({self.wire.name}): {message}",
                       exc=exc, level=logging.ERROR if exc is not None else logging.WARNING)
        async with self.send_lock:
            await send_message(self.ws, self.wire.error_message(code, message, **extra))

    async def refuse(self, code: str, message: str, close_code: int, *, exc: BaseException | None = None) -> None:
        """An error event, then the close, whose reason is the error's code (a close reason is at
        most 123 bytes; the event has the whole message)."""
        await self.error(code, message, exc=exc)
        await self.ws.close(code=close_code, reason=code)

    def session_info(self) -> dict:
        options = self.conn.options if self.conn is not None else None
        return {
            "model": self.card.name, "protocol": self.wire.name,
            "sample_rate": self.card.input_sample_rate, "output_sample_rate": self.card.output_sample_rate,
            "frame_samples": self.frame, "format": "pcm_s16le", "channels": 1,
            "max_backlog_frames": self.settings.max_backlog_frames, "max_message_bytes": self.max_message_bytes,
            "idle_timeout_s": self.settings.idle_timeout_s,
            "options": dataclasses.asdict(options) if options is not None else {},
            "prompt": self.conn is not None and self.conn.prompt is not None,
            "random_weights": self.service.model.random_weights is not None,
            "text_output": self.wire.carries_text(self.card),
        }

    # -- the session --------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        loop = asyncio.get_running_loop()

        def deliver(item) -> None:  # worker thread
            try:
                loop.call_soon_threadsafe(self.outbox.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        options = self.service.model.options(self.options_values)  # checked when they were set
        try:
            self.conn = self.hub.reserve(options, deliver)
        except Busy as err:
            await self.refuse("busy", str(err), 1013)
            return
        self.conn.chunks = self.wire.carries_text(self.card)  # before its first frame: the worker reads it after a push
        self.metrics.duplex_sessions_active.inc()
        self.metrics.duplex_sessions_total.inc()
        self.replay = self.wire.opening_frames(self.hub.prompt, self.card)
        sender = asyncio.create_task(self.send_outputs())
        try:
            await self.wire.greet(self)
            await self.receive_loop(sender)
        except WebSocketDisconnect:
            pass
        finally:  # no await here: this may run because the task is being cancelled
            self.hub.close(self.conn)
            self.metrics.duplex_sessions_active.dec()
            sender.cancel()
            if self.receiving is not None:
                self.receiving.cancel()

    async def receive_loop(self, sender: asyncio.Task) -> None:
        limit = self.settings.max_session_s
        deadline = time.monotonic() + limit if limit > 0 else None
        while True:
            if self.receiving is None:
                self.receiving = asyncio.ensure_future(self.ws.receive())
            wait = self.settings.idle_timeout_s
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            done, _ = await asyncio.wait({self.receiving, sender}, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if sender in done:  # the session failed (the sender closed the socket)
                return
            if deadline is not None and time.monotonic() >= deadline:
                await self.refuse("max_duration", f"sessions last at most {limit:g} s: closing", 1000)
                return
            if not done:
                if self.in_flight:  # the client waits for us: not idle
                    continue
                await self.refuse("idle_timeout", f"no message for {self.settings.idle_timeout_s:g} s: closing", 1000)
                return
            message, self.receiving = self.receiving.result(), None
            if message["type"] == "websocket.disconnect":
                return
            try:
                await self.handle(message)
            except ProtocolError as err:
                await self.error(err.code, str(err), **err.extra)

    async def handle(self, message: dict) -> None:
        text, data = message.get("text"), message.get("bytes")
        size = len(text) if text is not None else len(data or b"")
        if text is not None and self.wire.json_events:
            if size > MAX_CONFIG_BYTES:
                raise ProtocolError("message_too_large", f"text messages are at most {MAX_CONFIG_BYTES} bytes")
            await self.configure(text)
            return
        limit = self.max_message_bytes if text is None else -(-self.max_message_bytes // 3) * 4 + 64  # base64 + header
        if size > limit:
            raise ProtocolError("message_too_large",
                                f"audio messages are at most {self.max_message_bytes} bytes of PCM "
                                f"({MAX_MESSAGE_FRAMES} frames); this one is dropped")
        samples = self.wire.samples(message)
        self.started_audio = self.started_audio or size > 0
        self.pending = np.concatenate([self.pending, samples]) if self.pending.size else samples
        whole = self.pending.size // self.frame * self.frame
        if not whole:
            return
        frames, self.pending = self.pending[:whole].reshape(-1, self.frame), self.pending[whole:]
        received, dropped = time.perf_counter(), 0
        for frame in frames:
            if self.replay:  # the wire's opening frames: the input is not used
                self.in_flight.append(received)
                self.outbox.put_nowait(self.replay.pop(0))
            elif len(self.in_flight) >= self.settings.max_backlog_frames:
                dropped += 1
            else:
                self.in_flight.append(received)
                self.hub.push(self.conn, frame)
        if dropped:
            self.metrics.duplex_dropped.inc(dropped)
            raise ProtocolError("backlog_full", f"{dropped} frame(s) of this message dropped: at most "
                                f"{self.settings.max_backlog_frames} frames may wait for the model; "
                                f"send in real time or wait for the answers", frames_dropped=dropped)

    async def configure(self, text: str) -> None:
        try:
            event = json_object(text)
        except ValueError as err:
            raise ProtocolError("invalid_json", f"text messages must be JSON objects: {err}") from None
        if event.get("type", "session.update") != "session.update":
            raise ProtocolError("unknown_event", f"unsupported event type {event.get('type')!r}; send session.update")
        if self.started_audio:
            raise ProtocolError("too_late", "session.update must come before the first audio")
        unknown = sorted(set(event) - {"type", "options", "prompt"})
        if unknown:
            raise ProtocolError("bad_request", f"unknown session.update field(s) {unknown}; known: options, prompt")
        values = event.get("options") or {}
        if not isinstance(values, dict):
            raise ProtocolError("bad_request", "'options' must be an object")
        try:
            options = self.service.options(values)
        except ApiError as err:
            raise ProtocolError(err.kind, err.message) from None
        prompt = self.conn.prompt
        if "prompt" in event:
            prompt = None if event["prompt"] is None else await self.read_prompt(event["prompt"])
        self.conn.options, self.conn.prompt = options, prompt  # the session is opened at its first frame
        await self.send_json({"type": "session.updated", "session": self.session_info()})

    async def read_prompt(self, value: Any) -> tuple[np.ndarray, int]:
        if not isinstance(value, str):
            raise ProtocolError("bad_audio", "'prompt' must be base64 of an audio file, or null")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("bad_audio", "'prompt' is not valid base64") from None
        try:
            audio, rate = await asyncio.to_thread(read_audio, raw, max_seconds=self.card.max_input_seconds)
        except zoo.AudioTooLong as err:
            raise ProtocolError("audio_too_long", f"prompt: {err}") from None
        except zoo.AudioInputError as err:
            raise ProtocolError("bad_audio", f"prompt: {err}") from None
        seconds = audio.shape[0] / rate
        if seconds * self.card.input_sample_rate < self.frame:
            raise ProtocolError("bad_audio", f"the prompt needs at least one frame ({self.frame} samples at "
                                             f"{self.card.input_sample_rate} Hz)")
        return np.asarray(audio, np.float32), rate

    async def send_outputs(self) -> None:
        """Answers, in order, as the worker delivers them; an Exception ends the session."""
        while True:
            item = await self.outbox.get()
            if isinstance(item, Exception):
                if isinstance(item, zoo.ZooError):
                    code, message = "bad_audio" if isinstance(item, zoo.AudioInputError) else "bad_request", str(item)
                    await self.refuse(code, message, 1008)
                else:
                    await self.refuse("generation", f"the model failed: {type(item).__name__}: {item}", 1011, exc=item)
                return
            audio, text = (item.audio, item.text) if isinstance(item, zoo.Chunk) else (item, "")
            async with self.send_lock:  # a step's text first: a client that stops at its last frame has it all
                if text:
                    await self.wire.send_text(self.ws, text)
                await self.wire.send_audio(self.ws, audio)
            if self.in_flight:
                self.metrics.duplex_frame_latency.observe(time.perf_counter() - self.in_flight.popleft())


def unavailable(service) -> tuple[str, str] | None:
    """Why the duplex routes do not serve this model (error code, message), or None."""
    card = service.model.card
    if not card.duplex:
        return "not_duplex", f"{card.name} is a half-duplex model: use /v1/realtime or /chat"
    if service.duplex is None:  # a front without duplex slots of its own (serving/scale: Ray replicas)
        return "not_served", f"full duplex with {card.name} is not served by this deployment: use the single-process server"
    return None


async def send_message(ws: WebSocket, message: str | bytes) -> None:
    if isinstance(message, bytes):
        await ws.send_bytes(message)
    else:
        await ws.send_text(message)


async def refuse_connection(ws: WebSocket, metrics: Metrics, wire: Wire, code: str, message: str) -> None:
    """A route this model does not offer (or a connection it cannot open): accept, send the
    wire's error message, close (1008, the code)."""
    await ws.accept()
    report_failure(metrics, f"duplex_{code}", f"duplex session - ({wire.name}): {message}", level=logging.WARNING)
    await send_message(ws, wire.error_message(code, message))
    await ws.close(code=1008, reason=code)


def install(app: FastAPI, service, settings: DuplexSettings) -> None:
    """``/v1/duplex`` for a model whose card says duplex; otherwise the route refuses."""
    refusal = unavailable(service)

    @app.websocket("/v1/duplex")
    async def duplex_binary(websocket: WebSocket):
        if refusal is not None:
            await refuse_connection(websocket, service.metrics, Wire(), *refusal)
        else:
            await DuplexSocket(websocket, service, settings, Wire()).run()
