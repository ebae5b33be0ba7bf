"""The voice chat page (served at /chat by webui/omni_streamlit.py): pick one of the models the
server offers (sidebar), record a question in the browser, and hear the reply as it streams
(webui/reply_player.py); each turn keeps its text, time to first audio, length and waveform. For
a model whose card says image_input, an image upload (PNG or JPEG) beside the microphone: the
image goes with each question recorded while it is attached and shows in that turn.

Environment: ``API_URL`` (the server, default http://127.0.0.1:60808); ``BROWSER_API_URL`` (the
same server as the browser reaches it, when that differs, e.g. docker/compose.yaml: the reply
player and the live widgets connect from the browser); ``OMNI_ZOO_API_KEY`` (the
server's key, if it has one); ``OMNI_MAX_TOKENS`` (the reply cap the page starts with; unset: the
server's default for the model, which caps random-weight replies to a few seconds)."""
from __future__ import annotations

import os
import uuid

import streamlit as st

from webui.catalog import ModelEntry, list_models
from webui.client import DEFAULT_API_URL, BackendError, api_key
from webui.conversation import new_turn, render_turn
from webui.reply_player import question_pcm
from webui.widgets import live_widgets
from zoo.core.errors import AudioInputError

api_url = os.environ.get("API_URL", DEFAULT_API_URL)
browser_api_url = os.environ.get("BROWSER_API_URL") or api_url

st.title("Voice chat")

problem = None
try:
    models = st.session_state["models"] = list_models(api_url)
except BackendError as err:
    problem, models = str(err), st.session_state.get("models")
# Always one element here, filled or not: elements above a reply's player keep their places, so
# Streamlit keeps the player (and its sound) when the server's state changes.
server_problem = st.empty()
if problem and models:  # the server went away mid-conversation: keep the conversation, say what happened
    server_problem.warning(f"{problem} (the page goes on with the models it listed before)", icon=":material/cloud_off:")
elif problem:
    st.error(problem)
    st.info("Hint: start the server in another terminal, e.g. `python server.py` (or `python server.py --tiny` "
            "to try it without weights), then reload this page. The UI uses `API_URL` "
            f"(now `{api_url}`).")
    st.stop()


def reply_cap(entry: ModelEntry) -> int | None:
    """The cap a model's turns start with: OMNI_MAX_TOKENS, else the server's own default (None:
    the model's)."""
    return int(os.environ.get("OMNI_MAX_TOKENS") or 0) or entry.default_max_new_tokens


with st.sidebar:
    by_id = {entry.id: entry for entry in models}
    entry = by_id[st.selectbox("Model", list(by_id), key="model",
                               help="The models this server offers (GET /v1/models)")]
    # keyed by model: switching models starts from that model's own default cap
    max_tokens = st.number_input("Reply cap (max tokens)", min_value=1, value=reply_cap(entry), step=1,
                                 key=f"cap-{entry.id}", placeholder="the model's default",
                                 help="Sent with each question as the reply's token limit; empty: the model's own.")
    st.caption(" · ".join(entry.facts()))

title = entry.card.get("title") or entry.id
st.markdown(f"Model: **{entry.id}** ({title}) &nbsp;·&nbsp; server {api_url}")
notice = st.empty()  # one element whatever the model, as server_problem above
if entry.notice or entry.random_weights:
    notice.warning(entry.notice or "random weights: replies are noise", icon=":material/warning:")

live_widgets(browser_api_url, entry)

turns: list[dict] = st.session_state.setdefault("turns", [])
history = st.container()
# The image slot is one element whatever the model (empty for a model without image input), so
# the microphone below keeps its place when the model changes (a moved audio_input loses its state)
image_slot, picture = st.empty(), None
if entry.image_input:  # the card decides; keyed by model, so another model starts without one
    picture = image_slot.container().file_uploader(
        "Image (optional)", type=["png", "jpg", "jpeg"], key=f"image-{entry.id}",
        help=f"{entry.id} answers the question about this image; it goes with each question you record "
             "while it is here.")
recording = st.audio_input("Speak your question", key="mic")

if recording is not None:
    wav = recording.getvalue()
    # each recording is a new upload with its own id; the same words asked twice (same bytes) are
    # still two questions
    if recording.file_id != st.session_state.get("last_recording"):
        st.session_state["last_recording"] = recording.file_id
        if turns and turns[-1]["status"] == "streaming":  # its player goes away with this rerun
            turns[-1].update(status="failed", error="interrupted by the next question before the reply finished")
        turn = new_turn(uuid.uuid4().hex[:12], wav, entry, int(max_tokens) if max_tokens else None,
                        image=picture.getvalue() if picture is not None else None,
                        image_type=picture.type if picture is not None else "image/png")
        try:
            turn["question_pcm"] = question_pcm(wav, entry.card.get("max_input_seconds"))
        except AudioInputError as err:
            turn.update(status="failed", error=f"the recording could not be sent: {err}")
        for old in turns:  # only the latest turn's player needs its question
            old["question_pcm"] = None
        turns.append(turn)

with history:
    for index, turn in enumerate(turns):
        render_turn(turn, browser_api_url, api_key(), latest=index == len(turns) - 1)
