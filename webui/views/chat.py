"""The voice chat page (served at /chat by webui/omni_streamlit.py): record a question in the
browser, send it to server.py, play the spoken reply and show its text and time to first audio.

Environment: ``API_URL`` (the server, default http://127.0.0.1:60808); ``OMNI_MAX_TOKENS``
(optional cap on reply tokens sent as ``max_tokens``; unset: the server's default)."""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import requests
import streamlit as st
import streamlit.components.v1 as components

from webui.client import DEFAULT_API_URL, BackendError, ServerBackend, api_key
from webui.live import DUPLEX_JS, LIVE_JS, duplex_url, duplex_widget_html, realtime_url, widget_html

api_url = os.environ.get("API_URL", DEFAULT_API_URL)
backend = ServerBackend(api_url)
max_tokens = int(os.environ.get("OMNI_MAX_TOKENS") or 0)

st.title("Voice chat")

try:
    info = backend.info()
except BackendError as err:
    st.error(str(err))
    st.info("Hint: start the server in another terminal, e.g. `python server.py` (or `python server.py --tiny` "
            "to try it without weights), then reload this page. The UI uses `API_URL` "
            f"(now `{api_url}`).")
    st.stop()

st.markdown(f"Model: **{info.model}** &nbsp;·&nbsp; {info.where}")
if info.random_weights:
    st.warning("random weights: replies are noise (the server runs a model with random weights, "
               "e.g. `server.py --tiny`)", icon=":material/warning:")

turns: list[dict] = st.session_state.setdefault("turns", [])

def live_widget(ws_url: str) -> None:
    """The low-latency live chat (the same widget as the Gradio page), in a component iframe
    (Streamlit allows it the microphone)."""
    script = f"<script>const element = document.body;</script><script>{LIVE_JS}</script>"
    components.html(widget_html(ws_url, api_key()) + script, height=160, scrolling=True)


def duplex_widget(ws_url: str) -> None:
    """Full duplex (models whose card says so): the same widget as the Gradio page's."""
    html = duplex_widget_html(ws_url, info.input_sample_rate, info.frame_samples, api_key())
    script = f"<script>const element = document.body;</script><script>{DUPLEX_JS}</script>"
    components.html(html + script, height=80, scrolling=False)


if info.duplex:
    with st.expander("Full duplex (live): talk whenever you like; the model listens and speaks at the same time "
                     "(headphones help)", expanded=True):
        duplex_widget(duplex_url(api_url))
else:
    with st.expander("Live chat (low latency): talk, pause, and the reply plays as it is generated", expanded=True):
        live_widget(realtime_url(api_url))


def render(turn: dict, autoplay: bool = False) -> None:
    with st.chat_message("user"):
        st.markdown("(spoken question)")
        st.audio(turn["question"], format="audio/wav")
    with st.chat_message("assistant"):
        show_reply(turn, autoplay)


def show_reply(turn: dict, autoplay: bool) -> None:
    if turn.get("error"):
        st.error(turn["error"])
        return
    if turn["audio"].size:
        st.audio(turn["audio"], sample_rate=turn["rate"], autoplay=autoplay)
    else:
        st.warning("the reply had no audio")
    st.markdown(turn["text"] or "_(no text)_")
    ttfa = f"{turn['ttfa_ms']:.0f} ms" if turn["ttfa_ms"] is not None else "n/a"
    st.caption(f"TTFA {ttfa} · {turn['audio'].size / turn['rate']:.1f} s of audio")


def ask(wav: bytes) -> dict:
    """One turn against the server; errors become a message, never an exception."""
    turn = {"question": wav, "audio": np.zeros(0, np.float32), "rate": info.output_sample_rate,
            "text": "", "ttfa_ms": None, "error": None}
    pieces, text = [], []
    started = time.monotonic()
    try:
        for chunk in backend.stream(wav, {"max_tokens": max_tokens} if max_tokens else None):
            if chunk.audio.size:
                if turn["ttfa_ms"] is None:
                    turn["ttfa_ms"] = (time.monotonic() - started) * 1000
                pieces.append(np.asarray(chunk.audio, np.float32))
            text.append(chunk.text)
    except BackendError as err:
        turn["error"] = str(err)
    except requests.RequestException as err:  # the connection broke mid-reply
        turn["error"] = f"the reply from {api_url} broke off ({type(err).__name__})"
    except Exception as err:  # noqa: BLE001 - show it, do not print a traceback on the page
        turn["error"] = f"unexpected error: {type(err).__name__}: {err}"
    if pieces:
        turn["audio"] = np.concatenate(pieces)
    turn["text"] = "".join(text).strip()
    return turn


history = st.container()
recording = st.audio_input("Speak your question", key="mic")

with history:
    for old in turns:
        render(old)
    if recording is not None:
        wav = recording.getvalue()
        digest = hashlib.sha256(wav).hexdigest()
        if digest != st.session_state.get("last_recording"):
            st.session_state["last_recording"] = digest
            with st.chat_message("user"):
                st.markdown("(spoken question)")
                st.audio(wav, format="audio/wav")
            with st.chat_message("assistant"):
                with st.spinner("The model is answering…"):
                    turn = ask(wav)
                show_reply(turn, autoplay=True)
            turns.append(turn)
