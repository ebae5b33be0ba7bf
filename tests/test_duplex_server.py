"""server.py serving a full-duplex model (hertz-dev, tiny weights) as clients see it: the binary
/v1/duplex route and the Hertz-dev reference /audio route (driven the way the reference
inference_client.py drives it), several sessions batched into one step, limits and errors.

Every session here runs deterministic (temperature 0), so the server's frames are checked
against the same model stepped in this process: right content, right order, no cross-talk
between batched sessions (batched vs single float differences stay under a few PCM16 steps).
The servers run with OMP_NUM_THREADS=1: on a small loaded machine torch's default intra-op
threads make each tiny codec call ~50x slower (spin-waiting against the other jobs).
"""
import asyncio
import base64
import contextlib
import json
import time

import numpy as np
import pytest
import requests
import torch
import websockets
from conftest import SAMPLES
from procs import LoopbackProcess
from test_server import Server

FRAME = 2000
RATE = 16000
DETERMINISTIC = {"type": "session.update", "options": {"temperature": 0}}
TOLERANCE = 4  # PCM16 steps between the server's frames and the in-process model's
PROMPT = SAMPLES / "01.wav"  # 1.94 s: 15 whole frames


class HertzServer(Server):
    def __init__(self, *args):
        LoopbackProcess.__init__(self, ["server.py", "--model", "hertz-dev", "--tiny", "--port", "{port}", *args],
                                 health="/health", env={"OMP_NUM_THREADS": "1"}, timeout=180)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server():
    s = HertzServer("--max-sessions", "3", "--duplex-backlog", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model():
    import zoo

    return zoo.load("hertz-dev", random_weights="tiny", device="cpu")


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_frames(model, frames: np.ndarray, scale: float = 32768.0, prompt=None) -> np.ndarray:
    """The model stepped here on the same int16 frames (deterministic): float (N, 2000)."""
    with one_thread():
        stepper = model.duplex_stepper(1)
        handle = stepper.open({"temperature": 0}, prompt=prompt, sample_rate=RATE if prompt is not None else None)
        return np.stack([stepper.step([handle], [f.astype(np.float32) / scale])[0] for f in frames])


def as_pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1, 1) * 32767).round().astype(np.int16)


def input_frames(n: int, seed: int) -> np.ndarray:
    """Speech from the samples with a session-specific noise floor, as (n, 2000) int16."""
    import soundfile as sf

    speech, _ = sf.read(SAMPLES / "01.wav", dtype="float32")
    audio = np.resize(speech, n * FRAME) + 0.02 * np.random.default_rng(seed).standard_normal(n * FRAME)
    return as_pcm16(audio).reshape(n, FRAME)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32)).max()
    assert diff <= TOLERANCE, f"frames differ by up to {diff} PCM16 steps"
    assert np.abs(want).max() > 100  # not a silent comparison


async def opened(url: str, options: dict | None = DETERMINISTIC):
    ws = await websockets.connect(url, max_size=None)
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created", created
    if options is not None:
        await ws.send(json.dumps(options))
        assert json.loads(await ws.recv())["type"] == "session.updated"
    return ws, created["session"]


async def next_error(ws) -> dict:
    while True:
        message = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(message, str):
            event = json.loads(message)
            assert event["type"] == "error", event
            return event["error"]


# -- /v1/duplex ----------------------------------------------------------------------------------
def test_binary_session_answers_200_frames_in_order(server, model):
    frames = input_frames(200, seed=1)

    async def run():
        ws, session = await opened(server.ws + "/v1/duplex")
        answers, started = [], time.perf_counter()
        async with ws:
            for frame in frames:  # lockstep, as a sound-card client with a 125 ms block does
                await ws.send(frame.astype("<i2").tobytes())
                answer = await asyncio.wait_for(ws.recv(), 30)
                assert isinstance(answer, bytes) and len(answer) == 2 * FRAME
                answers.append(np.frombuffer(answer, "<i2"))
        return session, np.stack(answers), time.perf_counter() - started

    session, answers, seconds = asyncio.run(run())
    print(f"200 lockstep frames in {seconds:.1f} s ({1000 * seconds / 200:.0f} ms per frame round trip)")
    assert session["sample_rate"] == RATE and session["frame_samples"] == FRAME and session["format"] == "pcm_s16le"
    assert session["random_weights"] is True and session["options"]["temperature"] == 0.8  # before the update
    assert_close(answers, as_pcm16(reference_frames(model, frames)))


def test_messages_of_any_size_are_reframed(server, model):
    frames = input_frames(6, seed=2)
    pcm = frames.astype("<i2").tobytes()
    cuts = np.cumsum([0, 1, 2999, 4000, 7001, 1000, 8999])  # odd sizes: a sample split across messages
    assert cuts[-1] == len(pcm)

    async def run():
        ws, _ = await opened(server.ws + "/v1/duplex")
        async with ws:
            for a, b in zip(cuts[:-1], cuts[1:]):
                await ws.send(pcm[a:b])
            return np.stack([np.frombuffer(await asyncio.wait_for(ws.recv(), 30), "<i2") for _ in frames])

    assert_close(asyncio.run(run()), as_pcm16(reference_frames(model, frames)))


def test_a_client_prompt_seeds_its_session(server, model):
    import soundfile as sf

    frames = input_frames(4, seed=8)
    update = {**DETERMINISTIC, "prompt": base64.b64encode(PROMPT.read_bytes()).decode()}

    async def run():
        ws, _ = await opened(server.ws + "/v1/duplex", options=None)
        async with ws:
            await ws.send(json.dumps(update))
            updated = json.loads(await ws.recv())
            await ws.send(frames.astype("<i2").tobytes())
            return updated, np.stack([np.frombuffer(await asyncio.wait_for(ws.recv(), 30), "<i2") for _ in frames])

    updated, answers = asyncio.run(run())
    assert updated["type"] == "session.updated" and updated["session"]["prompt"] is True
    prompt, _ = sf.read(PROMPT, dtype="float32")
    assert_close(answers, as_pcm16(reference_frames(model, frames, prompt=prompt)))


def test_concurrent_sessions_share_batched_steps(server, model):
    n, sessions = 40, 3
    inputs = [input_frames(n, seed=10 + i) for i in range(sessions)]
    steps_before = server.metric("zoo_duplex_step_seconds_count")
    frames_before = server.metric("zoo_duplex_frames_total")

    async def one(frames):
        ws, _ = await opened(server.ws + "/v1/duplex")
        answers = []
        async with ws:
            for i, frame in enumerate(frames):  # two frames in flight: a client streaming in real time
                await ws.send(frame.astype("<i2").tobytes())
                if i >= 1:
                    answers.append(await asyncio.wait_for(ws.recv(), 30))
            answers.append(await asyncio.wait_for(ws.recv(), 30))
        assert all(isinstance(a, bytes) for a in answers)
        return np.stack([np.frombuffer(a, "<i2") for a in answers])

    async def run():
        return await asyncio.gather(*(one(frames) for frames in inputs))

    results = asyncio.run(run())
    steps = server.metric("zoo_duplex_step_seconds_count") - steps_before
    stepped = server.metric("zoo_duplex_frames_total") - frames_before
    print(f"{sessions} sessions x {n} frames in {steps:.0f} batched steps")
    assert stepped == n * sessions
    assert steps < 0.8 * stepped, "the sessions were not batched into shared steps"
    for frames, answers in zip(inputs, results):  # each got its own frames, in order
        assert answers.shape == (n, FRAME)
        assert_close(answers, as_pcm16(reference_frames(model, frames)))


def test_disconnect_frees_the_session_and_the_limit_refuses_at_once(server):
    async def run():
        ws, _ = await opened(server.ws + "/v1/duplex", options=None)
        for frame in input_frames(3, seed=3):
            await ws.send(frame.astype("<i2").tobytes())
        await ws.recv()
        ws.transport.abort()  # the client vanishes mid-session, frames still queued
        deadline = time.monotonic() + 10
        while requests.get(server.url + "/health", timeout=5).json()["duplex_sessions"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert requests.get(server.url + "/health", timeout=5).json()["duplex_sessions"] == 0
        assert server.metric("zoo_duplex_sessions_active") == 0
        held = [(await opened(server.ws + "/v1/duplex", options=None))[0] for _ in range(3)]  # all slots again
        for ws in held:  # each is opened in the stepper: the vanished session's slot was freed
            await ws.send(input_frames(1, seed=3)[0].tobytes())
        for ws in held:
            assert len(await asyncio.wait_for(ws.recv(), 30)) == 2 * FRAME
        started = time.monotonic()
        async with websockets.connect(server.ws + "/v1/duplex") as extra:
            error = json.loads(await asyncio.wait_for(extra.recv(), 5))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(extra.recv(), 5)
            refused_in, code = time.monotonic() - started, extra.close_code
        for ws in held:
            await ws.close()
        return error, refused_in, code

    error, refused_in, code = asyncio.run(run())
    assert error["error"]["code"] == "busy" and "3 duplex session slots" in error["error"]["message"]
    assert code == 1013 and refused_in < 2


def test_bad_messages_get_errors_and_the_session_goes_on(server):
    frames = input_frames(13, seed=4)

    async def run():
        codes = []
        ws, _ = await opened(server.ws + "/v1/duplex", options=None)
        async with ws:
            for text in ["{not json", '{"type": "nope"}', '{"options": {"top_p": 9}}', '{"options": {"bogus": 1}}',
                         '{"prompt": "%%%"}', json.dumps({"prompt": base64.b64encode(b"not audio").decode()}),
                         '{"voice": "x"}']:
                await ws.send(text)
                codes.append((await next_error(ws))["code"])
            await ws.send(b"\x00" * (2 * FRAME * 16 + 2))  # over 16 frames in one message: dropped whole
            codes.append((await next_error(ws))["code"])
            await ws.send(frames[0].astype("<i2").tobytes())
            assert len(await asyncio.wait_for(ws.recv(), 30)) == 2 * FRAME  # still served
            await ws.send(json.dumps(DETERMINISTIC))
            codes.append((await next_error(ws))["code"])
            await ws.send(frames[1:].astype("<i2").tobytes())  # 12 frames at once: over the backlog of 8
            overflow = await next_error(ws)
            answers = [await asyncio.wait_for(ws.recv(), 30) for _ in range(8)]
            assert all(isinstance(a, bytes) and len(a) == 2 * FRAME for a in answers)
        return codes, overflow

    codes, overflow = asyncio.run(run())
    assert codes == ["invalid_json", "unknown_event", "bad_option", "bad_request", "bad_audio", "bad_audio",
                     "bad_request", "message_too_large", "too_late"]
    assert overflow["code"] == "backlog_full" and overflow["frames_dropped"] == 4
    assert server.metric("zoo_duplex_frames_dropped_total") >= 4


def test_the_half_duplex_routes_still_serve_a_duplex_model(server):
    """/chat continues the question's audio (respond()): 8 frames of 2000 samples at 16 kHz."""
    question = base64.b64encode(PROMPT.read_bytes()).decode()
    response = requests.post(server.url + "/chat", json={"audio": question, "max_tokens": 8}, timeout=60)
    assert response.status_code == 200 and response.headers["x-sample-rate"] == "16000"
    assert len(response.content) == 8 * FRAME * 2


# -- /audio: the reference protocol --------------------------------------------------------------
class ReferenceClient:
    """What Standard-Intelligence/hertz-dev inference_client.py's AudioClient does on the wire,
    minus its sound devices: POST /set_temperature with only the given query parameters, then
    per 2000-sample block (sounddevice gives (2000, 1) float32): int16 = block * 32767, send
    "data:audio/raw;base64,..." as text, await one text reply, split(",")[1], int16,
    reshape(-1, CHANNELS)."""

    CHANNELS = 1

    def __init__(self, server_url: str, token_temp=None, categorical_temp=None, gaussian_temp=None):
        self.base_url = server_url.replace("ws://", "http://")
        self.server_url = f"{server_url}/audio"
        self.message = None
        if any(t is not None for t in [token_temp, categorical_temp, gaussian_temp]):
            self.message = self.set_temperature_and_echo(token_temp, categorical_temp, gaussian_temp)

    def set_temperature_and_echo(self, token_temp=None, categorical_temp=None, gaussian_temp=None):
        params = {}
        if token_temp is not None:
            params["token_temp"] = token_temp
        if categorical_temp is not None:
            params["categorical_temp"] = categorical_temp
        if gaussian_temp is not None:
            params["gaussian_temp"] = gaussian_temp
        return requests.post(f"{self.base_url}/set_temperature", params=params, timeout=10).json()["message"]

    async def process_audio(self, blocks):
        replies = []
        async with websockets.connect(self.server_url) as ws:
            for indata in blocks:
                audio_data = (indata.copy() * 32767).astype(np.int16)
                audio_b64 = base64.b64encode(audio_data.tobytes()).decode("utf-8")
                await ws.send(f"data:audio/raw;base64,{audio_b64}")
                response = await asyncio.wait_for(ws.recv(), 30)
                response = response.split(",")[1]
                replies.append(np.frombuffer(base64.b64decode(response), dtype=np.int16).reshape(-1, self.CHANNELS))
        return replies


def test_reference_client_unchanged(server, model):
    frames = input_frames(30, seed=5)
    blocks = [(f.astype(np.float32) / 32767)[:, None] for f in frames]  # what sounddevice would hand it
    client = ReferenceClient(server.ws, token_temp=0.0)
    try:
        assert client.message == "Temperature updated to: (0.0, (0.4, 0.1))"  # the others kept their values
        replies = asyncio.run(client.process_audio(blocks))
    finally:
        client.set_temperature_and_echo(0.8)
    assert [r.shape for r in replies] == [(FRAME, 1)] * 30
    sent = np.stack([(b[:, 0] * 32767).astype(np.int16) for b in blocks])
    want = (np.clip(reference_frames(model, sent, scale=32767.0), -1, 1) * 32767).astype(np.int16)  # its truncation
    assert_close(np.stack([r[:, 0] for r in replies]), want)


def test_reference_route_errors_are_json_and_it_keeps_serving(server):
    frame = base64.b64encode(input_frames(1, seed=6)[0].tobytes()).decode()

    async def run():
        codes = []
        async with websockets.connect(server.ws + "/audio") as ws:
            for bad in ["garbage", b"\x00\x00", "data:audio/raw;base64,%%%"]:
                await ws.send(bad)
                codes.append((await next_error(ws))["code"])
            await ws.send("data:audio/raw;base64," + frame)
            reply = await asyncio.wait_for(ws.recv(), 30)
        return codes, reply

    codes, reply = asyncio.run(run())
    assert codes == ["bad_message", "bad_message", "bad_audio"]
    assert reply.startswith("data:audio/raw;base64,") and len(base64.b64decode(reply.split(",")[1])) == 2 * FRAME
    response = requests.post(server.url + "/set_temperature", params={"categorical_temp": 50}, timeout=10)
    assert response.status_code == 422 and response.json()["error"]["type"] == "bad_option"


# -- a server with a prompt, as the reference's --prompt_path ---------------------------------------
def test_prompted_server_replays_like_the_reference_then_continues_the_prompt(model):
    import soundfile as sf

    prompted = HertzServer("--max-sessions", "1", "--duplex-prompt", str(PROMPT), "--duplex-idle-s", "1.5")
    try:
        client = ReferenceClient(prompted.ws, token_temp=0.0, categorical_temp=0.4, gaussian_temp=0.1)
        frames = input_frames(26, seed=7)
        replies = asyncio.run(client.process_audio([(f.astype(np.float32) / 32767)[:, None] for f in frames]))

        async def idle():
            ws, session = await opened(prompted.ws + "/v1/duplex", options=None)
            started = time.monotonic()
            error = await next_error(ws)
            return session, error, time.monotonic() - started

        session, error, waited = asyncio.run(idle())
    finally:
        prompted.stop()
    # the reference's replay: 24 pieces of the prompt's last 3 s (all 15 frames here), mic ignored
    prompt, rate = sf.read(PROMPT, dtype="float32")
    tail = prompt[: prompt.size // FRAME * FRAME][-3 * RATE:]
    want = [(p * 32767).astype(np.int16) for p in np.array_split(tail, 24)]
    assert [r.size for r in replies[:24]] == [p.size for p in want]
    assert max(np.abs(r[:, 0].astype(int) - p).max() for r, p in zip(replies, want)) <= 1
    # then the model, continuing from the prompt, on the microphone frames that follow
    live = (np.clip(reference_frames(model, frames[24:], scale=32767.0, prompt=prompt), -1, 1) * 32767).astype(np.int16)
    assert_close(np.stack([r[:, 0] for r in replies[24:]]), live)
    assert session["prompt"] is True
    assert error["code"] == "idle_timeout" and 1.0 < waited < 5


def test_half_duplex_model_refuses_the_duplex_routes():
    from fastapi.testclient import TestClient

    import zoo
    from serving.app import create_app
    from serving.service import Service

    service = Service(zoo.load("mini-omni", random_weights="tiny", device="cpu"), max_sessions=1)
    try:
        with TestClient(create_app(service)) as client:
            for route in ("/v1/duplex", "/audio"):
                with client.websocket_connect(route) as ws:
                    error = ws.receive_json()
                    assert error["error"]["code"] == "not_duplex" and "half-duplex" in error["error"]["message"]
            assert client.post("/set_temperature", params={"token_temp": 0.5}).status_code == 404
            assert "duplex_sessions" not in client.get("/health").json()
    finally:
        service.close()


def test_demo_client_streams_a_file(server, model, tmp_path):
    """demos/duplex_chat.py --wav: the file goes in frame by frame, the model's side comes out."""
    import soundfile as sf
    from conftest import load_script

    demo = load_script("demos/duplex_chat.py")
    out = tmp_path / "reply.wav"
    assert demo.main(["--server", server.url, "--wav", str(PROMPT), "--out", str(out), "--fast",
                      "--temperature", "0"]) == 0
    reply, rate = sf.read(out, dtype="int16")
    speech, _ = sf.read(PROMPT, dtype="float32")
    sent = as_pcm16(np.pad(speech, (0, -speech.size % FRAME))).reshape(-1, FRAME)
    assert rate == RATE and reply.size == sent.size == 16 * FRAME
    assert_close(reply.reshape(-1, FRAME), as_pcm16(reference_frames(model, sent)))
