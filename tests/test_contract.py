"""What every model of the zoo must do, whatever it is: run over ``zoo.names()``, so a model added
to the registry is covered without a test of its own."""
import threading

import numpy as np
import pytest

import zoo

QUESTION = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
SHORT = {"max_new_tokens": 12}


@pytest.fixture(scope="module", params=zoo.names())
def model(request, _tiny_cache):
    return zoo.load(request.param, random_weights="tiny", device="cpu")


def reply(model) -> tuple[np.ndarray, str]:
    chunks = list(model.respond(QUESTION, 16000, SHORT))
    audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0, np.float32)
    return audio, "".join(c.text for c in chunks)


def test_concurrent_in_process_replies_equal_a_reply_alone(model):
    """What the in-process Gradio page does: several replies on one loaded model at once. Each
    must get its own slot and come out exactly as it does alone."""
    alone = reply(model)
    assert alone[0].size, "a reply with audio is needed for the comparison"
    results, errors = [None] * 4, []
    start = threading.Barrier(4)

    def run(i: int) -> None:
        try:
            start.wait(timeout=30)
            results[i] = reply(model)
        except Exception as err:  # noqa: BLE001 - reported below with the thread's number
            errors.append((i, err))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for audio, text in results:
        assert text == alone[1]
        np.testing.assert_array_equal(audio, alone[0])


def test_every_model_times_the_shared_benchmark_stages(model):
    stages = model.benchmark_stages(QUESTION, 16000)
    assert set(zoo.Stage) <= set(stages)
    for stage in zoo.Stage:
        stages[stage]()
        stages[stage]()  # each stage can be timed again and again


def test_the_latency_bench_runs_for_every_model(model, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "bench/latency.py", "--model", model.card.name, "--size", "tiny",
                           "--device", "cpu", "--repeats", "1", "--reply-steps", "40", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {s.value for s in zoo.Stage} <= set(result["stages"])
    assert model.card.name in (tmp_path / "latency.md").read_text()
