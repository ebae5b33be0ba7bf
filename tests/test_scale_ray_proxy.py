"""``--serve-proxy``: the Ray deployment with Serve's HTTP proxy in front of the front replica
(the path of a cluster joined with --ray-address) rather than the front listening itself, as
test_scale_ray.py runs it. One tiny model, one replica: the proxy carries a streamed /chat reply
and a realtime WebSocket, and listens on loopback only."""
import asyncio
import json

import pytest
import requests
import websockets
from procs import LoopbackProcess
from test_scale_ray import DEADLINE_S, QUESTION, REPLY_BYTES, TOKENS, listener_of, replica_pids

SERVER = ["server.py", "--model", "mini-omni", "--tiny", "--replicas", "1", "--max-sessions", "2", "--serve-proxy",
          "--port", "{port}"]


@pytest.fixture(scope="module")
def server(_tiny_cache):
    with LoopbackProcess(SERVER, health="/health", timeout=DEADLINE_S) as s:
        yield s


def test_the_proxy_listens_and_carries_replies_and_sockets(server):
    assert "ProxyActor" in listener_of(server.port)
    assert len(replica_pids(server, "front")) == 1
    reply = requests.post(server.url + "/chat", json={"audio": QUESTION, "max_tokens": TOKENS}, timeout=120)
    assert (reply.status_code, len(reply.content)) == (200, REPLY_BYTES)
    assert reply.headers["x-request-id"]

    async def realtime():
        async with websockets.connect(server.url.replace("http", "ws") + "/v1/realtime") as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 60))
    assert asyncio.run(realtime())["type"] == "session.created"
