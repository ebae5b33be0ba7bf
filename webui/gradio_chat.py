"""The Gradio voice-chat page itself (``build``): the model picker with the card's facts, the
random-weight notice, the conversation (turn-by-turn replies with their numbers and waveform, and
the live widget's transcript), the microphone, the image input (upload or webcam; shown only while
the chosen model's card says image_input: the image goes with the question and is shown in its
turn) and the reply player. webui/omni_gradio.py serves it.

Every reply ends in the conversation: finished (text or "(audio only)", time to first audio,
seconds of audio, waveform) or failed (the one-line reason); the status always returns to ready."""
from __future__ import annotations

import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np

from webui.client import BackendError, BackendInfo, api_key
from webui.live import DUPLEX_JS, LIVE_JS, duplex_url, duplex_widget_html, realtime_url, widget_html
from webui.turns import error_text, reply_text, turn_stats, waveform_png
from zoo.core.audio import float_to_pcm16

TITLE = "omni-zoo voice chat"
READY, QUEUED, THINKING, SPEAKING = "ready", "waiting for its turn…", "thinking…", "speaking…"
QUESTION = "(spoken question)"
IMAGE_ALT = "the image the question is about"
CONVERSATION_HEIGHT_PX = 420  # the conversation scrolls inside this height; the page does not grow
# the random-weight notice is a banner nobody can miss; the page's columns stack on a phone
PAGE_CSS = """
#notice { background: #fef3c7; border: 2px solid #d97706; border-radius: 8px; padding: 6px 12px; }
#notice p { margin: 0; color: #78350f; }
@media (max-width: 640px) {
  #conversation { height: 300px !important; }
  #turn-controls { order: -1; }  /* on a phone the recorder comes first, the conversation below it */
}
"""
# waveform pictures live here until Gradio copies them into its own cache for the browser
WAVEFORMS = Path(tempfile.mkdtemp(prefix="omni-zoo-waveforms-"))


@dataclass
class Catalog:
    """The models the backend offers, by id (default first), or why it could not say."""
    models: dict[str, BackendInfo] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def read(cls, backend) -> Catalog:
        try:
            return cls({info.model: info for info in backend.models()})
        except BackendError as err:
            return cls(error=str(err))

    @property
    def default(self) -> BackendInfo | None:
        return next(iter(self.models.values()), None)


def facts_markdown(catalog: Catalog, model: str | None) -> str:
    info = catalog.models.get(model) if model else None
    if info is None:
        return f"**Error:** {catalog.error}" if catalog.error else "**Error:** no model chosen"
    return info.facts()


def notice_markdown(catalog: Catalog, model: str | None) -> str:
    info = catalog.models.get(model) if model else None
    return f"⚠ **{info.notice}**" if info is not None and info.notice else ""


def takes_image(catalog: Catalog, model: str | None) -> bool:
    """The chosen model's card says a question may come with an image."""
    info = catalog.models.get(model) if model else None
    return info is not None and info.image_input


def image_control(catalog: Catalog, model: str | None):
    """The image input follows the chosen model's card: shown for image_input, else hidden and
    emptied (an image picked for another model is not sent along unseen)."""
    if takes_image(catalog, model):
        return gr.update(visible=True)
    return gr.update(visible=False, value=None)


def model_controls(catalog: Catalog, model: str | None):
    """What follows the chosen model: its facts, its notice, its reply cap (the field shows
    the cap requests get by default; empty: the model's own default, no cap) and the image input."""
    info = catalog.models.get(model) if model else None
    notice = notice_markdown(catalog, model)
    return (facts_markdown(catalog, model), gr.update(value=notice, visible=bool(notice)),
            gr.update(value=info.default_max_new_tokens if info is not None else None), image_control(catalog, model))


def question_message(image: str | None) -> dict:
    """The user's turn in the conversation: the spoken question, and the image it was asked with."""
    if not image:
        return {"role": "user", "content": QUESTION}
    return {"role": "user", "content": [QUESTION, {"path": image, "alt_text": IMAGE_ALT}]}


# clicks the recorder's stop button once the page's recording limit has passed
RECORDING_LIMIT_JS = """() => { setTimeout(() => {
    const stop = document.querySelector('#question button.stop-button');
    if (stop) stop.click();
}, %d); }"""


def status_markdown(state: str) -> str:
    return f"Status: **{state}**"


def _reply_options(max_tokens) -> dict | None:
    """The user's reply cap, if they set one (an empty field arrives as 0 or None)."""
    return {"max_new_tokens": int(max_tokens)} if max_tokens and max_tokens > 0 else None


def _finished_reply(info: BackendInfo, text: str, audio: list[np.ndarray], ttfa_ms: float | None) -> list:
    """The assistant's message once a reply finished: text, its numbers, its waveform."""
    samples = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    content = [f"{reply_text(text, info.text_output, finished=True)}\n\n"
               f"*{turn_stats(ttfa_ms, samples.size, info.output_sample_rate)}*"]
    if samples.size:
        # the name says what it is: Gradio 6 drops alt_text from the <img> it renders
        png = tempfile.NamedTemporaryFile(dir=WAVEFORMS, prefix="waveform-", suffix=".png", delete=False)
        with png:
            png.write(waveform_png(samples))
        content.append({"path": png.name, "alt_text": "waveform of the reply"})
    return content


def live_widget(ws_url: str) -> gr.HTML:
    """Talk continuously: browser mic -> server.py's /v1/realtime -> WebAudio, no file round trip
    and no HLS buffering. An empty ``ws_url`` means this page's own origin."""
    return gr.HTML(value=widget_html(ws_url, api_key()), js_on_load=LIVE_JS, label="Live (low latency)")


def duplex_widget(ws_url: str, info: BackendInfo) -> gr.HTML:
    """Full duplex: browser mic -> server.py's /v1/duplex -> the model's frames -> WebAudio, both
    ways at once. An empty ``ws_url`` means this page's own origin."""
    html = duplex_widget_html(ws_url, info.input_sample_rate, info.frame_samples, api_key())
    return gr.HTML(value=html, js_on_load=DUPLEX_JS, label="Full duplex (live)")


def live_section(live_api: str | None, info: BackendInfo | None) -> None:
    """The live widget the default model's card allows, if the page has a live endpoint."""
    if live_api is None or info is None:
        return
    if info.duplex:
        frame_ms = 1000 * info.frame_samples / info.input_sample_rate
        gr.Markdown(f"**Full duplex**: press start and talk whenever you like; {info.model} listens and speaks "
                    f"at the same time, one {frame_ms:.0f} ms frame each way per step, and decides by itself "
                    f"when to speak. Headphones help: otherwise it hears itself through your microphone.")
        duplex_widget(duplex_url(live_api) if live_api else "", info)
    else:
        gr.Markdown("**Live chat**: talk, pause, and the reply plays as it is generated; talk over it to interrupt.")
        live_widget(realtime_url(live_api) if live_api else "")


class PublicPolicy:
    """What a public page (webui/space.py) adds to the page; this base class adds nothing. The
    page calls ``check`` before a question joins the queue (raise gr.Error to refuse it, with the
    message people see), ``turn_ended`` once a reply finished or failed, ``about`` for the chosen
    model's about panel (None: no panel), and reads the reply event's queue settings."""

    concurrency_limit: int | None | str = "default"  # gradio's: "default" is the queue's default
    concurrency_id: str | None = None
    resend_button = True  # "Send again" (a public page deletes each recording once answered)
    delete_cache: tuple[int, int] | None = None  # gradio's: (every s, files older than s) are deleted
    api_visibility = "public"  # "private": the reply events are for the page, not for API clients

    def check(self, recording: str | None, request: gr.Request) -> None:
        return None

    def turn_ended(self, recording: str, model: str, text: str, audio: np.ndarray, sample_rate: int,
                   ttfa_ms: float | None, error: str | None) -> None:
        return None

    def about(self, model: str | None) -> str | None:
        return None


def build(backend, live_api: str | None = None, policy: PublicPolicy | None = None) -> gr.Blocks:
    """``live_api``: where the live widget connects: server.py's http(s) URL, "" for this page's
    own origin (in-process), None for no live widget. The models are read again on every page
    load, so a server started after the page is found by reloading it. ``policy``: what a public
    page adds (limits, an about panel, what is kept); a backend with ``loading_note(model)`` says
    so in the status while a model loads on first use."""
    first = Catalog.read(backend)
    policy = policy or PublicPolicy()

    def respond(recording: str | None, image: str | None, history: list, model: str | None, max_tokens,
                catalog: Catalog):
        if not recording:
            raise gr.Error("Record or upload a question first.")
        image = image if image and takes_image(catalog, model) else None  # only for a card with image_input
        history = history + [question_message(image), {"role": "assistant", "content": "…"}]
        yield gr.skip(), history, status_markdown(THINKING)
        if model not in catalog.models:  # the server was down when the page loaded: ask again
            catalog = Catalog.read(backend)
            model = model if model in catalog.models else getattr(catalog.default, "model", None)
        info = catalog.models.get(model)
        if info is None:
            history[-1] = {"role": "assistant", "content": error_text(catalog.error or "no model to ask")}
            yield gr.skip(), history, status_markdown(READY)
            return
        loading = getattr(backend, "loading_note", lambda _model: None)(model)
        if loading:
            yield gr.skip(), history, status_markdown(loading)
        started, ttfa_ms, text, audio, failure = time.perf_counter(), None, "", [], "stopped before it finished"
        try:
            question = Path(recording).read_bytes()
            picture = Path(image).read_bytes() if image else None
            for chunk in backend.stream(question, _reply_options(max_tokens), model=model, image=picture):
                played = gr.skip()
                if chunk.audio.size:
                    if ttfa_ms is None:
                        ttfa_ms = (time.perf_counter() - started) * 1000
                    audio.append(np.asarray(chunk.audio, np.float32))
                    played = (info.output_sample_rate, float_to_pcm16(chunk.audio, rounding="truncate"))
                text += chunk.text
                history[-1] = {"role": "assistant", "content": reply_text(text, info.text_output)}
                yield played, history, status_markdown(SPEAKING if ttfa_ms is not None else THINKING)
            failure = None
        except Exception as err:  # noqa: BLE001 - every failure ends in the conversation, not in a stuck page
            if not isinstance(err, BackendError):  # unexpected: the log gets the traceback, people one line
                traceback.print_exc(file=sys.stderr)
                err = f"unexpected error: {type(err).__name__}: {err}"
            partial = f"{text.strip()}\n\n" if text.strip() else ""
            failure = str(err)
            history[-1] = {"role": "assistant", "content": partial + error_text(err)}
            yield gr.skip(), history, status_markdown(READY)
            return
        finally:
            samples = np.concatenate(audio) if audio else np.zeros(0, np.float32)
            policy.turn_ended(recording, model, text, samples, info.output_sample_rate, ttfa_ms, failure)
        history[-1] = {"role": "assistant", "content": _finished_reply(info, text, audio, ttfa_ms)}
        yield gr.skip(), history, status_markdown(READY)

    with gr.Blocks(title=TITLE, delete_cache=policy.delete_cache) as demo:
        catalog = gr.State(first)
        with gr.Row(equal_height=True):
            with gr.Column(scale=3, min_width=240):
                gr.Markdown(f"# {TITLE}")
                facts = gr.Markdown(facts_markdown(first, getattr(first.default, "model", None)), elem_id="facts")
            choice = gr.Dropdown(list(first.models), value=getattr(first.default, "model", None), label="Model",
                                 interactive=True, scale=1, min_width=160, elem_id="model")
        first_notice = notice_markdown(first, getattr(first.default, "model", None))
        notice = gr.Markdown(first_notice, visible=bool(first_notice), elem_id="notice")
        first_about = policy.about(getattr(first.default, "model", None))
        about = None
        if first_about is not None:
            with gr.Accordion("About this model", open=False, elem_id="about-panel"):
                about = gr.Markdown(first_about, elem_id="about")
        with gr.Row(elem_id="page-columns"):
            with gr.Column(scale=3):  # the conversation: turn by turn above, live below
                chatbot = gr.Chatbot(label="Conversation", height=CONVERSATION_HEIGHT_PX, elem_id="conversation",
                                     feedback_options=None)
                live_section(live_api, first.default)
            with gr.Column(scale=2, elem_id="turn-controls"):
                gr.Markdown("**Turn by turn**: record (or upload) a question; it is sent when you stop.")
                mic = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Your question",
                               elem_id="question")
                # the card decides: shown only for a model that takes an image with the question
                # a PNG file whatever came in (Gradio's default is WebP): what the Mini-Omni2 clients send
                image = gr.Image(sources=["upload", "webcam"], type="filepath", format="png", label="Image (optional)",
                                 visible=takes_image(first, getattr(first.default, "model", None)), elem_id="image",
                                 height=220)
                reply = gr.Audio(label="Reply", streaming=True, autoplay=True, interactive=False, elem_id="reply")
                max_tokens = gr.Number(first.default.default_max_new_tokens if first.default else None,
                                       label="Max reply tokens", precision=0, minimum=0, elem_id="max-tokens",
                                       info="0 or empty: the model's own default")
                with gr.Row():
                    status = gr.Markdown(status_markdown(READY), elem_id="status")
                    send = gr.Button("Send again", variant="secondary", visible=policy.resend_button)
        inputs, outputs = [mic, image, chatbot, choice, max_tokens, catalog], [reply, chatbot, status]
        queueing = {"concurrency_limit": policy.concurrency_limit, "concurrency_id": policy.concurrency_id,
                    "api_visibility": policy.api_visibility}

        def admit(recording: str | None, request: gr.Request):
            policy.check(recording, request)  # gr.Error: refused, with the reason people see
            return status_markdown(QUEUED) if recording else gr.skip()

        for trigger in (mic.stop_recording, mic.upload, send.click):
            # the policy's check runs at once: a refused question never waits for a reply slot
            # (queued, in its own group without a limit, so that a refusal's gr.Error shows as a
            # toast, which an event outside the queue does not get)
            answered = trigger(admit, [mic], [status], show_progress="hidden", concurrency_limit=None,
                               concurrency_id="omni-zoo-admission", api_visibility=policy.api_visibility
                               ).success(respond, inputs, outputs, **queueing)
            if about is not None:  # the about panel's numbers include this reply
                answered.then(policy.about, [choice], [about], queue=False, show_progress="hidden",
                              api_visibility=policy.api_visibility)
        limit_s = getattr(policy, "max_recording_s", None)
        if limit_s:  # the browser stops a recording at the page's limit (the check refuses longer uploads)
            mic.start_recording(None, None, None, queue=False, js=RECORDING_LIMIT_JS % round(limit_s * 1000))
        controls = [facts, notice, max_tokens, image]

        def chosen(c, m):
            return (*model_controls(c, m), policy.about(m)) if about is not None else model_controls(c, m)

        choice.change(chosen, [catalog, choice], controls + ([about] if about is not None else []))

        def reload(known: Catalog):
            fresh = Catalog.read(backend)
            if fresh == known:  # nothing changed: leave the fields alone (the user may be typing in them)
                return fresh, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            model = getattr(fresh.default, "model", None)
            return (fresh, gr.update(choices=list(fresh.models), value=model), *model_controls(fresh, model))

        demo.load(reload, [catalog], [catalog, choice, *controls])
        if about is not None:  # the about panel's page numbers (replies, TTFA) as of this visit
            demo.load(policy.about, [choice], [about])
    return demo
