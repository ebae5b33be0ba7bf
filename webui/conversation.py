"""The Streamlit chat's turns: one dict per question (kept in the session state), and how a turn
is shown: the spoken question (and the image it was asked with, for a model whose card says
image_input), then the reply as it streams (the player) or as it ended: its text, time to first
audio, length, waveform, or the one-line error of a reply that failed."""
from __future__ import annotations

import base64

import numpy as np
import streamlit as st

from webui.catalog import ModelEntry
from webui.reply_player import Reply, play_reply
from webui.waveform import waveform_svg

AUDIO_ONLY = "(audio only)"  # the reply text of a model whose card says it has no text stream
IMAGE_CAPTION = "the image the question is about"


def new_turn(turn_id: str, wav: bytes, entry: ModelEntry, max_tokens: int | None,
             image: bytes | None = None, image_type: str = "image/png") -> dict:
    """``image``: the file sent with the question (only for a card with image_input)."""
    image = image if image and entry.image_input else None
    return {"id": turn_id, "question": wav, "question_pcm": None, "model": entry.id,
            "text_output": entry.text_output, "max_tokens": max_tokens, "status": "streaming", "error": None,
            "text": "", "audio": np.zeros(0, np.float32), "rate": 24000, "ttfa_ms": None,
            "image": image, "image_type": image_type}


def image_url(turn: dict) -> str | None:
    """The turn's image as the realtime protocol's input_image wants it: a data URL."""
    if not turn["image"]:
        return None
    return f"data:{turn['image_type']};base64,{base64.b64encode(turn['image']).decode()}"


def render_turn(turn: dict, api_url: str, api_key: str | None, latest: bool) -> None:
    with st.chat_message("user"):
        st.markdown("(spoken question)")
        if turn.get("image"):
            st.image(turn["image"], caption=IMAGE_CAPTION, width=240)
        st.audio(turn["question"], format="audio/wav")
    with st.chat_message("assistant"):
        # the latest turn keeps its player in place on every rerun, so a reply that has finished
        # arriving goes on playing while the page shows its record
        if latest and turn["question_pcm"] is not None:
            reply = play_reply(turn["id"], api_url, turn["model"], turn["question_pcm"],
                               max_tokens=turn["max_tokens"], api_key=api_key, image=image_url(turn))
            if reply is not None and turn["status"] == "streaming":
                _record(turn, reply)
        if turn["status"] != "streaming":
            _show_ended(turn)


def _record(turn: dict, reply: Reply) -> None:
    turn.update(status=reply.status, error=reply.error, text=reply.text.strip(), audio=reply.audio,
                rate=reply.rate, ttfa_ms=reply.ttfa_ms)


def _show_ended(turn: dict) -> None:
    seconds = turn["audio"].size / turn["rate"]
    if turn["status"] != "completed":
        st.error(turn["error"] or "the reply failed", icon=":material/error:")
        if seconds:
            st.caption(f"incomplete: {seconds:.1f} s of audio arrived before it broke off")
    if not seconds:
        if turn["status"] == "completed":
            st.warning("the reply had no audio")
        return
    if turn["status"] == "completed":
        st.markdown(turn["text"] if turn["text_output"] and turn["text"] else
                    AUDIO_ONLY if not turn["text_output"] else "_(no text)_")
        ttfa = f"{turn['ttfa_ms']:.0f} ms" if turn["ttfa_ms"] is not None else "n/a"
        st.caption(f"{turn['model']} · time to first audio {ttfa} · {seconds:.1f} s of audio")
    elif turn["text"]:
        st.markdown(turn["text"] + " …")  # what arrived before the failure, visibly cut
    st.image(waveform_svg(turn["audio"]), caption="waveform of the reply", alt="waveform of the reply", width="stretch")
    st.audio(turn["audio"], sample_rate=turn["rate"])
