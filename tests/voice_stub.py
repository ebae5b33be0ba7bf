"""A stand-in for server.py on a loopback port, for the failures a real tiny model does not make
on demand: it lists several models (GET /v1/models, as a multi-model server would) and answers
POST /chat by the "model" field: refused busy (503), a model it does not run (404), a multipart
reply the server aborts after its error part, or one cut without a reason. One model's card
takes an image with the question (its replies are cut like CUT's; the test reads the body)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

BUSY, GONE, ABORTED, CUT, SEEING = "stub-busy", "stub-gone", "stub-aborted", "stub-cut", "stub-seeing"
ABORT_REASON = "sampling failed on the stub's GPU"


def _entry(name: str, output_rate: int, text_output: bool, image_input: bool = False) -> dict:
    card = {"name": name, "output_sample_rate": output_rate, "input_sample_rate": 16000,
            "text_output": text_output, "duplex": False, "image_input": image_input}
    return {"id": name, "object": "model", "random_weights": False, "notice": None,
            "default_max_new_tokens": None, "card": card}


MODELS = [_entry(BUSY, 24000, True), _entry(ABORTED, 16000, False), _entry(CUT, 24000, True),
          _entry(GONE, 24000, True), _entry(SEEING, 24000, True, image_input=True)]


def _part(content_type: str, payload: bytes) -> bytes:
    return b"\r\n--frame\r\nContent-Type: " + content_type.encode() + b"\r\n\r\n" + payload


class StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked replies, as uvicorn streams them

    def do_GET(self):
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": MODELS})
        else:
            self._json(404, {"error": {"type": "not_found", "message": "no such route"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        self.server.requests.append(body)
        model = body.get("model", BUSY)
        if model == BUSY:
            self._json(503, {"error": {"type": "busy", "message": "all 1 session slots are busy"}}, {"Retry-After": "1"})
        elif model == GONE:
            self._json(404, {"error": {"type": "model_not_found",
                                       "message": f"this server runs 'stub-busy', not {model!r}"}})
        else:  # a reply that starts, then breaks
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pcm = (np.sin(np.arange(4000) / 8) * 8000).astype("<i2").tobytes()
            self._chunk(_part("audio/wav", pcm) + _part("text/plain", b"Hello th"))
            if model == ABORTED:  # serving/protocols/chat.py's last part before it cuts a reply
                self._chunk(_part("text/plain", f"[error: {ABORT_REASON}]".encode()))
            self.wfile.flush()
            self.close_connection = True  # no final zero-length chunk: the reply is truncated

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _json(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class VoiceStub:
    """``with VoiceStub() as stub:`` serves on ``stub.url``; ``stub.requests`` holds the /chat bodies."""

    def __enter__(self) -> VoiceStub:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
        self.httpd.requests = self.requests = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
