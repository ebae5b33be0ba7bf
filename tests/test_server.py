"""server.py as clients see it: a real server process on a free loopback port (tiny model)."""
import base64
import concurrent.futures
import re
import time

import numpy as np
import pytest
import requests
from conftest import SAMPLES
from procs import LoopbackProcess

QUESTION = base64.b64encode((SAMPLES / "01.wav").read_bytes()).decode()


class Server(LoopbackProcess):
    """server.py --tiny on a free loopback port."""

    def __init__(self, *args):
        super().__init__(["server.py", "--tiny", "--port", "{port}", *args], health="/health")

    def metric(self, name: str) -> float:
        for line in requests.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def rss_kib(self) -> int:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server():
    s = Server("--max-sessions", "16")
    yield s
    s.stop()


def chat(server, timeout=120, **fields):
    return requests.post(server.url + "/chat", json={"audio": QUESTION, **fields}, stream=True, timeout=timeout)


def test_binds_to_localhost_and_describes_its_model(server):
    assert server.url.startswith("http://127.0.0.1")
    health = requests.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["random_weights"] is True
    models = requests.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "mini-omni" and models["data"][0]["card"]["output_sample_rate"] == 24000
    assert "RANDOM WEIGHTS" in models["data"][0]["notice"] and models["data"][0]["default_max_new_tokens"] > 0


def test_a_request_for_another_model_is_refused_by_name(server):
    response = chat(server, model="glm-4-voice", max_tokens=4)
    assert response.status_code == 404 and response.json()["error"]["type"] == "model_not_found"
    assert "mini-omni" in response.json()["error"]["message"]
    assert chat(server, model="mini-omni", max_tokens=4).status_code == 200


def test_reference_client_gets_pcm_before_generation_ends(server):
    """The Mini-Omni reference Streamlit/Gradio client: requests.post(stream=True).iter_content()."""
    started = time.monotonic()
    response = chat(server, stream_stride=4, max_tokens=60)
    assert response.status_code == 200
    assert response.headers["x-sample-rate"] == "24000" and response.headers["x-model"] == "mini-omni"
    arrivals, pcm = [], b""
    for part in response.iter_content(chunk_size=5760):
        arrivals.append(time.monotonic() - started)
        pcm += part
    samples = np.frombuffer(pcm, "<i2")
    assert len(pcm) % 2 == 0 and samples.size == (60 - 7) * 2048  # every frame, tail included
    assert np.abs(samples).max() > 0
    assert arrivals[0] < arrivals[-1] - 0.05  # streamed: first bytes long before the last


def test_multipart_client_gets_audio_and_text_parts(server):
    response = requests.post(server.url + "/chat", json={"audio": QUESTION, "max_tokens": 30},
                             headers={"Accept": "multipart/x-mixed-replace"}, timeout=120)
    assert response.headers["content-type"].startswith("multipart/x-mixed-replace; boundary=frame")
    parts = [p for p in response.content.split(b"\r\n--frame\r\n") if p]
    kinds = [p.split(b"\r\n", 1)[0] for p in parts]
    assert kinds[0::2] == [b"Content-Type: audio/wav"] * (len(parts) // 2)
    assert kinds[1::2] == [b"Content-Type: text/plain"] * (len(parts) // 2)
    text = b"".join(p.split(b"\r\n\r\n", 1)[1] for p in parts[1::2]).decode()
    audio = b"".join(p.split(b"\r\n\r\n", 1)[1] for p in parts[0::2])
    assert text.strip() and len(audio) == (30 - 7) * 2048 * 2


def test_sixteen_concurrent_clients_all_finish(server):
    def one(i):
        response = chat(server, max_tokens=24 + i % 5)
        return response.status_code, len(response.content)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert [status for status, _ in results] == [200] * 16
    assert [size for _, size in results] == [(24 + i % 5 - 7) * 2048 * 2 for i in range(16)]
    assert requests.get(server.url + "/health").json()["sessions"] == 0


@pytest.mark.parametrize(
    "body, status, kind",
    [
        (b"{not json", 400, "bad_json"),
        (b"[1, 2]", 400, "bad_json"),
        (b'{"stream_stride": 4}', 400, "bad_request"),
        (b'{"audio": "%%%not base64"}', 400, "bad_base64"),
        (('{"audio": "%s"}' % base64.b64encode(b"definitely not audio").decode()).encode(), 400, "bad_audio"),
        (('{"audio": "%s"}' % base64.b64encode(b"").decode()).encode(), 400, "bad_request"),
        (('{"audio": "%s", "top_p": 5}' % QUESTION).encode(), 422, "bad_option"),
        (('{"audio": "%s", "stream_stride": "fast"}' % QUESTION).encode(), 422, "bad_option"),
        (('{"audio": "%s", "bogus": 1}' % QUESTION).encode(), 400, "bad_request"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, body, status, kind):
    response = requests.post(server.url + "/chat", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status
    assert response.json()["error"]["type"] == kind and response.json()["error"]["message"]
    assert chat(server, max_tokens=12).status_code == 200


def _wav_b64(audio, rate):
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def test_audio_problems_are_4xx(server):
    too_long = _wav_b64(np.zeros(16000 * 31, np.float32), 16000)
    response = requests.post(server.url + "/chat", json={"audio": too_long}, timeout=60)
    assert response.status_code == 413 and "at most 30 s" in response.json()["error"]["message"]
    silent = requests.post(server.url + "/chat", json={"audio": _wav_b64(np.zeros(8000, np.float32), 8000),
                                                       "max_tokens": 12}, timeout=60)
    assert silent.status_code == 200  # silence is answered, as documented


def test_huge_bodies_are_refused(server):
    response = requests.post(server.url + "/chat", data=b"x" * (26 * 1024 * 1024),
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413


def test_a_disconnect_frees_the_session(server):
    before = server.metric("zoo_replies_stopped_total")
    response = chat(server, max_tokens=1500)
    next(response.iter_content(1024))
    response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and server.metric("zoo_sessions_active") > 0:
        time.sleep(0.1)
    assert server.metric("zoo_sessions_active") == 0
    assert server.metric("zoo_replies_stopped_total") == before + 1


def test_over_the_limit_gets_503_at_once():
    small = Server("--max-sessions", "2")
    try:
        long_ones = [chat(small, max_tokens=1500) for _ in range(2)]
        started = time.monotonic()
        response = requests.post(small.url + "/chat", json={"audio": QUESTION}, timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert time.monotonic() - started < 2
        for r in long_ones:
            r.close()
    finally:
        small.stop()


def test_memory_does_not_grow_over_200_sequential_requests(server):
    for _ in range(20):  # warm caches and allocator pools first
        assert chat(server, max_tokens=10).status_code == 200
    before = server.rss_kib()
    for _ in range(200):
        assert chat(server, max_tokens=10).status_code == 200
    growth_mib = (server.rss_kib() - before) / 1024
    assert growth_mib < 30, f"server RSS grew {growth_mib:.1f} MiB over 200 requests"


def test_a_busy_port_is_one_clear_line_and_a_non_zero_exit_before_loading():
    import socket
    import subprocess
    import sys

    from conftest import REPO

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run([sys.executable, "server.py", "--tiny", "--port", str(port)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and time.monotonic() - started < 60
    output = result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in output
    assert "Traceback" not in output and "serving" not in output
    assert len([line for line in output.splitlines() if "ERROR" in line]) == 1


def test_it_says_where_it_serves_once_bound_and_logs_every_request():
    s = Server("--max-sessions", "2")
    try:
        reply = chat(s, max_tokens=30)
        assert reply.status_code == 200 and len(reply.content) > 0
    finally:
        s.stop()
    output = s.output()
    assert f"serving mini-omni on http://127.0.0.1:{s.port}" in output
    assert re.search(r"omni-zoo.access INFO POST /chat 200 \d+\.\d{3}s ttfa=\d+\.\d{3}s req_\w+", output), output
    assert re.search(r"omni-zoo.access INFO GET /health 200 \d+\.\d{3}s req_\w+", output)
