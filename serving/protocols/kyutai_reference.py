"""The Kyutai reference server's live protocol (``server.py`` of kyutai-labs' Moshi repository; its
Python client and its web client speak it to ``ws://HOST:PORT/api/chat``), served for a duplex
model whose card lists ``"kyutai-opus"`` in ``card.protocols``; without it ``/api/chat`` refuses.
Rates and frame size are the card's (24 kHz, 1920 samples = 80 ms for the reference model); this
module adds only the wire format (kyutai-labs' ``rust/protocol.md``):

``WS /api/chat``: binary messages, each a kind byte then its payload.
  server -> client ``0x00``: the handshake, sent once the session has its slot (as the reference,
  the byte alone); nothing is sent before it but a refusal.
  client -> server ``0x01`` + Ogg/Opus bytes: the microphone, mono at the card's input rate, one
  continuous Ogg stream for the whole connection (pages of any size; decoded with ``sphn``,
  re-framed into the card's frames).
  server -> client ``0x01`` + Ogg/Opus bytes: the model's audio, one continuous Ogg stream at the
  card's output rate, each complete input frame answered by the model's next frame, in order
  (sphn's writer packs 960 samples per Opus packet: 1920-sample frames leave one message each,
  shorter frames leave a message when 960 samples are in).
  server -> client ``0x02`` + UTF-8: the model's text piece of a step (its SentencePiece piece, "▁"
  as a space), after that step's audio; steps without text send none.
  server -> client ``0x05`` + UTF-8 ``"<code>: <message>"``: an error (the reference web client's
  error kind). The session goes on, except where a close follows (its reason is the code). Codes
  are ``/v1/duplex``'s (serving/protocols/duplex.py: ``busy`` then close 1013, ``idle_timeout``,
  ``max_duration``, ``backlog_full``, ``message_too_large``, ``generation`` then close 1011, ...)
  and this wire's own: ``bad_message`` (a text message: this protocol is binary),
  ``unknown_kind`` (a kind byte that is not one of the protocol's), ``unsupported_kind`` (control
  ``0x03`` or metadata ``0x04``, which the reference server does not take either), ``bad_audio``
  (bytes that are not Ogg/Opus: that message is dropped and the stream restarts, so the following
  pages are decoded again), ``bad_option`` / ``bad_request`` (a query parameter: close 1008),
  ``not_duplex`` / ``not_offered`` (close 1008). A ping ``0x06`` is ignored; an empty message too.
  Query parameters (what the reference web client puts on the URL): those the card maps
  (``card.protocols["kyutai-opus"]``: parameter -> model option, e.g. ``text_temperature``,
  ``text_topk``, ``audio_temperature``, ``audio_topk``) set that session's options, checked as model
  options; the others the web client sends (``pad_mult``, seeds, repetition penalty, ...) are
  ignored, as the reference Python server ignores every parameter.

Differences from the reference: many clients at once (the reference serves one at a time, the
others wait on its lock); the first step's answer is 80 ms of silence where the reference sends
nothing (the duplex contract answers every frame: the same timing on the wire); errors are sent
(the reference only logs them); the API key, Origin check, connection limit, backlog, idle and
session limits of every duplex route apply (serving/security.py, serving/protocols/duplex.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from fastapi import FastAPI, WebSocket

import zoo

from ..errors import ApiError
from ..service import Service
from .duplex import DuplexSettings, DuplexSocket, ProtocolError, Wire, refuse_connection, unavailable

PROTOCOL = "kyutai-opus"  # its name in ModelCard.protocols
HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING = range(7)  # the kind bytes of rust/protocol.md
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


class OpusWire(Wire):
    """Binary kind-byte messages with Ogg/Opus audio both ways (``sphn``), the model's text pieces."""

    name = "kyutai-opus"
    json_events = False  # no session.created / session.update: the handshake byte, options on the URL
    sends_text = True

    def __init__(self, card: zoo.ModelCard, options: dict, *, codec: bool = True) -> None:
        """``codec``: False for a wire that only refuses the connection (no Opus state)."""
        super().__init__()
        self.card, self.options = card, options
        if codec:
            import sphn

            self._reader_class = sphn.OpusStreamReader
            self.reader = sphn.OpusStreamReader(card.input_sample_rate)
            self.writer = sphn.OpusStreamWriter(card.output_sample_rate)

    def initial_options(self) -> dict:
        return dict(self.options)

    def samples(self, message: dict) -> np.ndarray:
        data = message.get("bytes")
        if data is None:
            raise ProtocolError("bad_message", "this protocol is binary: a kind byte, then its payload "
                                               "(0x01 + Ogg/Opus audio)")
        if not data or data[0] == PING:
            return np.zeros(0, np.float32)
        kind = data[0]
        if kind in (CONTROL, METADATA):
            raise ProtocolError("unsupported_kind", f"message kind {kind} (control/metadata) is not taken here; "
                                                    f"send audio (kind 1)")
        if kind != AUDIO:
            raise ProtocolError("unknown_kind", f"unknown message kind {kind}; send audio (kind 1: Ogg/Opus)")
        try:
            pcm = self.reader.append_bytes(data[1:])
        except ValueError as err:  # not Ogg/Opus: the reader cannot skip it, so the stream restarts
            self.reader = self._reader_class(self.card.input_sample_rate)
            raise ProtocolError("bad_audio", f"the audio is not an Ogg/Opus stream ({err}); the message is "
                                             f"dropped and the stream restarts") from None
        return np.asarray(pcm, np.float32).reshape(-1)

    async def greet(self, socket: DuplexSocket) -> None:
        async with socket.send_lock:
            await socket.ws.send_bytes(bytes([HANDSHAKE]))

    def error_message(self, code: str, message: str, **extra) -> bytes:
        return bytes([ERROR]) + f"{code}: {message}".encode()

    async def send_audio(self, ws: WebSocket, audio: np.ndarray) -> None:
        pages = self.writer.append_pcm(np.ascontiguousarray(np.clip(audio, -1.0, 1.0), np.float32))
        if pages:
            await ws.send_bytes(bytes([AUDIO]) + pages)

    async def send_text(self, ws: WebSocket, text: str) -> None:
        await ws.send_bytes(bytes([TEXT]) + text.encode())


def check_card(card: zoo.ModelCard, options_class: type) -> dict:
    """The card's parameter -> option map, after checking that Opus can carry its audio
    (ValueError at start otherwise, as for a map naming an option the model does not have)."""
    params = dict(card.protocols.get(PROTOCOL, {}))
    if PROTOCOL not in card.protocols or not card.duplex:
        return params
    unknown = sorted(set(params.values()) - {f.name for f in dataclasses.fields(options_class)})
    if unknown:
        raise ValueError(f"{card.name}'s card maps {PROTOCOL} parameters to unknown options: {unknown}")
    if card.input_sample_rate not in OPUS_RATES or card.output_sample_rate not in OPUS_RATES:
        raise ValueError(f"{card.name}'s card declares {PROTOCOL} but Opus cannot carry its audio "
                         f"({card.input_sample_rate} / {card.output_sample_rate} Hz; Opus: {OPUS_RATES})")
    return params


def query_options(service: Service, params: dict, query) -> dict:
    """The model options the URL's mapped parameters set (ApiError if one is not a valid value)."""
    values = {}
    for param, option in params.items():
        raw = query.get(param)
        if raw is None:
            continue
        try:
            number = float(raw)
        except ValueError:
            raise ApiError(422, "bad_option", f"{param} must be a number, got {raw!r}") from None
        values[option] = int(number) if number.is_integer() and abs(number) < 2**53 else number
    service.options(values)  # ApiError 422 for NaN, negative, too large; 400 for a wrong type
    return values


def install(app: FastAPI, service: Service, duplex: DuplexSettings) -> None:
    card = service.model.card
    refusal = unavailable(service) or (None if PROTOCOL in card.protocols else
                                    ("not_offered", f"{card.name} does not declare the {PROTOCOL} protocol"))
    params = check_card(card, service.model.options_class)

    @app.websocket("/api/chat")
    async def api_chat(websocket: WebSocket):
        if refusal is not None:
            await refuse_connection(websocket, service.metrics, OpusWire(card, {}, codec=False), *refusal)
            return
        try:
            options = query_options(service, params, websocket.query_params)
        except ApiError as err:
            await refuse_connection(websocket, service.metrics, OpusWire(card, {}, codec=False), err.kind, err.message)
            return
        await DuplexSocket(websocket, service, duplex, OpusWire(card, options)).run()
