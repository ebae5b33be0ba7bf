"""The Streamlit chat's pieces that need no browser: the model list from /v1/models, the reply
record the player hands back, the question's wire audio and the waveform."""
import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf
from procs import free_port

from webui.catalog import list_models
from webui.client import BackendError
from webui.reply_player import WIRE_RATE, Reply, question_pcm
from webui.waveform import waveform_svg
from zoo.core.errors import AudioInputError

MODELS = b'{"data": [{"id": "a", "card": {"text_output": false, "output_sample_rate": 16000}, "random_weights": true,' \
         b' "notice": "noise", "default_max_new_tokens": 32}, {"id": "b", "card": {}}]}'


def serve(status: int, body: bytes):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_models_come_from_the_list_and_cards_decide_text_output():
    server, url = serve(200, MODELS)
    try:
        first, second = list_models(url)
    finally:
        server.shutdown()
    assert (first.id, first.random_weights, first.notice, first.default_max_new_tokens) == ("a", True, "noise", 32)
    assert not first.text_output and "audio only (no text)" in first.facts()
    assert second.text_output and second.default_max_new_tokens is None  # a card without the field: text


@pytest.mark.parametrize("status, body, says", [
    (401, b"{}", "needs an API key"),
    (500, b"oops", "did not list its models"),
    (200, b"not json", "did not list its models"),
    (200, b'{"data": []}', "offers no model"),
])
def test_a_bad_model_list_is_a_message(status, body, says):
    server, url = serve(status, body)
    try:
        with pytest.raises(BackendError, match=says):
            list_models(url)
    finally:
        server.shutdown()


def test_an_unreachable_server_is_a_message():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendError, match="cannot reach the voice server at " + url):
        list_models(url)


def test_the_question_travels_as_pcm16_at_the_wire_rate():
    buffer = io.BytesIO()
    sf.write(buffer, np.full((48000, 2), 0.25, np.float32), 48000, format="WAV", subtype="PCM_16")
    pcm = np.frombuffer(base64.b64decode(question_pcm(buffer.getvalue())), "<i2")
    assert pcm.size == WIRE_RATE and abs(int(np.median(pcm)) - 8192) < 50  # 1 s, mono, same level
    with pytest.raises(AudioInputError):
        question_pcm(buffer.getvalue(), max_seconds=0.5)
    with pytest.raises(AudioInputError):
        question_pcm(b"not audio")


def test_the_reply_record():
    pcm = (np.arange(4800) % 100).astype("<i2")
    reply = Reply.from_value({"turn": "t", "status": "completed", "error": None, "text": "hi", "ttfa_ms": 312,
                              "audio": base64.b64encode(pcm.tobytes()).decode(), "rate": 24000})
    assert reply.seconds == pytest.approx(0.2) and reply.ttfa_ms == 312 and reply.text == "hi"
    failed = Reply.from_value({"turn": "t", "status": "failed", "error": "cut", "audio": ""})
    assert failed.status == "failed" and failed.audio.size == 0 and failed.seconds == 0


def test_waveform_follows_the_envelope():
    loud = waveform_svg(np.ones(4800, np.float32), width=100, height=40)
    quiet = waveform_svg(np.zeros(4800, np.float32), width=100, height=40)
    assert loud.startswith("<svg") and "0.0,0.0" in loud  # full scale reaches the top
    assert "0.0,0.0" not in quiet and "0.0,20.0" in quiet  # silence is the middle line
    assert waveform_svg(np.zeros(0, np.float32)).startswith("<svg")
