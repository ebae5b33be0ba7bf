"""The Hertz-dev reference server's live protocol (Standard Intelligence's ``inference_server.py``;
its ``inference_client.py`` and ``inference_client_webrtc.py`` work unchanged with
``--server ws://HOST:PORT``), served for a duplex model whose card lists ``"data-url-live"`` in
``card.protocols``; without it ``/audio`` refuses and ``/set_temperature`` is a 404 JSON error.
Frame size and rates are the card's; this protocol adds only its wire format:

``WS /audio``
  client -> server, text: ``"data:audio/raw;base64," + base64(int16 mono PCM at the card's input
  rate)``, ``card.frame_samples`` per message (other sizes are re-framed here; the reference
  needs exactly one frame); int16 / 32767 as the reference.
  server -> client, text: the same format, one message per complete input frame, ``x * 32767``
  truncated to int16 as the reference. Nothing else is sent except ``error`` JSON texts (as on
  ``/v1/duplex``; the reference just drops the connection). With a server prompt
  (``--duplex-prompt``), the first ``--replay-seconds`` worth of messages (default 3 s) are
  answered, as the reference does, with the prompt's last seconds (mono mix, ``np.array_split``
  into that many frames) while the microphone is ignored; then the model runs, continuing from
  the prompt.

``POST /set_temperature?token_temp=&categorical_temp=&gaussian_temp=`` (the reference client's
knob) sets the default options of ``/audio`` sessions opened afterwards (the reference's global
``TEMPS``), never a running one's. Which model option each parameter sets is the card's
(``card.protocols["data-url-live"]``); each value is checked as a model option (422 JSON error for
NaN, negative, too large, not a number); it needs the API key like every route; a parameter left
out keeps its value (the reference sets it to None and crashes); answers
``{"message": "Temperature updated to: (0.8, (0.4, 0.1))", "status": "success"}``.

Differences: many clients at once (the reference serves one), sessions opened later pick the new
temperatures up (the reference changes the running one), no recording is saved, no 50 ms sleeps
during the replay.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse

import zoo
from zoo.core.audio import float_to_pcm16, resample

from ..errors import ApiError
from ..service import Service
from .duplex import DuplexSettings, DuplexSocket, ProtocolError, Wire, refuse_connection, unavailable

PROTOCOL = "data-url-live"  # its name in ModelCard.protocols
DATA_URL_PREFIX = "data:audio/raw;base64,"
REPLAY_SECONDS = 3.0  # the reference server's REPLAY_SECONDS
# the knob's query parameters, in the order of the reference's TEMPS = (token, (categorical, gaussian))
KNOB_PARAMS = ("token_temp", "categorical_temp", "gaussian_temp")


@dataclasses.dataclass
class ReferenceSettings:
    replay_seconds: float = REPLAY_SECONDS
    options: dict = dataclasses.field(default_factory=dict)  # set by /set_temperature, for later sessions


class DataUrlWire(Wire):
    """Text ``data:audio/raw;base64,<int16 PCM>`` both ways, scaled and truncated as the reference."""

    name = "data-url"
    in_scale = 32767.0  # the reference divides by 32767
    json_events = False  # the reference client expects audio only; its text messages are audio
    sends_text = False

    def __init__(self, settings: ReferenceSettings) -> None:
        super().__init__()
        self.settings = settings

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
        pcm = float_to_pcm16(audio, rounding="truncate")  # the reference's conversion: x * 32767, truncated
        await ws.send_text(DATA_URL_PREFIX + base64.b64encode(pcm.tobytes()).decode())

    def initial_options(self) -> dict:
        return dict(self.settings.options)

    def opening_frames(self, prompt: tuple[np.ndarray, int] | None, card: zoo.ModelCard) -> list[np.ndarray]:
        if prompt is None or self.settings.replay_seconds <= 0:
            return []
        return replay_chunks(prompt, card.input_sample_rate, card.frame_samples, self.settings.replay_seconds)


def replay_chunks(prompt: tuple[np.ndarray, int], rate: int, frame: int, seconds: float) -> list[np.ndarray]:
    """The reference server's replay: the prompt at ``rate``, trimmed to whole frames, its last
    ``seconds`` mixed to mono and split into ``seconds * rate / frame`` pieces (np.array_split)."""
    audio, prompt_rate = prompt
    channels = audio.reshape(audio.shape[0], -1).T  # (channels, samples)
    channels = np.stack([resample(c, prompt_rate, rate) for c in channels])
    if channels.shape[0] == 1:
        channels = np.concatenate([channels, channels])
    channels = channels[:, : channels.shape[1] // frame * frame]
    tail = channels[:, -int(rate * seconds):].mean(axis=0)
    pieces = int(seconds * rate / frame)
    return [p.astype(np.float32) for p in np.array_split(tail, pieces)] if pieces and tail.size else []


def install(app: FastAPI, service: Service, duplex: DuplexSettings, settings: ReferenceSettings) -> None:
    card = service.model.card
    refusal = unavailable(service) or (None if PROTOCOL in card.protocols else
                                    ("not_offered", f"{card.name} does not declare the {PROTOCOL} protocol"))
    knob = dict(card.protocols.get(PROTOCOL, {}))  # query parameter -> model option
    unknown = sorted(set(knob) - set(KNOB_PARAMS)) + sorted(set(knob.values()) - {f.name for f in dataclasses.fields(service.model.options_class)})
    if unknown:
        raise ValueError(f"{card.name}'s card maps {PROTOCOL} parameters wrongly: {unknown}")

    @app.websocket("/audio")
    async def audio(websocket: WebSocket):
        if refusal is not None:
            await refuse_connection(websocket, service.metrics, DataUrlWire(settings), *refusal)
        else:
            await DuplexSocket(websocket, service, duplex, DataUrlWire(settings)).run()

    @app.post("/set_temperature")
    async def set_temperature(request: Request) -> JSONResponse:
        """The default options of /audio sessions opened afterwards; a running session keeps its
        own. A parameter left out keeps its value; every value is checked as a model option."""
        if refusal is not None:
            raise ApiError(404, *refusal)
        given = {}
        for param, option in knob.items():
            raw = request.query_params.get(param)
            if raw is not None:
                try:
                    given[option] = float(raw)
                except ValueError:
                    raise ApiError(422, "bad_option", f"{param} must be a number, got {raw!r}") from None
        values = {**settings.options, **given}
        options = service.options(values)  # ApiError 422 for NaN, negative, huge
        settings.options = values
        token, categorical, gaussian = (getattr(options, knob[p]) if p in knob else None for p in KNOB_PARAMS)
        return JSONResponse({"message": f"Temperature updated to: {(token, (categorical, gaussian))}",
                             "status": "success"})
