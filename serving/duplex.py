"""Full-duplex live sessions (models whose card says ``duplex=True``, e.g. Hertz-dev): the user's
audio streams in and the model's audio streams out at the same time, one fixed-size frame each
way per model step (``card.frame_samples`` at ``card.input_sample_rate``: 2000 samples = 125 ms
at 16 kHz for Hertz-dev). No turns, no VAD: the model decides when to speak.

Two WebSocket protocols, both answered frame by frame:

``WS /v1/duplex`` (ours)
  server -> client, text, on connect: ``{"type": "session.created", "session": {...}}`` with
  ``model``, ``sample_rate`` (input), ``output_sample_rate``, ``frame_samples``, ``format``
  ("pcm_s16le"), ``channels`` (1), ``max_backlog_frames``, ``max_message_bytes``,
  ``idle_timeout_s``, ``options`` (the session's model options), ``prompt`` (bool),
  ``random_weights``.
  client -> server, binary: PCM16 little-endian mono at ``sample_rate``; any size (one frame per
  message is the natural choice; messages are re-framed, a partial frame waits for the rest).
  server -> client, binary: for each complete input frame, in order, the model's next frame
  (``frame_samples * output_sample_rate / sample_rate`` samples, PCM16 LE), sent as soon as its
  step is done.
  client -> server, text (optional, only before the first audio byte):
  ``{"type": "session.update", "options": {...model options...}, "prompt": "<base64 audio file>"}``
  -> ``{"type": "session.updated", "session": {...}}``. ``prompt`` seeds the session (Hertz-dev:
  stereo = (user, model), mono = both) instead of the server's ``--duplex-prompt``; ``null``
  means none.
  server -> client, text: ``{"type": "error", "error": {"code": ..., "message": ...}}``; the session
  goes on unless said otherwise. Codes: ``invalid_json``, ``unknown_event``, ``bad_request`` /
  ``bad_option`` (options), ``bad_audio`` / ``audio_too_long`` (prompt; its length is read from
  the file header before decoding), ``too_late`` (session.update after audio),
  ``message_too_large`` (the message is dropped), ``backlog_full`` (``frames_dropped``: the
  last k complete frames of that message were dropped: the client sends faster than the model
  steps), ``busy`` (every duplex slot is taken: close code 1013 follows at once),
  ``not_duplex`` (the model is half-duplex: close 1008), ``idle_timeout`` (close 1000),
  ``generation`` (the model failed: close 1011; logged with the session number and request id).
  A close's reason is the error's code. So every complete input frame gets exactly one
  output frame or is counted in one ``backlog_full`` error.

``WS /audio`` (the Hertz-dev reference server's live protocol, Standard-Intelligence/hertz-dev
``inference_server.py``; its ``inference_client.py`` and ``inference_client_webrtc.py`` work
unchanged with ``--server ws://HOST:PORT``)
  client -> server, text: ``"data:audio/raw;base64," + base64(int16 mono PCM at 16 kHz)``, 2000
  samples per message (other sizes are re-framed here; the reference needs exactly 2000);
  int16 / 32767 as the reference.
  server -> client, text: the same format, one message per complete input frame, ``x * 32767``
  truncated to int16 as the reference. Nothing else is sent except ``error`` JSON texts (as
  above; the reference just drops the connection). With a server prompt (``--duplex-prompt``),
  the first ``--replay-seconds`` x 8 messages (default 3 s = 24) are answered, as the reference
  does, with the prompt's last seconds (mono mix, ``np.array_split`` into that many pieces)
  while the microphone is ignored; then the model runs, continuing from the prompt.
  ``POST /set_temperature?token_temp=&categorical_temp=&gaussian_temp=`` (the reference client's
  knob) sets the default options of ``/audio`` sessions opened afterwards (the reference's global
  ``TEMPS``), never a running one's; each value is checked as a model option (422 JSON error for
  NaN, negative, too large, not a number); it needs the API key like every route; a parameter
  left out keeps its value (the reference sets it to None and crashes); answers
  ``{"message": "Temperature updated to: (0.8, (0.4, 0.1))", "status": "success"}``.
  Differences: many clients at once (the reference serves one), sessions opened later pick the
  new temperatures up (the reference changes the running one), no recording is saved, no 50 ms
  sleeps during the replay.

Scheduling: one worker thread owns the model's DuplexStepper. Each tick it applies the sessions
that left (``close``) and joined (``open``, with the prompt's prefill), then steps every session
that has a pending input frame in ONE batched ``stepper.step(handles, frames)`` call: one frame
per session per tick, so every session advances frame-synchronously and a session with a backlog
catches up one frame per tick. Input is bounded: a session may have at most
``max_backlog_frames`` frames received and not yet answered; more are dropped with
``backlog_full``. A disconnect closes the session's slot before the next step.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import itertools
import json
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

import zoo
from zoo.core.audio import read_audio, resample, to_pcm16

from .errors import ApiError, report_failure
from .metrics import Metrics

log = logging.getLogger("omni-zoo.duplex")

MAX_BACKLOG_FRAMES = 8  # 1 s of Hertz-dev audio received and not yet answered, per session
MAX_MESSAGE_FRAMES = 16  # audio messages over this many frames are refused
MAX_CONFIG_BYTES = 8 * 1024 * 1024  # a session.update with a prompt (base64 audio file)
IDLE_TIMEOUT_S = 60.0  # no client message (and nothing owed to it) for this long: closed
REPLAY_SECONDS = 3.0  # the reference server's REPLAY_SECONDS
DATA_URL_PREFIX = "data:audio/raw;base64,"


class Busy(Exception):
    """Every duplex slot is taken."""


class DuplexConn:
    """One session as the worker sees it. ``deliver`` is called on the worker thread with each
    output frame (np.ndarray) or an Exception (the session failed)."""

    def __init__(self, number: int, options, prompt, deliver: Callable[[Any], None]) -> None:
        self.number, self.options, self.prompt, self.deliver = number, options, prompt, deliver
        self.inbox: deque[np.ndarray] = deque()
        self.state = "new"  # new -> queued (waits for open) -> taken (the worker has it) ; closed
        self.handle = None
        self.closed = False


class DuplexHub:
    """The model's DuplexStepper and the worker thread that steps it. ``reserve`` / ``push`` /
    ``close`` are called from the event loop (any thread); the stepper only from the worker."""

    def __init__(self, model: zoo.VoiceModel, max_sessions: int, metrics: Metrics, *,
                 prompt: tuple[np.ndarray, int] | None = None, warm_up: bool = True) -> None:
        if not model.card.duplex:
            raise ValueError(f"{model.card.name} is not a duplex model")
        self.model, self.max_sessions, self.metrics = model, max_sessions, metrics
        self.prompt = prompt  # the server's default prompt: (audio, sample_rate)
        self.stepper = model.duplex_stepper(max_sessions)
        self.frame = model.card.frame_samples
        if warm_up:  # the first step builds lazy state (and loads the duplex networks); a bad prompt fails here
            audio, rate = prompt if prompt is not None else (None, None)
            handle = self.stepper.open(None, prompt=audio, sample_rate=rate)
            self.stepper.step([handle], [np.zeros(self.frame, np.float32)])
            self.stepper.close(handle)
        self.reserved = 0
        self.steps = 0
        self._cv = threading.Condition()
        self._opening: list[DuplexConn] = []
        self._closing: list[DuplexConn] = []
        self._active: list[DuplexConn] = []  # worker thread only
        self._numbers = itertools.count(1)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="zoo-duplex", daemon=True)
        self._thread.start()

    def nbytes(self) -> int:
        nbytes = getattr(self.stepper, "nbytes", None)
        return nbytes() if nbytes else 0

    # -- event loop side ----------------------------------------------------------------------
    def reserve(self, options, deliver: Callable[[Any], None]) -> DuplexConn:
        """A slot for a new session (opened in the stepper when its first frame arrives); raises
        Busy at once when ``max_sessions`` are taken."""
        with self._cv:
            if self.reserved >= self.max_sessions:
                raise Busy(f"all {self.max_sessions} duplex session slots are busy; retry shortly")
            self.reserved += 1
            conn = DuplexConn(next(self._numbers), options, self.prompt, deliver)
        self.metrics.duplex_sessions_active.inc()
        self.metrics.duplex_sessions_total.inc()
        return conn

    def push(self, conn: DuplexConn, frame: np.ndarray) -> None:
        with self._cv:
            if conn.closed:
                return
            conn.inbox.append(frame)
            if conn.state == "new":
                conn.state = "queued"
                self._opening.append(conn)
            self._cv.notify()

    def close(self, conn: DuplexConn) -> None:
        """The session leaves: its frames are dropped, its slot freed before the next step."""
        with self._cv:
            if conn.closed:
                return
            conn.closed = True
            conn.inbox.clear()
            self.reserved -= 1
            if conn.state == "queued":
                self._opening.remove(conn)  # never opened: nothing to free
            elif conn.state == "taken":
                self._closing.append(conn)
            self._cv.notify()
        self.metrics.duplex_sessions_active.dec()

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._opening or self._closing
                           or any(c.inbox for c in self._active)):
                    self._cv.wait()
                if self._stopping:
                    return
                closing, self._closing = self._closing, []
                opening, self._opening = self._opening, []
                for conn in opening:
                    conn.state = "taken"
            for conn in closing:  # leave first, so their slots are free for those joining
                self._release(conn)
            for conn in opening:
                self._open(conn)
            with self._cv:
                batch = [c for c in self._active if c.inbox and not c.closed]
                frames = [c.inbox.popleft() for c in batch]
            if batch:
                self._step(batch, frames)

    def _open(self, conn: DuplexConn) -> None:
        try:
            audio, rate = conn.prompt if conn.prompt is not None else (None, None)
            conn.handle = self.stepper.open(conn.options, prompt=audio, sample_rate=rate)
        except Exception as err:  # noqa: BLE001 - reported to that session only
            with self._cv:
                conn.inbox.clear()
            conn.deliver(err)
            return
        with self._cv:
            closed = conn.closed
        if closed:  # it left while being opened
            self.stepper.close(conn.handle)
        else:
            self._active.append(conn)

    def _release(self, conn: DuplexConn) -> None:
        if conn.handle is not None:
            self.stepper.close(conn.handle)
        if conn in self._active:
            self._active.remove(conn)

    def _step(self, batch: list[DuplexConn], frames: list[np.ndarray]) -> None:
        """One batched step. The stepper answers each session with its frame, or with the
        Exception that ended that session alone (its handle is closed): that connection gets the
        error, the others their frames. Only a failure of the whole step fails every session."""
        started = time.perf_counter()
        try:
            outputs = self.stepper.step([c.handle for c in batch], frames)
        except Exception as err:  # noqa: BLE001 - a failed batched step fails the sessions in it
            log.exception("duplex step failed for %d session(s)", len(batch))
            outputs = [err] * len(batch)
        else:
            self.steps += 1
            self.metrics.duplex_step_seconds.observe(time.perf_counter() - started)
            self.metrics.duplex_batch_size.observe(len(batch))
            self.metrics.duplex_frames.inc(sum(not isinstance(out, Exception) for out in outputs))
        for conn, out in zip(batch, outputs):
            if isinstance(out, Exception):
                self._fail(conn, out)
            else:
                conn.deliver(out)

    def _fail(self, conn: DuplexConn, err: Exception) -> None:
        """The session ended in the worker: its slot is freed, its waiting frames dropped."""
        self._release(conn)
        with self._cv:
            conn.inbox.clear()
        conn.deliver(err)


# -- the WebSocket side -------------------------------------------------------------------------
class Wire:
    """How audio travels on one route."""

    name = "binary"
    in_scale = 32768.0  # int16 -> float

    def decode(self, message: dict) -> bytes:
        """A received message -> PCM16 bytes (raises ProtocolError)."""
        if message.get("bytes") is None:
            raise ProtocolError("bad_message", "audio goes in binary messages (PCM16 LE)")
        return message["bytes"]

    async def send_audio(self, ws: WebSocket, audio: np.ndarray) -> None:
        await ws.send_bytes(to_pcm16(audio))


class DataUrlWire(Wire):
    """The Hertz-dev reference: text ``data:audio/raw;base64,<int16 PCM>`` both ways."""

    name = "data-url"
    in_scale = 32767.0

    def decode(self, message: dict) -> bytes:
        text = message.get("text")
        if text is None:
            raise ProtocolError("bad_message", f"send text messages '{DATA_URL_PREFIX}<base64 int16 PCM>'")
        head, comma, payload = text.partition(",")
        if not comma or not head.startswith("data:"):
            raise ProtocolError("bad_message", f"expected '{DATA_URL_PREFIX}<base64 int16 PCM>'")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("bad_audio", "the data URL's payload is not valid base64") from None

    async def send_audio(self, ws: WebSocket, audio: np.ndarray) -> None:
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")  # the reference's conversion (truncation)
        await ws.send_text(DATA_URL_PREFIX + base64.b64encode(pcm.tobytes()).decode())


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, **extra) -> None:
        super().__init__(message)
        self.code, self.extra = code, extra


@dataclasses.dataclass
class DuplexSettings:
    """Server-wide settings of the duplex routes."""

    max_backlog_frames: int = MAX_BACKLOG_FRAMES
    idle_timeout_s: float = IDLE_TIMEOUT_S
    replay_seconds: float = REPLAY_SECONDS
    reference_options: dict = dataclasses.field(default_factory=dict)  # /set_temperature


def load_prompt(path: str) -> tuple[np.ndarray, int]:
    """A prompt file -> (float32 audio (samples,) or (samples, channels), its rate)."""
    audio, rate = read_audio(path)
    return np.asarray(audio, np.float32), rate


def replay_chunks(prompt: tuple[np.ndarray, int], rate: int, frame: int, seconds: float) -> list[np.ndarray]:
    """The reference server's replay: the prompt at ``rate``, trimmed to whole frames, its last
    ``seconds`` mixed to mono and split into ``seconds * 8`` pieces (np.array_split)."""
    audio, prompt_rate = prompt
    channels = audio.reshape(audio.shape[0], -1).T  # (channels, samples)
    channels = np.stack([resample(c, prompt_rate, rate) for c in channels])
    if channels.shape[0] == 1:
        channels = np.concatenate([channels, channels])
    channels = channels[:, : channels.shape[1] // frame * frame]
    tail = channels[:, -int(rate * seconds):].mean(axis=0)
    pieces = int(seconds * rate / frame)
    return [p.astype(np.float32) for p in np.array_split(tail, pieces)] if pieces and tail.size else []


class DuplexSocket:
    """One client connection on ``/v1/duplex`` (``Wire``) or ``/audio`` (``DataUrlWire``)."""

    def __init__(self, ws: WebSocket, service, settings: DuplexSettings, wire: Wire) -> None:
        self.ws, self.service, self.settings, self.wire = ws, service, settings, wire
        self.hub: DuplexHub | None = service.duplex
        self.metrics: Metrics = service.metrics
        self.card = service.model.card
        self.frame = self.card.frame_samples or 0
        self.frame_bytes = 2 * self.frame
        self.max_message_bytes = MAX_MESSAGE_FRAMES * self.frame_bytes
        self.pending = bytearray()  # received audio bytes not yet a whole frame
        self.in_flight: deque[float] = deque()  # receive times of frames pushed and not yet answered
        self.started_audio = False
        self.options_values: dict = dict(settings.reference_options) if isinstance(wire, DataUrlWire) else {}
        self.replay: list[np.ndarray] = []
        self.conn: DuplexConn | None = None
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
        await self.send_json({"type": "error", "error": {"code": code, "message": message, **extra}})

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
        }

    # -- the session --------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        if self.hub is None:
            await self.refuse("not_duplex", f"{self.card.name} is a half-duplex model: use /v1/realtime or /chat", 1008)
            return
        loop = asyncio.get_running_loop()

        def deliver(item) -> None:  # worker thread
            try:
                loop.call_soon_threadsafe(self.outbox.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        options = self.service.model.options(self.options_values)  # /set_temperature checked them
        try:
            self.conn = self.hub.reserve(options, deliver)
        except Busy as err:
            await self.refuse("busy", str(err), 1013)
            return
        if isinstance(self.wire, DataUrlWire) and self.hub.prompt is not None and self.settings.replay_seconds > 0:
            self.replay = replay_chunks(self.hub.prompt, self.card.input_sample_rate, self.frame,
                                        self.settings.replay_seconds)
        sender = asyncio.create_task(self.send_outputs())
        try:
            if not isinstance(self.wire, DataUrlWire):  # the reference client expects audio only
                await self.send_json({"type": "session.created", "session": self.session_info()})
            await self.receive_loop(sender)
        except WebSocketDisconnect:
            pass
        finally:  # no await here: this may run because the task is being cancelled
            self.hub.close(self.conn)
            sender.cancel()
            if self.receiving is not None:
                self.receiving.cancel()

    async def receive_loop(self, sender: asyncio.Task) -> None:
        while True:
            if self.receiving is None:
                self.receiving = asyncio.ensure_future(self.ws.receive())
            done, _ = await asyncio.wait({self.receiving, sender}, timeout=self.settings.idle_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if sender in done:  # the session failed (the sender closed the socket)
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
        if text is not None and not isinstance(self.wire, DataUrlWire):
            if size > MAX_CONFIG_BYTES:
                raise ProtocolError("message_too_large", f"text messages are at most {MAX_CONFIG_BYTES} bytes")
            await self.configure(text)
            return
        limit = self.max_message_bytes if text is None else -(-self.max_message_bytes // 3) * 4 + 64  # base64 + header
        if size > limit:
            raise ProtocolError("message_too_large",
                                f"audio messages are at most {self.max_message_bytes} bytes of PCM "
                                f"({MAX_MESSAGE_FRAMES} frames); this one is dropped")
        pcm = self.wire.decode(message)
        self.started_audio = self.started_audio or bool(pcm)
        self.pending += pcm
        whole = len(self.pending) // self.frame_bytes * self.frame_bytes
        if not whole:
            return
        frames = np.frombuffer(bytes(self.pending[:whole]), "<i2").reshape(-1, self.frame)
        del self.pending[:whole]
        received, dropped = time.perf_counter(), 0
        for frame in frames:
            if self.replay:  # the reference's prompt replay: the input is not used
                self.in_flight.append(received)
                self.outbox.put_nowait(self.replay.pop(0))
            elif len(self.in_flight) >= self.settings.max_backlog_frames:
                dropped += 1
            else:
                self.in_flight.append(received)
                self.hub.push(self.conn, frame.astype(np.float32) / self.wire.in_scale)
        if dropped:
            self.metrics.duplex_dropped.inc(dropped)
            raise ProtocolError("backlog_full", f"{dropped} frame(s) of this message dropped: at most "
                                f"{self.settings.max_backlog_frames} frames may wait for the model; "
                                f"send in real time or wait for the answers", frames_dropped=dropped)

    async def configure(self, text: str) -> None:
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError("not an object")
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
            async with self.send_lock:
                await self.wire.send_audio(self.ws, item)
            if self.in_flight:
                self.metrics.duplex_frame_latency.observe(time.perf_counter() - self.in_flight.popleft())
