"""A server that describes a model but refuses every POST /chat with 503 busy (the Gradio
page's refusal test; test_webui_streamlit re-exports it, where that test imports it from)."""
import json
from http.server import BaseHTTPRequestHandler


class BusyStub(BaseHTTPRequestHandler):
    """A server that describes a model but refuses every /chat with 503 busy."""

    def do_GET(self):
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": "stub-omni", "object": "model", "card": {"output_sample_rate": 24000}, "random_weights": False}]})
        else:
            self._json(404, {"error": {"type": "not_found", "message": "no such route"}})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._json(503, {"error": {"type": "busy", "message": "all 1 session slots are busy"}}, {"Retry-After": "1"})

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

