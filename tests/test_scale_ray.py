"""The Ray Serve deployment (serving/scale) on a local Ray bound to 127.0.0.1: two tiny models
behind one address, mini-omni with 2 replicas. One cluster for the whole module (Ray starts slowly);
every wait is bounded."""
import asyncio
import base64
import concurrent.futures
import os
import re
import time

import pytest
import requests
from conftest import REPO, SAMPLES
from procs import free_port
from test_realtime import next_of, pcm_chunks, speech_24k

from serving.scale.local import LOOPBACK_ENV, start_local_ray

TOKENS = 40  # a tiny mini-omni reply of this many steps has (TOKENS - 7) * 2048 samples at 24 kHz
REPLY_BYTES = (TOKENS - 7) * 2048 * 2
QUESTION = base64.b64encode((SAMPLES / "01.wav").read_bytes()).decode()
DEADLINE_S = 240


def tiny(name: str) -> dict:
    return {"model": name, "tiny": True, "random_full": False, "device": "cpu", "dtype": None}


@pytest.fixture(scope="module")
def url(_tiny_cache):
    env = {"PYTHONPATH": str(REPO), "ZOO_TINY_DIR": os.environ["ZOO_TINY_DIR"], "OMP_NUM_THREADS": "1"}
    start_local_ray(8, runtime_env={"env_vars": env}, log_to_driver=False)  # every Ray process on 127.0.0.1
    import ray
    from ray import serve

    from serving.scale.deploy import ModelSpec, build
    from serving.scale.ingress import FrontSettings

    assert os.environ[LOOPBACK_ENV] == "0" and ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        specs = [ModelSpec(tiny("mini-omni"), max_sessions=8, replicas=2, num_cpus=1),
                 ModelSpec(tiny("hertz-dev"), max_sessions=4, replicas=1, num_cpus=1)]
        serve.run(build(specs, FrontSettings()), name="omni-zoo", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + DEADLINE_S  # the front's view of the replicas catches up within a second
        while replicas_running(url, "mini-omni") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(url: str, timeout: float = 120, **fields) -> requests.Response:
    return requests.post(url + "/chat", json={"audio": QUESTION, "max_tokens": TOKENS, **fields}, timeout=timeout)


def metric(url: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric at /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {m.group(1) or "": float(m.group(2)) for m in re.finditer(rf"^{name}(\{{.*\}})? (\S+)$", text, re.M)}


def replicas_running(url: str, model: str) -> int:
    return requests.get(url + "/health", timeout=10).json()["models"][model]["replicas"].get("RUNNING", 0)


def test_two_models_behind_one_address_each_at_its_own_rate(url):
    models = requests.get(url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["mini-omni", "hertz-dev"]
    assert {m["card"]["output_sample_rate"] for m in models} == {24000, 16000}
    health = requests.get(url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["models"]["mini-omni"]["replicas"] == {"RUNNING": 2}
    by_field = chat(url, model="hertz-dev", max_tokens=4)
    by_prefix = requests.post(url + "/hertz-dev/chat", json={"audio": QUESTION, "max_tokens": 4}, timeout=120)
    default = chat(url)
    for r, rate in ((by_field, "16000"), (by_prefix, "16000"), (default, "24000")):
        assert r.status_code == 200, r.text
        assert r.headers["X-Sample-Rate"] == rate and r.content
    unknown = chat(url, model="gpt-4o")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "model_not_found"
    assert unknown.json()["error"]["request_id"].startswith("req_")
    duplex_refused = requests.get(url + "/hertz-dev/health", timeout=10)  # a model's own app answers too
    assert duplex_refused.json()["model"] == "hertz-dev"


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


def test_openai_sdk_realtime_conversation_through_ray(url):
    from openai import AsyncOpenAI

    port = url.rsplit(":", 1)[1]
    client = AsyncOpenAI(api_key="unused", base_url=url + "/v1", websocket_base_url=f"ws://127.0.0.1:{port}/v1")

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


def test_a_killed_replica_fails_its_replies_visibly_and_comes_back(url):
    def long_chat(_):
        try:
            r = requests.post(url + "/chat", json={"audio": QUESTION, "max_tokens": 400}, timeout=DEADLINE_S, stream=True)
            body = b"".join(r.iter_content(65536))
            return r.status_code, len(body)
        except requests.RequestException as err:  # a cut stream: the visible failure
            return "cut", type(err).__name__

    import ray

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(long_chat, i) for i in range(8)]
        deadline = time.monotonic() + 60
        while metric(url, "zoo_sessions_active").get("", 0) < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # audio is flowing on both replicas
        victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                      if "mini-omni" in a["name"] and "REPLICA" in a["name"].upper())
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
        results = [f.result(timeout=DEADLINE_S) for f in running]
    full = (400 - 7) * 2048 * 2
    cut = [r for r in results if r[0] == "cut"]
    assert cut, results  # the killed replica had replies in flight: they failed, visibly
    assert all(r == (200, full) for r in results if r[0] != "cut"), results  # never a short "complete" reply
    assert metric(url, "zoo_errors_total").get('{kind="replica_lost"}', 0) >= len(cut)
    later = [chat(url) for _ in range(4)]  # new work goes to the healthy replica
    assert [(r.status_code, len(r.content)) for r in later] == [(200, REPLY_BYTES)] * 4
    deadline = time.monotonic() + DEADLINE_S  # Serve restarts the dead one
    while replicas_running(url, "mini-omni") < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert replicas_running(url, "mini-omni") == 2
