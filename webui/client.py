"""What both web UIs talk to: server.py over HTTP (when API_URL is set) or a model loaded in this
process. Either way: a card and ``stream(wav_bytes, image=...) -> Iterator[Chunk]`` (an image only
for a model whose card says image_input)."""
from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import requests

from zoo.cli import noise_notice
from zoo.core.audio import pcm16_to_float
from zoo.core.types import Chunk

DEFAULT_API_URL = "http://127.0.0.1:60808"
API_KEY_ENV = "OMNI_ZOO_API_KEY"  # the key server.py was started with (--api-key), if any
BOUNDARY = b"\r\n--frame\r\n"


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def auth_headers() -> dict:
    key = api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


class BackendError(Exception):
    """The server is unreachable or refused the request; the message is for people."""


@dataclass
class BackendInfo:
    model: str
    output_sample_rate: int
    random_weights: bool
    where: str  # "server http://..." or "in-process"
    duplex: bool = False  # the card says full duplex: the pages offer the duplex widget
    input_sample_rate: int = 16000
    frame_samples: int = 0
    text_output: bool = True  # the card: False means replies are audio only (no text stream)
    notice: str | None = None  # what to tell people about random weights (noise, reply cap)
    default_max_new_tokens: int | None = None  # the reply cap a request gets unless it sets one
    image_input: bool = False  # the card: a question may come with an image (the pages offer one)

    def facts(self) -> str:
        """The card's facts people care about, one line."""
        replies = "speech and text" if self.text_output else "speech only (no text stream)"
        mode = "full duplex" if self.duplex else "turn by turn"
        image = " · takes an image with the question" if self.image_input else ""
        return (f"{self.model} · {self.where} · replies: {replies} · {self.input_sample_rate / 1000:g} kHz in, "
                f"{self.output_sample_rate / 1000:g} kHz out · {mode}{image}")


class ReplyBrokeOff(BackendError):
    """The reply started but did not finish (the server aborted it or the connection broke):
    what arrived is not the whole reply."""


class ServerBackend:
    def __init__(self, api_url: str, timeout: float = 300) -> None:
        self.api_url, self.timeout = api_url.rstrip("/"), timeout

    def info(self) -> BackendInfo:
        """The server's first (default) model."""
        return self.models()[0]

    def models(self) -> list[BackendInfo]:
        """Every model the server offers (GET /v1/models), default first."""
        try:
            response = requests.get(self.api_url + "/v1/models", headers=auth_headers(), timeout=5)
            if response.status_code == 401:
                raise BackendError(f"the voice server at {self.api_url} needs an API key: set {API_KEY_ENV}")
            response.raise_for_status()
            models = [self._entry(model) for model in response.json()["data"]]
            if not models:
                raise ValueError("no models")
        except (requests.RequestException, KeyError, IndexError, ValueError, TypeError) as err:
            raise BackendError(f"cannot reach the voice server at {self.api_url} ({type(err).__name__}). "
                               f"Start it with `python server.py`, or set API_URL.") from None
        return models

    def _entry(self, model: dict) -> BackendInfo:
        card = model["card"]
        return BackendInfo(model["id"], card["output_sample_rate"], bool(model.get("random_weights")),
                           f"server {self.api_url}", duplex=bool(card.get("duplex")),
                           input_sample_rate=card.get("input_sample_rate") or 16000,
                           frame_samples=card.get("frame_samples") or 0,
                           text_output=bool(card.get("text_output", True)), notice=model.get("notice"),
                           default_max_new_tokens=model.get("default_max_new_tokens"),
                           image_input=bool(card.get("image_input")))

    def stream(self, wav: bytes, options: dict | None = None, model: str | None = None,
               image: bytes | None = None) -> Iterator[Chunk]:
        """POST /chat in multipart mode: audio and text deltas as they are generated. ``model``:
        one of ``models()`` (None: the server's default). ``image``: the bytes of a PNG/JPEG file
        the question is about (its ``image`` field, as the Mini-Omni2 clients send it; for models
        whose card says image_input). A reply cut short raises ReplyBrokeOff."""
        body = {"audio": base64.b64encode(wav).decode(), "format": "multipart", **(options or {})}
        if model:
            body["model"] = model
        if image:
            body["image"] = base64.b64encode(image).decode()
        try:
            response = requests.post(self.api_url + "/chat", json=body, headers=auth_headers(), stream=True,
                                     timeout=self.timeout)
        except requests.RequestException as err:
            raise BackendError(f"cannot reach the voice server at {self.api_url} ({type(err).__name__})") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise BackendError(f"the server refused the request (HTTP {response.status_code}): {message}")
        try:
            yield from parse_multipart(response.iter_content(chunk_size=4096))
        except requests.RequestException as err:  # no final chunk: the server cut the reply
            raise ReplyBrokeOff(f"the reply from {self.api_url} broke off before it finished "
                                f"({type(err).__name__})") from None


def parse_multipart(pieces: Iterator[bytes]) -> Iterator[Chunk]:
    """Mini-Omni2-style stream: parts ``--frame`` + headers + payload, audio (PCM16) then text."""
    buffer = b""
    audio: np.ndarray | None = None

    def part(raw: bytes):
        nonlocal audio
        head, _, payload = raw.partition(b"\r\n\r\n")
        if b"audio/" in head:
            audio = pcm16_to_float(payload)
            return None
        if audio is None and payload.startswith(b"[error:"):  # the server's last part before it cuts the reply
            reason = payload.decode("utf-8", "replace").removeprefix("[error:").removesuffix("]").strip()
            raise ReplyBrokeOff(f"the reply broke off: {reason}")
        chunk = Chunk(audio=audio if audio is not None else np.zeros(0, np.float32), text=payload.decode("utf-8", "replace"))
        audio = None
        return chunk

    try:
        for piece in pieces:
            buffer += piece
            # a part is complete once the next boundary has arrived
            while True:
                start = buffer.find(BOUNDARY)
                end = buffer.find(BOUNDARY, start + len(BOUNDARY)) if start >= 0 else -1
                if end < 0:
                    break
                chunk = part(buffer[start + len(BOUNDARY) : end])
                buffer = buffer[end:]
                if chunk is not None:
                    yield chunk
    except ReplyBrokeOff:
        raise
    except Exception:
        # the stream broke: the last part that arrived may be the server's reason (then that is raised)
        if buffer.startswith(BOUNDARY):
            part(buffer[len(BOUNDARY):])
        raise
    if buffer.startswith(BOUNDARY):
        chunk = part(buffer[len(BOUNDARY):])
        if chunk is not None:
            yield chunk


class LocalBackend:
    """The model in this process (like a hosted demo page)."""

    def __init__(self, model) -> None:
        self.model = model

    def info(self) -> BackendInfo:
        card = self.model.card
        return BackendInfo(card.name, card.output_sample_rate, self.model.random_weights is not None, "in-process",
                           duplex=card.duplex, input_sample_rate=card.input_sample_rate,
                           frame_samples=card.frame_samples or 0, text_output=card.text_output,
                           notice=noise_notice(self.model), default_max_new_tokens=self.model.default_max_new_tokens,
                           image_input=card.image_input)

    def models(self) -> list[BackendInfo]:
        """The one model loaded here."""
        return [self.info()]

    def stream(self, wav: bytes, options: dict | None = None, model: str | None = None,
               image: bytes | None = None) -> Iterator[Chunk]:
        if model and model != self.model.card.name:  # as the server answers (404 model_not_found)
            raise BackendError(f"this page runs {self.model.card.name!r}, not {model!r}")
        try:
            yield from self.model.respond(wav, options=options, image=image or None)
        except Exception as err:  # zoo errors carry clear messages; show them, do not crash the page
            raise BackendError(str(err)) from None


def backend_from_env(load_model=None):
    """API_URL set: the server. Unset: ``load_model()`` in-process (or the default server)."""
    url = os.environ.get("API_URL")
    if url or load_model is None:
        return ServerBackend(url or DEFAULT_API_URL)
    return LocalBackend(load_model())
