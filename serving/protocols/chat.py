"""``POST /chat``, served for every model (``respond`` is part of the contract): the Mini-Omni
reference clients' protocol. JSON ``{"audio": base64 audio file, "stream_stride": 4,
"max_tokens": 2048, "image": base64 image file (cards with image_input, as the Mini-Omni2 clients
send it), ...model options}`` -> chunked raw PCM s16le mono at the model's output rate;
with ``Accept: multipart/x-mixed-replace`` or ``"format": "multipart"`` (the default for cards
whose protocols include "chat-multipart"; ``"format": "pcm"`` opts out), Mini-Omni2-style parts
alternating audio and text. Refusals and early failures are JSON errors before any byte is sent;
a reply that fails later is cut (no final chunk)."""
from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from zoo.core.audio import float_to_pcm16

from ..errors import ApiError, GenerationFailed, ReplyAborted
from ..http_input import READ_TIMEOUT_S, decode_audio_field, decode_image_field, read_json
from ..service import Service

MAX_BODY_BYTES = 25 * 1024 * 1024  # a base64 WAV of 30 s at 48 kHz stereo is ~7.7 MB
MULTIPART_BOUNDARY = b"frame"
# card.protocols name: the model's reference clients expect /chat to answer in multipart (Mini-Omni2)
MULTIPART_PROTOCOL = "chat-multipart"
# /chat field -> option name: the reference clients' field names
FIELD_ALIASES = {"max_tokens": "max_new_tokens"}
TRANSPORT_FIELDS = {"audio", "format", "model", "image"}


def multipart_part(content_type: str, payload: bytes) -> bytes:
    return b"\r\n--" + MULTIPART_BOUNDARY + b"\r\nContent-Type: " + content_type.encode() + b"\r\n\r\n" + payload


def install(app: FastAPI, service: Service, *, max_body_bytes: int = MAX_BODY_BYTES,
            read_timeout: float = READ_TIMEOUT_S) -> None:
    card = service.model.card

    @app.post("/chat")
    async def chat(request: Request):
        data = await read_json(request, max_body_bytes, read_timeout)
        if data.get("model", card.name) != card.name:  # OpenAI style: the model a client meant
            raise ApiError(404, "model_not_found", f"this server runs {card.name!r}, not {data['model']!r}: "
                                                   "GET /v1/models lists what it offers")
        audio = decode_audio_field(data)
        image = decode_image_field(data)
        if image is not None and not card.image_input:
            raise ApiError(400, "unsupported", f"{card.name} does not take images (field 'image')")
        options = service.options({FIELD_ALIASES.get(k, k): v for k, v in data.items() if k not in TRANSPORT_FIELDS})
        wire = data.get("format")
        if wire not in (None, "multipart", "pcm"):
            raise ApiError(400, "bad_request", f"field 'format' must be 'multipart' or 'pcm', got {wire!r}")
        # a card with the "chat-multipart" protocol: its reference clients read multipart by default
        multipart = wire == "multipart" or (wire is None and (
            MULTIPART_PROTOCOL in card.protocols or "multipart/x-mixed-replace" in request.headers.get("accept", "")))
        reply = service.stream(audio, None, options, received=time.perf_counter(), image=image)
        try:  # refusals (busy, bad audio) and early failures become HTTP errors before any byte is sent
            first = await anext(reply, None)
        except GenerationFailed as err:  # logged and counted by the service
            raise ApiError(500, "generation", str(err), reported=True) from None

        async def body():
            try:
                chunk = first
                while chunk is not None:
                    pcm = float_to_pcm16(chunk.audio).tobytes() if chunk.audio.size else b""
                    if multipart:
                        yield multipart_part("audio/wav", pcm) + multipart_part("text/plain", chunk.text.encode())
                    elif pcm:
                        yield pcm
                    chunk = await anext(reply, None)
            except GenerationFailed as err:  # logged and counted by the service
                if multipart:
                    yield multipart_part("text/plain", f"[error: {err}]".encode())
                raise ReplyAborted(str(err)) from None  # no final chunk: the client sees a truncated reply
            finally:
                await reply.aclose()

        media = f"multipart/x-mixed-replace; boundary={MULTIPART_BOUNDARY.decode()}" if multipart else "application/octet-stream"
        headers = {"X-Model": card.name, "X-Sample-Rate": str(card.output_sample_rate),
                   "X-Audio-Format": "pcm_s16le", "X-Channels": "1"}
        return StreamingResponse(body(), media_type=media, headers=headers)
