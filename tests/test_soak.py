"""bench/soak.py against a real tiny server it starts itself: a short run with every kind of action."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "soak"
    # one torch thread for the server: it shares a small machine with this process and the clients
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "bench/soak.py", "--model", "mini-omni", "--tiny", "--clients", "3",
                          "--seconds", "15", "--sample-every", "1", "--timeout", "30", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    result = json.loads(out.with_suffix(".json").read_text())
    assert run.returncode == (0 if result["lost"]["total"] == 0 and result["server_alive_at_end"] else 1), run.stderr[-2000:]
    assert out.with_suffix(".md").read_text().startswith("# Soak: mini-omni")
    return result


def test_soak_reports_replies_refusals_memory_and_fds(report):
    assert report["valid_replies"]["completed"] > 0 and report["ttfa_ms"]["p50"] > 0
    assert any(result.startswith("HTTP 4") for result in report["hostile"])  # refusals were seen
    assert any(result.startswith("dropped") for result in report["disconnects"])
    assert report["server_alive_at_end"] and report["sessions_after_run"] == 0
    sampled = [s for s in report["samples"] if s["rss_mib"] and s["fds"]]
    assert len(sampled) >= 5 and report["rss_mib"]["max"] > 0 and report["open_fds"]["max"] > 0


def test_soak_loses_no_reply(report):
    assert report["lost"]["total"] == 0, report["lost"]["reasons"]
