"""server.py serves GLM-4-Voice (tiny) with no model-specific code: its card's rate and name, the
reference raw-PCM /chat stream, text alongside in multipart, typed questions refused or answered
as the card says."""
import base64

import numpy as np
import pytest
import requests
from conftest import SAMPLES
from procs import LoopbackProcess

QUESTION = base64.b64encode((SAMPLES / "02.wav").read_bytes()).decode()


@pytest.fixture(scope="module")
def server():
    s = LoopbackProcess(["server.py", "--model", "glm-4-voice", "--tiny", "--port", "{port}"], health="/health",
                        timeout=300)
    yield s
    s.stop()


def test_card_served(server):
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    card = models["data"][0]["card"]
    assert models["data"][0]["id"] == "glm-4-voice" and card["output_sample_rate"] == 22050 and card["multi_turn"]


def test_chat_streams_pcm_at_the_cards_rate(server):
    response = requests.post(server.url + "/chat", json={"audio": QUESTION, "max_tokens": 40, "temperature": 0},
                             stream=True, timeout=300)
    assert response.status_code == 200
    assert response.headers["x-sample-rate"] == "22050" and response.headers["x-model"] == "glm-4-voice"
    pcm = b"".join(response.iter_content(chunk_size=4096))
    samples = np.frombuffer(pcm, "<i2")
    assert samples.size > 22050 * 0.5 and np.abs(samples).max() > 0


def test_multipart_carries_the_text(server):
    response = requests.post(server.url + "/chat", json={"audio": QUESTION, "max_tokens": 30, "temperature": 0},
                             headers={"Accept": "multipart/x-mixed-replace"}, timeout=300)
    parts = [p for p in response.content.split(b"\r\n--frame\r\n") if p]
    text = b"".join(p.split(b"\r\n\r\n", 1)[1] for p in parts if p.startswith(b"Content-Type: text/plain"))
    assert text.strip()


def test_unknown_option_is_a_400_naming_it(server):
    response = requests.post(server.url + "/chat", json={"audio": QUESTION, "stream_stride": 4}, timeout=60)
    assert response.status_code == 400 and "stream_stride" in response.text


def test_realtime_session_keeps_the_conversation(server):
    """A multi-turn model hears the session's earlier exchanges: the same question (greedy) gets
    another answer as the second turn of a session than as the first turn of a fresh one."""
    import asyncio
    import json

    import soundfile as sf
    import soxr
    import websockets

    audio, rate = sf.read(SAMPLES / "02.wav", dtype="float32")
    pcm = (np.clip(soxr.resample(audio, rate, 24000), -1, 1) * 32767).astype("<i2").tobytes()

    async def turn(ws) -> str:
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 25}}))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 300))
            if event["type"] == "response.done":
                assert event["response"]["status"] == "completed"
                return event["response"]["output"][0]["content"][0]["transcript"]

    async def session(turns: int) -> list[str]:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/realtime", max_size=2**24) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "audio": {"input": {"turn_detection": None}},
                "zoo": {"options": {"temperature": 0}}}}))
            return [await turn(ws) for _ in range(turns)]

    first, second = asyncio.run(session(2))
    fresh = asyncio.run(session(1))[0]
    assert first == fresh and second != first
