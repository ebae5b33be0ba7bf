"""A Gradio voice-chat page: record from the browser microphone (or upload a file); the turn is
sent when you stop recording; the reply streams back as audio (autoplay) with its transcript.

    python webui/omni_gradio.py                 # in-process model (like a hosted demo page)
    python webui/omni_gradio.py --tiny          # random tiny weights: the replies are noise
    API_URL=http://127.0.0.1:60808 python webui/omni_gradio.py   # talk to a running server.py

For a full-duplex model (its card says duplex) the live widget is
full duplex: the browser mic streams to /v1/duplex and the model's frames play as they come.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import gradio as gr
import uvicorn

import zoo
from webui.client import BackendError, LocalBackend, ServerBackend, api_key
from webui.live import DUPLEX_JS, LIVE_JS, duplex_url, duplex_widget_html, realtime_url, widget_html
from zoo.core.audio import float_to_pcm16

NOISE_BANNER = "**Random weights (--tiny): every reply is noise, not speech.**"
def live_widget(ws_url: str) -> gr.HTML:
    """Talk continuously: browser mic -> server.py's /v1/realtime -> WebAudio, no file round trip
    and no HLS buffering. An empty ``ws_url`` means this page's own origin."""
    return gr.HTML(value=widget_html(ws_url, api_key()), js_on_load=LIVE_JS, label="Live (low latency)")


def duplex_widget(ws_url: str, info) -> gr.HTML:
    """Full duplex: browser mic -> server.py's /v1/duplex -> the model's frames -> WebAudio, both
    ways at once. An empty ``ws_url`` means this page's own origin."""
    html = duplex_widget_html(ws_url, info.input_sample_rate, info.frame_samples, api_key())
    return gr.HTML(value=html, js_on_load=DUPLEX_JS, label="Full duplex (live)")


def build(backend, live_api: str | None = None) -> gr.Blocks:
    """``live_api``: where the live widget connects: server.py's http(s) URL, "" for this page's
    own origin (in-process), None for no live widget."""
    try:
        info = backend.info()
        header = f"# omni-zoo voice chat\nModel **{info.model}** ({info.where})"
        if info.random_weights:
            header += "\n\n" + NOISE_BANNER
    except BackendError as err:
        info, header = None, f"# omni-zoo voice chat\n\n**Error:** {err}"

    def respond(recording: str | None, history: list):
        if not recording:
            raise gr.Error("Record or upload a question first.")
        if info is None:
            raise gr.Error("The voice server is not reachable; start it and reload the page.")
        history = history + [{"role": "user", "content": "(spoken question)"},
                             {"role": "assistant", "content": ""}]
        yield gr.skip(), history, "thinking…"
        started, ttfa, text = time.perf_counter(), None, ""
        try:
            for chunk in backend.stream(Path(recording).read_bytes()):
                audio = gr.skip()
                if chunk.audio.size:
                    if ttfa is None:
                        ttfa = (time.perf_counter() - started) * 1000
                    audio = (info.output_sample_rate, float_to_pcm16(chunk.audio, rounding="truncate"))
                text += chunk.text
                history[-1] = {"role": "assistant", "content": text or "…"}
                status = f"{info.model} · TTFA {ttfa:.0f} ms" if ttfa is not None else "generating…"
                yield audio, history, status
        except BackendError as err:
            raise gr.Error(str(err)) from None
        total = time.perf_counter() - started
        ttfa_text = f"{ttfa:.0f} ms" if ttfa is not None else "no audio"
        yield gr.skip(), history, f"{info.model} · TTFA {ttfa_text} · reply finished in {total:.1f} s"

    with gr.Blocks(title="omni-zoo voice chat") as demo:
        gr.Markdown(header)
        if live_api is not None and info is not None and info.duplex:
            frame_ms = 1000 * info.frame_samples / info.input_sample_rate
            gr.Markdown(f"**Full duplex**: press start and talk whenever you like; {info.model} listens and speaks "
                        f"at the same time, one {frame_ms:.0f} ms frame each way per step, and decides by itself "
                        f"when to speak. Headphones help: otherwise it hears itself through your microphone.")
            duplex_widget(duplex_url(live_api) if live_api else "", info)
            gr.Markdown("**Turn by turn**: record (or upload) audio; it is sent when you stop.")
        elif live_api is not None:
            gr.Markdown("**Live chat**: talk, pause, and the reply plays as it is generated; talk over it to interrupt.")
            live_widget(realtime_url(live_api) if live_api else "")
            gr.Markdown("**Turn by turn**: record (or upload) a question; it is sent when you stop.")
        chatbot = gr.Chatbot(label="Conversation", height=360)
        with gr.Row():
            mic = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Your question")
            reply = gr.Audio(label="Reply", streaming=True, autoplay=True, interactive=False)
        status = gr.Markdown(elem_id="status")
        send = gr.Button("Send again", variant="secondary")
        outputs = [reply, chatbot, status]
        mic.stop_recording(respond, [mic, chatbot], outputs)
        mic.upload(respond, [mic, chatbot], outputs)
        send.click(respond, [mic, chatbot], outputs)
    return demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=zoo.names()[0], choices=zoo.names())
    parser.add_argument("--tiny", action="store_true", help="in-process only: tiny random weights (noise)")
    parser.add_argument("--device")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    api_url = os.environ.get("API_URL")
    if api_url:  # the page and the live widget both talk to server.py
        demo = build(ServerBackend(api_url), live_api=api_url)
        demo.queue(default_concurrency_limit=8).launch(server_name=args.host, server_port=args.port, show_error=True)
        return 0
    try:
        model = zoo.load(args.model, random_weights="tiny" if args.tiny else None, device=args.device)
    except zoo.ZooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # In-process: one FastAPI app serves the page and the server's routes (the live widget's
    # /v1/realtime and /v1/duplex among them) on the same origin.
    from serving.app import create_app
    from serving.service import Service

    app = create_app(Service(model, max_sessions=8, duplex_sessions=4))
    demo = build(LocalBackend(model), live_api="").queue(default_concurrency_limit=8)
    uvicorn.run(gr.mount_gradio_app(app, demo, path="/"), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
