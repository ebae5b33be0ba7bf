"""server.py against clients that misbehave (issue #11): no client can hurt another, no input can
take the server down, nothing fails silently. A real server (tiny model) with an API key and
small limits; the cases that provoke a failure inside the model are in test_hostile_inprocess.py."""
import argparse
import asyncio
import base64
import contextlib
import io
import json
import signal
import socket
import time

import numpy as np
import pytest
import requests
import soundfile as sf
import websockets
from openai import AsyncOpenAI
from test_realtime import pcm_chunks, speech_24k
from test_server import QUESTION, Server

KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}  # pass a copy to TestClient.websocket_connect: it adds to the dict
ALLOWED_ORIGIN = "https://ui.example.com"
MAX_CONNECTIONS = 4
IDLE_S = 2.0


@pytest.fixture(scope="module")
def server():
    s = Server("--max-sessions", "4", "--api-key", KEY, "--allow-origin", ALLOWED_ORIGIN,
               "--max-connections", str(MAX_CONNECTIONS), "--read-timeout", "1", "--realtime-idle-s", str(IDLE_S))
    yield s
    s.stop()


def ws_url(server, path="/v1/realtime") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


def metric(server, name: str, kind: str) -> float:
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'{name}{{kind="{kind}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def chat(server, timeout=60, headers=AUTH, **fields):
    return requests.post(server.url + "/chat", json={"audio": QUESTION, **fields}, headers=headers, stream=True,
                         timeout=timeout)


async def realtime(server, **connect):
    ws = await websockets.connect(ws_url(server), additional_headers=AUTH, max_size=None, **connect)
    assert json.loads(await ws.recv())["type"] == "session.created"
    return ws


async def next_event(ws, *types, timeout=60) -> dict:
    async def wait():
        while True:
            event = json.loads(await ws.recv())
            if event["type"] in types:
                return event
    return await asyncio.wait_for(wait(), timeout)


async def ask(ws, max_output_tokens: int) -> None:
    """Send a manual turn (1 s of speech, committed) and ask for a response of at most
    ``max_output_tokens`` on an open realtime socket."""
    await ws.send(json.dumps({"type": "session.update", "session": {
        "max_output_tokens": max_output_tokens, "audio": {"input": {"turn_detection": None}}}}))
    await next_event(ws, "session.updated")
    for chunk in pcm_chunks(speech_24k(pad_before=0, pad_after=0)[:24000]):
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    await ws.send(json.dumps({"type": "response.create"}))


async def exchange(ws) -> dict:
    """A normal short turn on an open realtime socket; returns its response.done."""
    await ask(ws, max_output_tokens=10)
    return await next_event(ws, "response.done")


# -- item 6: API key, Origin, content type ---------------------------------------------------------
def test_every_route_but_health_needs_the_key(server):
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/chat"), ("POST", "/set_temperature")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = requests.request(method, server.url + path, headers=headers, timeout=5)
            assert response.status_code == 401, (path, headers)
            error = response.json()["error"]
            assert error["type"] == "unauthorized" and error["request_id"] == response.headers["x-request-id"]
    assert requests.get(server.url + "/v1/models", headers=AUTH, timeout=5).status_code == 200
    async def connect():
        await websockets.connect(ws_url(server))
    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(connect())
    assert refused.value.response.status_code == 401


def test_openai_sdk_and_browser_subprotocol_carry_the_key(server):
    async def run():
        client = AsyncOpenAI(api_key=KEY, base_url=server.url + "/v1", websocket_base_url=ws_url(server, "/v1"))
        async with client.realtime.connect(model="mini-omni") as conn:
            created = await conn.recv()
        # a browser cannot set headers on a WebSocket: OpenAI's subprotocol convention instead
        async with websockets.connect(ws_url(server), subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
            request_id = ws.response.headers["x-request-id"]
            return created.type, ws.subprotocol, json.loads(await ws.recv())["type"], request_id
    *events, request_id = asyncio.run(run())
    assert events == ["session.created", "realtime", "session.created"] and request_id.startswith("req_")


@pytest.mark.parametrize("origin, allowed", [
    ("https://evil.example.net", False),
    ("http://127.0.0.1:{port}", True),  # the server's own pages
    ("http://localhost:7860", True),  # a local web UI
    (ALLOWED_ORIGIN, True),  # --allow-origin
    (None, True),  # not a browser
])
def test_websockets_from_a_foreign_origin_are_refused(server, origin, allowed):
    async def run():
        ws = await websockets.connect(ws_url(server), additional_headers=AUTH, origin=origin and origin.format(port=server.port))
        await ws.close()
    if allowed:
        asyncio.run(run())
    else:
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(run())
        assert refused.value.response.status_code == 403
        assert json.loads(refused.value.response.body)["error"]["type"] == "forbidden_origin"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_chat_takes_json_only(server, content_type):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = requests.post(server.url + "/chat", data=json.dumps({"audio": QUESTION}), headers=headers, timeout=30)
    assert response.status_code == 415 and response.json()["error"]["type"] == "unsupported_media_type"


def test_web_ui_client_and_demo_send_the_key_from_the_environment(server, monkeypatch):
    from conftest import load_script

    from webui.client import BackendError, ServerBackend
    from zoo.client_cli import add_client_flags, connect

    backend = ServerBackend(server.url)
    with pytest.raises(BackendError, match="OMNI_ZOO_API_KEY"):
        backend.info()
    monkeypatch.setenv("OMNI_ZOO_API_KEY", KEY)
    assert backend.info().model == "mini-omni"
    chunks = list(backend.stream(base64.b64decode(QUESTION), {"max_tokens": 12}))
    assert sum(c.audio.size for c in chunks) > 0

    async def quiet_microphone():
        while True:
            yield bytes(4800)
            await asyncio.sleep(0.05)

    shown = []
    demo = load_script("demos/mic_chat.py")
    parser = argparse.ArgumentParser()
    add_client_flags(parser)  # the demos' shared flags: the key defaults to the environment's
    info = connect(parser.parse_args(["--server", server.url]))

    async def connect_and_leave():
        with contextlib.suppress(asyncio.TimeoutError):  # a quiet room: no reply comes; leave after 2 s
            await asyncio.wait_for(demo.converse(info.ws_url("/v1/realtime"), quiet_microphone(), lambda pcm: None,
                                                 lambda: None, shown.append, headers=info.headers()), 2)
    asyncio.run(connect_and_leave())
    assert "connected to mini-omni" in "".join(shown)


def test_web_page_with_its_live_widget_works_with_a_key(server, tmp_path, tmp_path_factory):
    """The Gradio page through the keyed server, in headless Chromium: the turn-by-turn reply
    (the page's server calls) and the live widget (the browser's own WebSocket, key as subprotocol)."""
    from browser import browser_page, fake_mic_wav
    from procs import LoopbackProcess
    from test_webui_gradio import live_turn, open_page, talk

    mic = fake_mic_wav(tmp_path_factory.mktemp("mic") / "question.wav")
    ui = LoopbackProcess(["webui/omni_gradio.py", "--port", "{port}"],
                         env={"GRADIO_ANALYTICS_ENABLED": "False", "API_URL": server.url, "OMNI_ZOO_API_KEY": KEY})
    try:
        with browser_page(mic) as page:
            open_page(page, ui.url + "/")
            assert talk(page)["audio_s"] > 0
            live_turn(page, "mini-omni")
    finally:
        ui.stop()


# -- item 3: compressed audio is measured before it is decoded ------------------------------------
def test_two_hours_of_flac_silence_is_413_before_decoding(server):
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", 16000, 1, format="FLAC") as f:
        minute = np.zeros(16000 * 60, np.int16)
        for _ in range(120):
            f.write(minute)
    body = {"audio": base64.b64encode(buffer.getvalue()).decode()}
    before = server.rss_kib()
    started = time.monotonic()
    response = requests.post(server.url + "/chat", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["type"] == "audio_too_long"
    assert "7200.0 s" in response.json()["error"]["message"]
    assert time.monotonic() - started < 2
    assert (server.rss_kib() - before) / 1024 < 100


def test_a_header_that_hides_the_length_cannot_force_a_full_decode():
    """FLAC with 'total samples unknown' in its header: decoding stops just past the limit."""
    import tracemalloc

    import zoo
    from zoo.core.audio import read_audio

    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", 16000, 1, format="FLAC") as f:
        for _ in range(20):
            f.write(np.zeros(16000 * 60, np.int16))
    raw = bytearray(buffer.getvalue())
    raw[21] &= 0xF0  # STREAMINFO's 36-bit total sample count -> 0 (unknown)
    raw[22:26] = bytes(4)
    tracemalloc.start()
    try:
        with pytest.raises(zoo.AudioTooLong):
            read_audio(bytes(raw), max_seconds=30)
        peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak_mib < 10  # 30 s at 16 kHz is 1.9 MiB of float32; 20 minutes would be 73 MiB


# -- item 4 / 8: malformed realtime events get error events; the session goes on --------------------
MALFORMED = {
    "session as a list": {"type": "session.update", "session": [1, 2]},
    "session missing": {"type": "session.update"},
    "audio as a number": {"type": "input_audio_buffer.append", "audio": 12345},
    "audio missing": {"type": "input_audio_buffer.append"},
    "odd-length base64 audio": {"type": "input_audio_buffer.append", "audio": "AAEC"},
    "not base64": {"type": "input_audio_buffer.append", "audio": "***"},
    "huge audio": {"type": "input_audio_buffer.append", "audio": "A" * (40 * 24000 * 2 * 4 // 3)},
    "audio section as a string": {"type": "session.update", "session": {"audio": "loud"}},
    "turn_detection as a string": {"type": "session.update", "session": {"audio": {"input": {"turn_detection": "vad"}}}},
    "threshold as a string": {"type": "session.update",
                              "session": {"audio": {"input": {"turn_detection": {"threshold": "0.5"}}}}},
    "threshold above 1": {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": 1.5}}}}},
    "negative silence": {"type": "session.update",
                         "session": {"audio": {"input": {"turn_detection": {"silence_duration_ms": -1}}}}},
    "format as a string": {"type": "session.update", "session": {"audio": {"input": {"format": "pcm16"}}}},
    "rate as a string": {"type": "session.update",
                         "session": {"audio": {"output": {"format": {"type": "audio/pcm", "rate": "24000"}}}}},
    "max_output_tokens as a dict": {"type": "session.update", "session": {"max_output_tokens": {"n": 5}}},
    "response max_output_tokens negative": {"type": "response.create", "response": {"max_output_tokens": -3}},
    "response as a string": {"type": "response.create", "response": "now"},
    "zoo.options as a list": {"type": "session.update", "session": {"zoo": {"options": [1]}}},
    "zoo as a number": {"type": "session.update", "session": {"zoo": 3}},
    "option of the wrong type": {"type": "session.update", "session": {"zoo": {"options": {"temperature": "hot"}}}},
    "instructions as a number": {"type": "session.update", "session": {"instructions": 7}},
    "unknown type": {"type": "conversation.explode"},
    "type as a list": {"type": ["session.update"]},
    "missing type": {"session": {}},
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_realtime_event_gets_an_error_and_the_session_goes_on(server, name):
    event = {**MALFORMED[name], "event_id": "client_evt_7"}

    async def run():
        async with await realtime(server) as ws:
            await ws.send(json.dumps(event))
            error = await next_event(ws, "error", timeout=30)
            return error, await exchange(ws)
    error, done = asyncio.run(run())
    assert error["error"]["event_id"] == "client_evt_7", error
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    assert done["response"]["status"] == "completed"


@pytest.mark.parametrize("frame", ["{not json", "[1, 2]", "null", b"\x00\x01\x02",
                                   json.dumps({"type": "session.update", "session": {}, "event_id": {"a": 1}}),
                                   json.dumps({"type": "session.update", "session": {}, "event_id": 5})])
def test_non_events_and_odd_event_ids_get_errors(server, frame):
    async def run():
        async with await realtime(server) as ws:
            await ws.send(frame)
            error = await next_event(ws, "error", timeout=30)
            return error, await exchange(ws)
    error, done = asyncio.run(run())
    assert error["error"]["code"] and error["error"]["event_id"] is None
    assert done["response"]["status"] == "completed"


# -- item 7: connection limit ------------------------------------------------------------------------
def test_connections_over_the_limit_are_refused_at_once(server):
    async def run():
        sockets = [await realtime(server) for _ in range(MAX_CONNECTIONS)]
        try:
            started = time.monotonic()
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(ws_url(server), additional_headers=AUTH)
            http = await asyncio.to_thread(requests.post, server.url + "/chat", json={"audio": QUESTION},
                                           headers=AUTH, timeout=10)
            health = await asyncio.to_thread(requests.get, server.url + "/health", timeout=5)
            waited = time.monotonic() - started
        finally:
            await sockets.pop().close()
        again = await realtime(server)  # a slot is free again
        for ws in [*sockets, again]:
            await ws.close()
        return refused.value.response.status_code, http, health.status_code, waited
    refused_before = metric(server, "zoo_errors_total", "too_many_connections")
    ws_status, http, health, waited = asyncio.run(run())
    assert ws_status == 503 and http.status_code == 503 and health == 200 and waited < 3
    assert metric(server, "zoo_errors_total", "too_many_connections") == refused_before + 2
    assert http.json()["error"]["type"] == "too_many_connections"


# -- item 9: read timeouts -------------------------------------------------------------------------
def _closed_after(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    sock.settimeout(limit)
    started, received = time.monotonic(), b""
    while True:
        data = sock.recv(65536)
        if not data:
            return received, time.monotonic() - started
        received += data


def test_half_sent_headers_are_dropped(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        received, waited = _closed_after(sock, 10)
    assert received == b"" and waited < 4


def test_a_body_shorter_than_its_content_length_is_dropped(server):
    head = (f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b'{"audio": "')
        received, waited = _closed_after(sock, 10)
    assert received.startswith(b"HTTP/1.1 408") and b"read_timeout" in received and waited < 4


# -- item 10: idle timer -------------------------------------------------------------------------------
def test_idle_timer_spares_a_running_reply_and_says_why_it_closes(server):
    async def run():
        async with await realtime(server) as ws:
            await ask(ws, max_output_tokens=1500)
            quiet_since = time.monotonic()  # the client sends nothing from here on while it listens
            deltas = 0
            while time.monotonic() - quiet_since < IDLE_S * 2:
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert event["type"] != "response.done", "the reply ended before the test could check the timer"
                deltas += event["type"] == "response.output_audio.delta"
            await ws.send(json.dumps({"type": "response.cancel"}))
            done = await next_event(ws, "response.done")
            idle_started = time.monotonic()
            error = await next_event(ws, "error", timeout=IDLE_S * 3)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            return deltas, done, error, closed.value.rcvd, time.monotonic() - idle_started
    deltas, done, error, close, idle = asyncio.run(run())
    assert deltas > 0 and done["response"]["status"] == "cancelled"
    assert error["error"]["code"] == "idle_timeout"
    assert close.code == 1000 and "idle timeout" in close.reason and IDLE_S * 0.9 < idle < IDLE_S * 3


# -- item 9 / 10: shutdown -----------------------------------------------------------------------------
def test_sigterm_ends_within_ten_seconds_despite_a_slow_client_and_says_why():
    s = Server()
    try:
        async def run():
            ws = await websockets.connect(ws_url(s))
            await ws.recv()
            slow = await asyncio.to_thread(chat, s, 60, None, max_tokens=1500)
            pieces = slow.iter_content(1024)
            next(pieces)  # the reply runs; the client stops reading (and keeps the connection)
            started = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            exit_code = await asyncio.to_thread(s.proc.wait, 15)
            seconds = time.monotonic() - started
            with pytest.raises(requests.exceptions.ChunkedEncodingError):  # cut, not a complete-looking reply
                for _ in pieces:
                    pass
            return closed.value.rcvd, exit_code, seconds
        close, exit_code, seconds = asyncio.run(run())
    finally:
        s.stop()
    print(f"SIGTERM -> exit in {seconds:.1f} s")
    assert close.code == 1001 and close.reason == "server shutting down"
    assert exit_code in (0, -signal.SIGTERM) and seconds < 12  # uvicorn re-raises the signal once it is done
