"""The server's hostile-client cases that need a failure provoked inside the model, or a stepper
watched from inside (issue #11): server.py's app in this process, with a tiny model."""
import asyncio
import base64
import json
import logging
import threading
import time

import numpy as np
import pytest
import requests
import uvicorn
import websockets
from procs import free_port
from test_hostile_server import AUTH, KEY, chat, metric
from test_realtime import pcm_chunks, speech_24k


# -- item 5: failures are never silent (in-process: a model that fails on demand) ---------------------
@pytest.fixture(scope="module")
def failing():
    """server.py's app on uvicorn in this process, with a tiny Mini-Omni whose batched step can be
    told to fail after n steps (``failing.after = n``) or whose prefill fails (``failing.at_start``)."""
    import zoo
    from serving.app import create_app
    from serving.service import Service

    service = Service(zoo.load("mini-omni", random_weights="tiny", device="cpu"), max_sessions=2)
    stepper, plan = service.stepper, {"after": None, "at_start": False, "steps": 0}
    step, start = stepper.step, stepper.start

    def failing_step(jobs):
        plan["steps"] += 1
        if plan["after"] is not None and plan["steps"] > plan["after"]:
            raise RuntimeError("injected step failure")
        step(jobs)

    def failing_start(job):
        if plan["at_start"]:
            raise RuntimeError("injected prefill failure")
        start(job)

    stepper.step, stepper.start = failing_step, failing_start
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)

    class Failing:
        url = f"http://127.0.0.1:{port}"

        def fail(self, *, after=None, at_start=False):
            plan.update(after=after, at_start=at_start, steps=0)

        def errors(self, kind):
            return metric(self, "zoo_errors_total", kind)
    try:
        yield Failing()
    finally:
        uv.should_exit = True
        thread.join(15)


def test_a_reply_that_fails_midway_is_cut_not_finished(failing, caplog):
    failing.fail(after=8)
    before = failing.errors("generation")
    response = chat(failing, max_tokens=200)
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    with caplog.at_level(logging.ERROR, logger="omni-zoo.server"):
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in response.iter_content(4096):
                pass
    assert failing.errors("generation") == before + 1
    assert any(request_id in r.getMessage() and "injected step failure" in r.getMessage() for r in caplog.records)
    failing.fail()
    assert chat(failing, max_tokens=12).content  # the server goes on


def test_a_failure_before_the_first_byte_is_a_json_500(failing):
    failing.fail(at_start=True)
    before = failing.errors("generation")
    response = chat(failing, max_tokens=20)
    failing.fail()
    assert failing.errors("generation") == before + 1  # counted once
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "generation" and "injected prefill failure" in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_a_failed_realtime_reply_never_looks_completed(failing):
    failing.fail(after=3)

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{failing.url.rsplit(':', 1)[1]}/v1/realtime") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "session": {
                "max_output_tokens": 200, "audio": {"input": {"turn_detection": None}}}}))
            for chunk in pcm_chunks(speech_24k(pad_before=0, pad_after=0)[:24000]):
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
            seen = []
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                seen.append(event)
                if event["type"] == "response.done":
                    return seen
    before = failing.errors("generation")
    seen = asyncio.run(run())
    failing.fail()
    errors = [e for e in seen if e["type"] == "error"]
    assert errors and errors[0]["error"]["type"] == "server_error" and "injected" in errors[0]["error"]["message"]
    assert seen[-1]["response"]["status"] == "failed"
    assert "response.output_audio.done" not in [e["type"] for e in seen]
    assert failing.errors("generation") == before + 1


# -- item 2: /set_temperature ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hertz_app():
    from fastapi.testclient import TestClient

    import zoo
    from serving.app import create_app
    from serving.security import AccessSettings
    from serving.service import Service

    service = Service(zoo.load("hertz-dev", random_weights="tiny", device="cpu"), max_sessions=2, duplex_sessions=2)
    opened = []
    reserve = service.duplex.reserve

    def recording_reserve(options, deliver):
        opened.append(options)
        return reserve(options, deliver)

    service.duplex.reserve = recording_reserve
    with TestClient(create_app(service, access=AccessSettings(api_key=KEY))) as client:
        yield client, opened, service


@pytest.mark.parametrize("query", ["token_temp=nan", "token_temp=-1", "token_temp=1e9", "gaussian_temp=inf",
                                   "categorical_temp=hot", "token_temp="])
def test_set_temperature_refuses_what_options_refuse(hertz_app, query):
    client, _, _ = hertz_app
    response = client.post("/set_temperature?" + query, headers=AUTH)
    assert response.status_code == 422 and response.json()["error"]["type"] == "bad_option"
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


def test_set_temperature_needs_the_key_and_only_changes_later_sessions(hertz_app):
    client, opened, _ = hertz_app
    assert client.post("/set_temperature?token_temp=0.1").status_code == 401
    with client.websocket_connect("/audio", headers={**AUTH}) as running:
        running.send_text("data:audio/raw;base64," + base64.b64encode(bytes(4000)).decode())
        running.receive_text()
        answer = client.post("/set_temperature?token_temp=0.1&gaussian_temp=0.2", headers=AUTH)
        assert answer.status_code == 200 and answer.json()["status"] == "success"
        with client.websocket_connect("/audio", headers={**AUTH}) as later:
            later.send_text("data:audio/raw;base64," + base64.b64encode(bytes(4000)).decode())
            later.receive_text()
    first, second = opened[-2:]
    assert (first.temperature, first.gaussian_temp) != (0.1, 0.2)
    assert (second.temperature, second.gaussian_temp) == (0.1, 0.2)


def test_a_failed_duplex_session_is_told_logged_and_counted(hertz_app, caplog):
    from starlette.websockets import WebSocketDisconnect

    client, _, service = hertz_app
    stepper = service.duplex.stepper
    before = service.metrics.registry.get_sample_value("zoo_errors_total", {"kind": "duplex_generation"}) or 0

    def failing_step(handles, frames):
        raise RuntimeError("injected duplex failure")

    stepper.step = failing_step
    try:
        with caplog.at_level(logging.ERROR, logger="omni-zoo.server"):
            with client.websocket_connect("/v1/duplex", headers={**AUTH}) as ws:
                assert ws.receive_json()["type"] == "session.created"
                ws.send_bytes(bytes(4000))
                error = ws.receive_json()
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_bytes()
    finally:
        del stepper.step  # the class's own step again
    assert error["type"] == "error" and error["error"]["code"] == "generation"
    assert "injected duplex failure" in error["error"]["message"]
    assert closed.value.code == 1011 and closed.value.reason == "generation"
    assert service.metrics.registry.get_sample_value("zoo_errors_total", {"kind": "duplex_generation"}) == before + 1
    assert any("duplex session" in r.getMessage() and "injected duplex failure" in r.getMessage()
               and r.getMessage().startswith("[req_") for r in caplog.records)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("192.168.1.5", False), ("myhost", False)])
def test_binding_beyond_loopback_without_a_key_is_warned_about(host, loopback):
    from server import is_loopback

    assert is_loopback(host) is loopback


def test_a_duplex_frame_split_at_an_odd_byte_reaches_the_model_intact(hertz_app):
    """PCM16 split mid-sample across messages: the odd byte waits for its partner."""
    client, _, service = hertz_app
    pushed, push = [], service.duplex.push
    service.duplex.push = lambda conn, frame: (pushed.append(frame.copy()), push(conn, frame))[1]
    samples = np.arange(-2000, 2000, 2, dtype="<i2")  # one 2000-sample frame, every sample distinct
    pcm = samples.tobytes()
    try:
        with client.websocket_connect("/v1/duplex", headers={**AUTH}) as ws:
            ws.receive_json()
            for piece in (pcm[:1001], pcm[1001:2999], pcm[2999:]):
                ws.send_bytes(piece)
            assert len(ws.receive_bytes()) == 4000
    finally:
        del service.duplex.push
    assert len(pushed) == 1 and np.array_equal(pushed[0], samples.astype(np.float32) / 32768)
