"""The server's access log (serving/access_log.py through serving/security.py's Guard): one line
per request with method, path, status, duration, TTFA for audio replies and the request id; one
line per WebSocket session when it ends, saying how."""
import asyncio
import logging
import re

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient

from serving.errors import ReplyAborted
from serving.metrics import Metrics
from serving.security import AccessSettings, Guard, OpenSockets


async def audio(request):
    async def body():
        await asyncio.sleep(0.05)  # the first audio takes a while
        yield b"\x00\x01" * 100
        yield b"\x00\x01" * 100
    return StreamingResponse(body(), headers={"X-Sample-Rate": "24000"})


async def cut(request):
    async def body():
        yield b"\x00\x01" * 100
        raise ReplyAborted("the model failed mid-reply")
    return StreamingResponse(body(), headers={"X-Sample-Rate": "24000"})


async def models(request):
    return JSONResponse({"data": []})


async def echo(websocket):
    await websocket.accept()
    message = await websocket.receive_text()
    if message == "bye":
        await websocket.close(1000, "done")
        return
    while True:
        await websocket.receive_text()


def client(api_key=None) -> TestClient:
    app = Starlette(routes=[Route("/chat", audio, methods=["POST"]), Route("/cut", cut, methods=["POST"]),
                            Route("/v1/models", models), WebSocketRoute("/ws", echo)])
    guarded = Guard(app, AccessSettings(api_key=api_key), Metrics(), OpenSockets())
    return TestClient(guarded, raise_server_exceptions=False)


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "omni-zoo.access"]


@pytest.fixture(autouse=True)
def _info(caplog):
    caplog.set_level(logging.INFO, logger="omni-zoo.access")


def test_an_audio_reply_is_one_line_with_status_duration_ttfa_and_request_id(caplog):
    response = client().post("/chat", json={})
    assert response.status_code == 200
    [line] = lines(caplog)
    match = re.fullmatch(r"POST /chat 200 (\d+\.\d{3})s ttfa=(\d+\.\d{3})s (req_\w+)", line)
    assert match, line
    assert 0.05 <= float(match[2]) <= float(match[1])
    assert match[3] == response.headers["x-request-id"]


def test_a_reply_without_audio_has_no_ttfa_and_a_refusal_is_logged_too(caplog):
    c = client(api_key="k")
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
    refused, served = lines(caplog)
    assert re.fullmatch(r"GET /v1/models 401 \d+\.\d{3}s req_\w+", refused), refused
    assert re.fullmatch(r"GET /v1/models 200 \d+\.\d{3}s req_\w+", served), served


def test_a_reply_cut_after_its_first_bytes_says_failed(caplog):
    try:
        client().post("/cut", json={})
    except Exception:  # noqa: BLE001 - the test client may surface the cut transfer
        pass
    [line] = lines(caplog)
    assert re.fullmatch(r"POST /cut 200 \d+\.\d{3}s ttfa=\d+\.\d{3}s failed \(ReplyAborted\) req_\w+", line), line


def test_websocket_sessions_are_one_line_at_close_with_duration_and_outcome(caplog):
    c = client()
    with c.websocket_connect("/ws") as ws:
        ws.send_text("bye")
        ws.receive()  # the server's close
    with c.websocket_connect("/ws") as ws:
        ws.send_text("hello")
        ws.close(1000)
    server_closed, client_closed = lines(caplog)
    assert re.fullmatch(r"WS /ws 101 \d+\.\d{3}s closed by server 1000 \(done\) req_\w+", server_closed), server_closed
    assert re.fullmatch(r"WS /ws 101 \d+\.\d{3}s closed by client 1000 req_\w+", client_closed), client_closed
