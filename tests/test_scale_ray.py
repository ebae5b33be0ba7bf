"""The Ray Serve deployment (serving/scale), run as README says: ``python server.py --model
mini-omni,hertz-dev,moshi --tiny --replicas mini-omni=2`` with an API key, on a local Ray that lives
on 127.0.0.1 only. One server for the whole module (Ray starts slowly); every wait is bounded.
The pure parts (replica counts, autoscaling options, the command line) are in test_scale_parts.py."""
import asyncio
import base64
import concurrent.futures
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import websockets
from conftest import SAMPLES
from procs import LoopbackProcess
from test_realtime import next_of, pcm_chunks, speech_24k

TOKENS = 40  # a tiny mini-omni reply of this many steps has (TOKENS - 7) * 2048 samples at 24 kHz
REPLY_BYTES = (TOKENS - 7) * 2048 * 2
QUESTION = base64.b64encode((SAMPLES / "01.wav").read_bytes()).decode()
DEADLINE_S = 240
KEY = "scale-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVER = ["server.py", "--model", "mini-omni,hertz-dev,moshi", "--tiny", "--replicas", "mini-omni=2", "--max-sessions", "8",
          "--api-key", KEY, "--port", "{port}"]


@pytest.fixture(scope="module")
def server(_tiny_cache):
    with LoopbackProcess(SERVER, health="/health", timeout=DEADLINE_S) as s:
        deadline = time.monotonic() + DEADLINE_S  # /health answers once the front runs; replicas may still start
        while replicas_running(s.url, "mini-omni") < 2 and time.monotonic() < deadline:
            assert s.proc.poll() is None, s.output()[-3000:]
            time.sleep(0.5)
        yield s
        ours = {(pid, title) for pid, title in processes() if s.proc.pid in ancestors(pid)}
    deadline = time.monotonic() + 30  # SIGTERM to server.py takes its Ray instance down with it
    while ours & set(processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ours & set(processes()), f"Ray processes outlived server.py: {ours & set(processes())}"


@pytest.fixture(scope="module")
def url(server):
    return server.url


def chat(url: str, timeout: float = 120, **fields) -> requests.Response:
    return requests.post(url + "/chat", json={"audio": QUESTION, "max_tokens": TOKENS, **fields}, headers=AUTH,
                         timeout=timeout)


def metric(url: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric at /metrics."""
    text = requests.get(url + "/metrics", headers=AUTH, timeout=10).text
    return {m.group(1) or "": float(m.group(2)) for m in re.finditer(rf"^{name}(\{{.*\}})? (\S+)$", text, re.M)}


def replicas_running(url: str, model: str) -> int:
    try:
        health = requests.get(url + "/health", timeout=10).json()
    except (requests.RequestException, ValueError):
        return 0
    return health.get("models", {}).get(model, {}).get("replicas", {}).get("RUNNING", 0)


def long_chat(url: str, max_tokens: int):
    """One streamed /chat reply: (status, bytes), or ("cut", error name) for a broken stream."""
    try:
        r = requests.post(url + "/chat", json={"audio": QUESTION, "max_tokens": max_tokens}, headers=AUTH,
                          timeout=DEADLINE_S, stream=True)
        return r.status_code, len(b"".join(r.iter_content(65536)))
    except requests.RequestException as err:  # a cut stream: the visible failure
        return "cut", type(err).__name__


def wait_for_sessions(url: str, n: int, running=()) -> None:
    """Until mini-omni's replicas hold ``n`` replies (none of ``running`` may end meanwhile)."""
    deadline = time.monotonic() + 60
    while requests.get(url + "/health", headers=AUTH, timeout=10).json()["models"]["mini-omni"]["sessions"] < n:
        assert time.monotonic() < deadline and not any(f.done() for f in running)
        time.sleep(0.1)


def replica_pids(server, deployment: str) -> list[int]:
    """The processes of this server's Serve replicas of ``deployment`` (a model's name, or front)."""
    return [pid for pid, title in processes()
            if f"ServeReplica:omni-zoo:{deployment}" in title and server.proc.pid in ancestors(pid)]


def processes() -> list[tuple[int, str]]:
    """(pid, command line) of every process (Ray names its workers ``ray::<actor class>:...``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()))
            except OSError:
                pass
    return found


def ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        seen.add(pid)
    return seen


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses that these processes listen on (TCP), from /proc/net/tcp{,6}."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address = fields[1].split(":")[0]
                addresses.add(address)
    return addresses


def listener_of(port: int) -> str:
    """The command line of the process listening on 127.0.0.1:``port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            inode = fields[9]
    assert inode is not None, f"nothing listens on 127.0.0.1:{port}"
    for pid, title in processes():
        try:
            if any(os.readlink(fd) == f"socket:[{inode}]" for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return title
        except OSError:
            pass
    raise AssertionError(f"no process holds the listener of port {port}")


# -- the server ----------------------------------------------------------------------------------
def test_every_ray_process_listens_on_loopback_only(server):
    ours = {pid for pid, _ in processes() if server.proc.pid in ancestors(pid)} | {server.proc.pid}
    assert any("ServeReplica" in title for pid, title in processes() if pid in ours)
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert listening_addresses(ours) <= loopback  # 127.0.0.1 / ::1 / ::ffff:127.0.0.1, never 0.0.0.0 or the LAN


def test_the_front_replica_itself_listens_on_the_port(server):
    """Serve's direct ingress: no proxy hop between the client and the front (docs/SCALING.md)."""
    assert "ServeReplica:omni-zoo:front" in listener_of(server.port)


def test_two_models_behind_one_address_each_at_its_own_rate(url):
    models = requests.get(url + "/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["mini-omni", "hertz-dev", "moshi"]
    assert {m["card"]["output_sample_rate"] for m in models} == {24000, 16000}
    health = requests.get(url + "/health", timeout=10).json()  # no key needed, as the single-process server
    assert health["status"] == "ok"
    assert health["models"]["mini-omni"]["replicas"] == {"RUNNING": 2} and health["models"]["mini-omni"]["state"] == "ok"
    assert health["models"]["hertz-dev"]["replicas"] == {"RUNNING": 1}
    by_field = chat(url, model="hertz-dev", max_tokens=4)
    by_prefix = requests.post(url + "/hertz-dev/chat", json={"audio": QUESTION, "max_tokens": 4}, headers=AUTH, timeout=120)
    default = chat(url)
    for r, rate in ((by_field, "16000"), (by_prefix, "16000"), (default, "24000")):
        assert r.status_code == 200, r.text
        assert r.headers["X-Sample-Rate"] == rate and r.content
    assert len(default.content) == REPLY_BYTES
    unknown = chat(url, model="gpt-4o")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "model_not_found"
    # one request id, Serve's own (so its logs and ours agree), in the header and the error
    assert unknown.json()["error"]["request_id"] == unknown.headers["x-request-id"] and "," not in unknown.headers["x-request-id"]
    assert requests.get(url + "/hertz-dev/health", headers=AUTH, timeout=10).json()["model"] == "hertz-dev"  # its own app


def test_the_single_process_servers_gate_stands_in_front(url):
    assert requests.get(url + "/v1/models", timeout=10).status_code == 401
    assert requests.post(url + "/chat", json={"audio": QUESTION}, timeout=10).status_code == 401
    assert requests.post(url + "/chat", data="x", headers={**AUTH, "Content-Type": "text/plain"}, timeout=10).status_code == 415

    async def foreign_origin():
        ws = await websockets.connect(url.replace("http", "ws") + "/v1/realtime", additional_headers=AUTH,
                                      origin="https://evil.example.net")
        await ws.close()
    with pytest.raises((websockets.InvalidStatus, websockets.ConnectionClosed)) as refused:
        asyncio.run(foreign_origin())
    if isinstance(refused.value, websockets.InvalidStatus):
        assert refused.value.response.status_code == 403
    else:
        assert refused.value.rcvd.code == 1008 and refused.value.rcvd.reason == "forbidden_origin"
    assert metric(url, "zoo_errors_total").get('{kind="forbidden_origin"}', 0) >= 1


def test_sixteen_concurrent_chats_complete_on_both_replicas(url):
    before = metric(url, "zoo_replica_replies_total")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: chat(url), range(16)))
    assert [r.status_code for r in replies] == [200] * 16, [r.text[:200] for r in replies if r.status_code != 200]
    assert all(len(r.content) == REPLY_BYTES for r in replies)
    after = metric(url, "zoo_replica_replies_total")
    served = {k: v - before.get(k, 0) for k, v in after.items() if 'model="mini-omni"' in k}
    assert sum(served.values()) == 16
    assert len([n for n in served.values() if n > 0]) == 2, served  # both replicas took replies


def test_all_slots_taken_is_503_busy_at_once(url):
    """2 replicas x 8 slots: a 17th reply is refused at once, as the single-process server does."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        running = [pool.submit(long_chat, url, 300) for _ in range(16)]
        wait_for_sessions(url, 16, running)
        started = time.monotonic()
        refused = chat(url)
        waited = time.monotonic() - started
        other_model = chat(url, model="hertz-dev", max_tokens=4)  # another model's slots are its own
        results = [f.result(timeout=DEADLINE_S) for f in running]
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "busy", refused.text
    assert refused.headers["Retry-After"] == "1" and waited < 2.0
    assert other_model.status_code == 200 and other_model.content
    assert results == [(200, (300 - 7) * 2048 * 2)] * 16


def test_openai_sdk_realtime_conversation_through_ray(url):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=KEY, base_url=url + "/v1", websocket_base_url=url.replace("http", "ws") + "/v1")

    async def run():
        async with client.realtime.connect(model="mini-omni") as conn:
            created, _ = await next_of(conn, "session.created")
            assert created.session.model == "mini-omni"
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 30})
            await next_of(conn, "session.updated")
            dones = []
            for _ in range(2):  # two turns: the session (and its history) lives on through them
                for chunk in pcm_chunks(speech_24k()):
                    await conn.input_audio_buffer.append(audio=chunk)
                audio = b""
                async for event in conn:
                    if event.type == "response.output_audio.delta":
                        audio += base64.b64decode(event.delta)
                    elif event.type == "error":
                        raise AssertionError(event.error.message)
                    elif event.type == "response.done":
                        dones.append((event.response.status, len(audio)))
                        break
            return dones
    dones = asyncio.run(asyncio.wait_for(run(), DEADLINE_S))
    assert dones == [("completed", (30 - 7) * 2048 * 2)] * 2


def test_full_duplex_sessions_through_ray(url):
    """/v1/duplex for hertz-dev through the front: each session is held on one replica, frames
    answered in order; /health counts the sessions while they are open."""
    frame = 2000

    async def session(seed: int, frames: int = 12) -> list[int]:
        async with websockets.connect(url.replace("http", "ws") + "/hertz-dev/v1/duplex", additional_headers=AUTH) as ws:
            created = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert created["type"] == "session.created" and created["session"]["frame_samples"] == frame
            rng = np.random.default_rng(seed)
            sizes = []
            for i in range(frames):
                await ws.send((rng.standard_normal(frame) * 3000).astype("<i2").tobytes())
                sizes.append(len(await asyncio.wait_for(ws.recv(), 60)))
                if i == frames // 2:
                    health = await asyncio.to_thread(lambda: requests.get(url + "/health", timeout=10).json())
                    sizes.append(health["models"]["hertz-dev"]["duplex_sessions"])
            return sizes

    async def both():
        return await asyncio.gather(session(1), session(2))
    answers = asyncio.run(asyncio.wait_for(both(), DEADLINE_S))
    assert [a[:7] + a[8:] for a in answers] == [[2 * frame] * 12] * 2  # one answer per frame, in step
    assert [a[7] for a in answers] == [2, 2]  # both sessions open at the front's count
    deadline = time.monotonic() + 30  # a closed session frees its slot
    while requests.get(url + "/health", timeout=10).json()["models"]["hertz-dev"]["duplex_sessions"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_moshi_text_streams_beside_its_audio_through_ray(url):
    """A model with a text stream keeps it through the front: /v1/duplex sends ``text.delta``
    events before the step's frame, Moshi's own /api/chat its 0x02 text messages."""
    from test_moshi_protocol import FRAME, RATE, opus_pages, speech

    frame, question = FRAME, speech(12, seed=5)  # a tone with noise, 12 frames at 24 kHz

    async def pcm_session() -> tuple[int, str]:
        async with websockets.connect(url.replace("http", "ws") + "/moshi/v1/duplex", additional_headers=AUTH) as ws:
            created = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert created["session"]["text_output"] is True and created["session"]["frame_samples"] == frame
            assert created["session"]["sample_rate"] == RATE
            frames, text = 0, ""
            for block in question.reshape(-1, frame):
                await ws.send((block * 32767).astype("<i2").tobytes())
                while True:
                    message = await asyncio.wait_for(ws.recv(), 60)
                    if isinstance(message, bytes):
                        assert len(message) == 2 * frame
                        frames += 1
                        break
                    event = json.loads(message)
                    assert event["type"] == "text.delta", event
                    text += event["delta"]
            return frames, text

    async def kyutai_session() -> tuple[int, str]:
        async with websockets.connect(url.replace("http", "ws") + "/moshi/api/chat", additional_headers=AUTH) as ws:
            assert await asyncio.wait_for(ws.recv(), 60) == b"\x00"
            kinds, text = [], ""
            for page in opus_pages(question):
                await ws.send(b"\x01" + page)
            while kinds.count(1) < 8:  # Opus pages come as the encoder fills them
                message = await asyncio.wait_for(ws.recv(), 60)
                kinds.append(message[0])
                text += message[1:].decode() if message[0] == 2 else ""
            return kinds.count(1), text

    frames, text = asyncio.run(asyncio.wait_for(pcm_session(), DEADLINE_S))
    assert frames == 12 and text  # the tiny model's gibberish, but text
    pages, spoken = asyncio.run(asyncio.wait_for(kyutai_session(), DEADLINE_S))
    assert pages >= 8 and spoken


def test_a_killed_replica_fails_its_replies_visibly_and_comes_back(server, url):
    replicas = replica_pids(server, "mini-omni")
    assert len(replicas) == 2, replicas
    before = metric(url, "zoo_replica_replies_total")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(long_chat, url, 400) for _ in range(8)]
        wait_for_sessions(url, 8)
        time.sleep(1.0)  # audio is flowing
        started = {k for k, v in metric(url, "zoo_replica_replies_total").items()
                   if 'model="mini-omni"' in k and v > before.get(k, 0)}
        assert len(started) == 2, started  # both replicas hold replies: whichever dies has some in flight
        os.kill(replicas[0], signal.SIGKILL)
        results = [f.result(timeout=DEADLINE_S) for f in running]
    full = (400 - 7) * 2048 * 2
    cut = [r for r in results if r[0] == "cut"]
    assert cut, results  # the killed replica had replies in flight: they failed, visibly
    assert all(r == (200, full) for r in results if r[0] != "cut"), results  # never a short "complete" reply
    assert metric(url, "zoo_errors_total").get('{kind="replica_lost"}', 0) >= len(cut)
    later = [chat(url) for _ in range(4)]  # new work goes to the healthy replica
    assert [(r.status_code, len(r.content)) for r in later] == [(200, REPLY_BYTES)] * 4
    deadline = time.monotonic() + DEADLINE_S  # Serve starts a new one; /health says so meanwhile
    states = set()
    while replicas_running(url, "mini-omni") < 2 and time.monotonic() < deadline:
        states.add(requests.get(url + "/health", timeout=10).json()["models"]["mini-omni"]["state"])
        time.sleep(1)
    assert replicas_running(url, "mini-omni") == 2
    assert requests.get(url + "/health", timeout=10).json()["models"]["mini-omni"]["state"] == "ok"
    assert chat(url).status_code == 200


def test_a_killed_duplex_replica_ends_its_session_visibly_and_comes_back(server, url):
    frame, duplex_url = 2000, url.replace("http", "ws") + "/hertz-dev/v1/duplex"
    victims = replica_pids(server, "hertz-dev")
    assert len(victims) == 1, victims
    lost_before = metric(url, "zoo_errors_total").get('{kind="replica_lost"}', 0)
    pcm = (np.random.default_rng(5).standard_normal(frame) * 3000).astype("<i2").tobytes()

    async def killed_mid_session():
        events = []
        async with websockets.connect(duplex_url, additional_headers=AUTH) as ws:
            await asyncio.wait_for(ws.recv(), 60)  # session.created
            for _ in range(3):
                await ws.send(pcm)
                assert len(await asyncio.wait_for(ws.recv(), 60)) == 2 * frame
            os.kill(victims[0], signal.SIGKILL)
            try:
                for _ in range(400):  # the client keeps talking until the server ends the session
                    await ws.send(pcm)
                    message = await asyncio.wait_for(ws.recv(), 60)
                    if isinstance(message, str):
                        events.append(json.loads(message))
                    await asyncio.sleep(0.05)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None, events
        return None, events

    async def fresh_session():
        async with websockets.connect(duplex_url, additional_headers=AUTH) as ws:
            await asyncio.wait_for(ws.recv(), 60)
            await ws.send(pcm)
            return len(await asyncio.wait_for(ws.recv(), 60))

    code, events = asyncio.run(asyncio.wait_for(killed_mid_session(), DEADLINE_S))
    assert code == 1011 and [e["error"]["code"] for e in events if e["type"] == "error"] == ["generation"], (code, events)
    assert "lost" in events[-1]["error"]["message"]
    assert metric(url, "zoo_errors_total").get('{kind="replica_lost"}', 0) > lost_before
    deadline = time.monotonic() + DEADLINE_S  # Serve starts a new replica; then sessions work again
    answers = []
    while time.monotonic() < deadline and not answers:
        time.sleep(2)  # the front's view of the replicas (polled every second) may lag the restart
        if replicas_running(url, "hertz-dev") == 1:
            try:
                answers.append(asyncio.run(asyncio.wait_for(fresh_session(), 120)))
            except (websockets.ConnectionClosed, websockets.InvalidStatus):
                pass  # refused while the replica was still starting: busy or unavailable, at once
    assert answers == [2 * frame]


def test_a_killed_front_cuts_its_replies_visibly_and_comes_back_on_the_same_port(server, url):
    """The front (the one process clients talk to) dies mid-reply: its replies end as broken
    streams, never as short complete ones; Serve starts a new front on the same port, behind
    which the model replicas never stopped."""
    front = replica_pids(server, "front")
    assert len(front) == 1, front
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(long_chat, url, 400) for _ in range(2)]
        wait_for_sessions(url, 2)
        os.kill(front[0], signal.SIGKILL)
        results = [f.result(timeout=DEADLINE_S) for f in running]
    assert all(r[0] == "cut" for r in results), results
    deadline = time.monotonic() + DEADLINE_S
    while replicas_running(url, "mini-omni") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replicas_running(url, "mini-omni") == 2, server.output()[-4000:]
    assert "ServeReplica:omni-zoo:front" in listener_of(server.port)
    health = requests.get(url + "/health", timeout=10).json()
    assert {name: m["replicas"] for name, m in health["models"].items()} == {
        "mini-omni": {"RUNNING": 2}, "hertz-dev": {"RUNNING": 1}, "moshi": {"RUNNING": 1}}
    reply = chat(url)
    assert (reply.status_code, len(reply.content)) == (200, REPLY_BYTES)
