"""A Gradio voice-chat page: record from the browser microphone (or upload a file); the turn is
sent when you stop recording; the reply streams back as audio (autoplay) and lands in the
conversation with its text, time to first audio, length and waveform.

    python webui/omni_gradio.py                           # in-process model (like a hosted demo page)
    python webui/omni_gradio.py --tiny                    # random tiny weights: the replies are noise
    python webui/omni_gradio.py --checkpoint DIR          # a local copy of a published part
    API_URL=http://127.0.0.1:60808 python webui/omni_gradio.py   # talk to a running server.py

In-process it takes the model flags inference.py and server.py take (--model, one flag per
published part, --tiny, --random-full, --device, --dtype); with API_URL the server's models are
listed in the page's model picker instead. For a full-duplex model (its card says duplex) the
live widget is full duplex: the browser mic streams to /v1/duplex and the model's frames play as
they come. For a model whose card says image_input the page also offers an
image input (upload or webcam) beside the microphone: the image goes with the question.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds webui/ and zoo/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr
import uvicorn
from fastapi import FastAPI

import zoo
from webui.client import LocalBackend, ServerBackend
from webui.gradio_chat import build
from zoo.cli import add_model_flags, load_model, noise_notice

__all__ = ["build", "main"]
MAX_SESSIONS, DUPLEX_SESSIONS = 8, 4


class PortBusy(Exception):
    """The page's port cannot be had; the message is one line for people."""


def listen(host: str, port: int) -> socket.socket:
    """The page's socket, bound before the model loads: a busy port is one clear error, at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not a listener's port: only TIME_WAIT leftovers
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise PortBusy(f"cannot serve the page on {host}:{port} ({err.strerror or err}): "
                       f"is another program using that port? Choose another with --port") from None
    return sock


def share_link(host: str, port: int) -> str:
    """A public *.gradio.live link to this page, as ``launch(share=True)`` makes one (Gradio's
    tunnel; it needs the internet)."""
    from gradio import networking

    address = networking.setup_tunnel(host if host not in ("0.0.0.0", "::") else "127.0.0.1", port,
                                      secrets.token_urlsafe(32), None, None)
    return "https://" + address.split("://", 1)[-1]


class AnnouncingServer(uvicorn.Server):
    """uvicorn, printing the page's URLs the way Gradio users expect once the port serves."""

    def __init__(self, config: uvicorn.Config, host: str, port: int, share: bool) -> None:
        super().__init__(config)
        self.host, self.port, self.share = host, port, share

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        shown = f"[{self.host}]" if ":" in self.host else self.host
        print(f"* Running on local URL:  http://{shown}:{self.port}", flush=True)
        if self.share:
            try:
                link = await asyncio.to_thread(share_link, self.host, self.port)
                print(f"* Running on public URL: {link}", flush=True)
            except Exception as err:  # noqa: BLE001 - no internet, blocked tunnel: the page still serves locally
                print(f"* Could not create a share link ({type(err).__name__}: {err}); the page serves locally only",
                      flush=True)


def serve(app: FastAPI, sock: socket.socket, host: str, port: int, share: bool = False) -> int:
    server = AnnouncingServer(uvicorn.Config(app, log_level="warning"), host, port, share)
    server.run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser, argv)
    page = parser.add_argument_group("page")
    page.add_argument("--host", default="127.0.0.1")
    page.add_argument("--port", type=int, default=7860)
    page.add_argument("--share", action="store_true", help="also a public *.gradio.live link (needs the internet)")
    args = parser.parse_args(argv)
    try:
        sock = listen(args.host, args.port)
    except PortBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    api_url = os.environ.get("API_URL")
    if api_url:  # the page and the live widget both talk to server.py, which chose its models
        app, demo = FastAPI(), build(ServerBackend(api_url), live_api=api_url)
    else:
        try:
            model = load_model(args)
        except zoo.ZooError as err:
            print(f"error: {err}", file=sys.stderr)
            sock.close()
            return 2
        notice = noise_notice(model)
        if notice:
            print(notice, flush=True)
        # In-process: one FastAPI app serves the page and the server's routes (the live widget's
        # /v1/realtime and /v1/duplex among them) on the same origin.
        from serving.app import create_app
        from serving.service import Service

        app = create_app(Service(model, max_sessions=MAX_SESSIONS, duplex_sessions=DUPLEX_SESSIONS))
        demo = build(LocalBackend(model), live_api="")
    demo.queue(default_concurrency_limit=MAX_SESSIONS)
    return serve(gr.mount_gradio_app(app, demo, path="/"), sock, args.host, args.port, share=args.share)


if __name__ == "__main__":
    sys.exit(main())
