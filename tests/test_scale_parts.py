"""The Ray Serve deployment's parts that need no cluster (serving/scale): replica counts and
autoscaling options, the command line and the KubeRay builder, a taken port, the server without Ray installed,
and the replica's merging of text-only chunks. The running deployment: test_scale_ray.py."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO


def test_replica_counts_and_autoscaling_options():
    from serving.scale.deploy import ModelSpec, parse_replicas

    assert parse_replicas("2", ["a", "b"]) == {"a": 2, "b": 2}
    assert parse_replicas("a=4,b=2", ["a", "b", "c"]) == {"a": 4, "b": 2, "c": 1}
    for bad in ("0", "x", "d=1"):
        with pytest.raises(ValueError):
            parse_replicas(bad, ["a", "b"])
    fixed = ModelSpec({"model": "mini-omni"}, max_sessions=16, replicas=3, num_gpus=1).options()
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 16 and fixed["max_queued_requests"] == 48
    assert fixed["ray_actor_options"]["num_gpus"] == 1
    scaled = ModelSpec({"model": "mini-omni"}, max_sessions=16, min_replicas=1, max_replicas=4).options()
    assert "num_replicas" not in scaled and scaled["max_queued_requests"] == 64
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                           "target_ongoing_requests": pytest.approx(0.7 * 16)}
    with pytest.raises(ValueError):
        ModelSpec({"model": "mini-omni"}, min_replicas=3, max_replicas=2).options()


def test_server_command_line_for_many_models():
    from serving.scale import cli

    assert cli.requested(["--replicas", "2"]) and cli.requested(["--ray-address=auto"]) and not cli.requested(["--tiny"])
    names, argv = cli.split_models(["--model", "mini-omni,glm-4-voice", "--tiny"])
    assert names == ["mini-omni", "glm-4-voice"] and argv == ["--model", "mini-omni", "--tiny"]
    import server

    args = server.parse_args(argv + ["--replicas", "mini-omni=4,glm-4-voice=2", "--min-replicas", "1",
                                     "--max-replicas", "mini-omni=8", "--prefill-positions", "0"])
    specs = cli.specs_from(args, names, 0)
    assert [(s.prefill_batch, s.prefill_positions) for s in specs] == [(8, None)] * 2  # 0: no bound
    assert [(s.name, s.replicas, s.min_replicas, s.max_replicas) for s in specs] == [
        ("mini-omni", 4, 1, 8), ("glm-4-voice", 2, 1, None)]
    assert specs[1].options()["autoscaling_config"]["max_replicas"] == 2  # no bound given: its replica count
    assert server.main(["--model", "mini-omni,no-such-model", "--replicas", "2"]) == 2
    # the builder KubeRay's RayService (and `serve run`) imports: the same flags, as one string
    from ray.serve import Application

    flags = "--model mini-omni,hertz-dev --tiny --replicas hertz-dev=3 --api-key k --max-sessions 4"
    assert isinstance(cli.application({"argv": flags}), Application)
    specs, front = cli.plan(flags.split() + ["--gpus-per-replica", "0.5"], cluster_gpus=0)
    assert [(s.name, s.replicas, s.num_gpus, s.max_sessions) for s in specs] == [("mini-omni", 1, 0.5, 4), ("hertz-dev", 3, 0.5, 4)]
    assert front.access.api_key == "k" and front.app_name == "omni-zoo"
    assert [s.num_gpus for s in cli.plan(flags.split(), cluster_gpus=8)[0]] == [1, 1]  # a GPU each where there are GPUs


def test_a_port_in_use_is_one_clear_error_before_ray_starts(caplog):
    """Serve would retry a taken port forever (its proxy, or the front under direct ingress)."""
    import server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert server.main(["--tiny", "--replicas", "1", "--port", str(port)]) == 2
    assert f"127.0.0.1:{port} is in use" in caplog.text


def test_the_single_process_server_needs_no_ray():
    """Ray is an optional extra: without it server.py serves as before, and --replicas says what to install."""
    code = ("import sys; sys.modules['ray'] = None\n"  # `import ray` fails as if it were not installed
            "import server, serving.app, serving.scale, serving.scale.cli\n"
            "assert server.parse_args(['--tiny']).replicas is None\n"
            "sys.exit(server.main(['--tiny', '--replicas', '2']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install '.[ray]'" in done.stderr


def test_text_only_chunks_travel_with_the_next_one():
    from serving.scale.replica import merged
    from zoo.core.types import Chunk

    text = Chunk(text=" hello")
    both = merged(merged(text, Chunk(text=" there")), Chunk(audio=np.ones(4, np.float32), text="!", turn={"t": 1}))
    assert both.text == " hello there!" and both.audio.tolist() == [1.0] * 4 and both.turn == {"t": 1}
