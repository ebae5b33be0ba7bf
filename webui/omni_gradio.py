"""A Gradio voice-chat page: record from the browser microphone (or upload a file); the turn is
sent when you stop recording; the reply streams back as audio (autoplay) with its transcript.

    python webui/omni_gradio.py                 # in-process model (like a hosted demo page)
    python webui/omni_gradio.py --tiny          # random tiny weights: the replies are noise
    API_URL=http://127.0.0.1:60808 python webui/omni_gradio.py   # talk to a running server.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import gradio as gr
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402
from webui.client import BackendError, LocalBackend, ServerBackend  # noqa: E402

NOISE_BANNER = "**Random weights (--tiny): every reply is noise, not speech.**"


def build(backend) -> gr.Blocks:
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
                    audio = (info.output_sample_rate, (np.clip(chunk.audio, -1, 1) * 32767).astype(np.int16))
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
    parser.add_argument("--model", default="mini-omni", choices=zoo.names())
    parser.add_argument("--tiny", action="store_true", help="in-process only: tiny random weights (noise)")
    parser.add_argument("--device")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    if os.environ.get("API_URL"):
        backend = ServerBackend(os.environ["API_URL"])
    else:
        try:
            backend = LocalBackend(zoo.load(args.model, tiny=args.tiny, device=args.device))
        except zoo.ZooError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    build(backend).queue(default_concurrency_limit=8).launch(server_name=args.host, server_port=args.port,
                                                             share=False, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
