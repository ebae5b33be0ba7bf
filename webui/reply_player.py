"""The Streamlit chat's streamed reply: a component (webui/static/index.html + reply.js) that
sends the recorded question to the server's ``/v1/realtime`` as one manual turn (with its image,
if any, as a ``conversation.item.create`` input_image before the audio), plays the reply
through Web Audio as its chunks arrive and hands back the turn record when the reply ends.
reply.js says why the browser holds the stream and why it is the realtime socket."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import urlencode

import numpy as np
import streamlit.components.v1 as components

from webui.live import STATIC, realtime_url
from zoo.core.audio import float_to_pcm16, load_audio, pcm16_to_float

WIRE_RATE = 24000  # the realtime protocol's PCM16 rate, both ways

_component = components.declare_component("omni_reply", path=str(STATIC))


def question_pcm(wav: bytes, max_seconds: float | None = None) -> str:
    """A recorded question (any audio file) as base64 PCM16 mono at the wire rate; AudioInputError
    (a clear message) for audio that cannot be decoded or is over the model's limit."""
    audio = load_audio(wav, target_rate=WIRE_RATE, max_seconds=max_seconds)
    return base64.b64encode(float_to_pcm16(audio).tobytes()).decode()


@dataclass
class Reply:
    """What the player hands back when a reply ends: ``status`` "completed" or "failed" (with a
    one-line ``error``; the audio and text are what arrived before it failed)."""
    status: str
    error: str | None
    text: str
    audio: np.ndarray  # float32 at ``rate``
    rate: int
    ttfa_ms: float | None  # request sent -> first sample audible, measured in the browser

    @property
    def seconds(self) -> float:
        return self.audio.size / self.rate

    @classmethod
    def from_value(cls, value: dict) -> Reply:
        audio = pcm16_to_float(base64.b64decode(value.get("audio") or ""))
        return cls(value.get("status") or "failed", value.get("error"), value.get("text") or "", audio,
                   int(value.get("rate") or WIRE_RATE), value.get("ttfa_ms"))


def play_reply(turn_id: str, api_url: str, model: str, question: str, *, max_tokens: int | None,
               api_key: str | None, image: str | None = None) -> Reply | None:
    """Render the player for one turn: None while the reply streams, its Reply once it ended.
    Rendered again with the same ``turn_id`` (every rerun), the same player goes on playing.
    ``image``: a ``data:image/...;base64,`` URL sent with the question (cards with image_input)."""
    url = f"{realtime_url(api_url)}?{urlencode({'model': model})}"
    # `key` is Streamlit's widget key (one player per turn); the server's API key is `api_key`
    value = _component(turn=turn_id, ws=url, api_key=api_key, model=model, audio=question, max_tokens=max_tokens,
                       image=image, key=f"reply-{turn_id}", default=None)
    if not value or value.get("turn") != turn_id:
        return None
    return Reply.from_value(value)
