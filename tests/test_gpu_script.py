"""bench/gpu.sh runs only where a GPU is lent, minutes at a time: a script that no longer imports
as a script, or a flag it no longer takes, would waste that run. Every bench command in it must
start (``--help``) and accept every flag gpu.sh gives it."""
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO


def commands() -> list[list[str]]:
    """The ``python bench/<script>.py ...`` commands of gpu.sh, continuation lines joined."""
    text = (REPO / "bench" / "gpu.sh").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = re.search(r"python (bench/\S+\.py)(.*)", line)
        if match:
            found.append([match.group(1), *shlex.split(match.group(2))])
    return found


def test_gpu_sh_measures_every_model_family():
    scripts = {command[0] for command in commands()}
    assert {"bench/duplex.py", "bench/latency.py", "bench/glm4_engine.py", "bench/compare.py"} <= scripts


@pytest.mark.parametrize("script", sorted({command[0] for command in commands()}))
def test_every_bench_command_in_gpu_sh_starts_and_takes_its_flags(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for command in commands():
        if command[0] == script:
            for flag in (arg for arg in command[1:] if arg.startswith("--")):
                assert re.search(rf"{re.escape(flag)}\b", done.stdout), f"{script} takes no {flag}: {command}"


def _dry_run(tmp_path, *selection: str) -> list[str]:
    """gpu.sh with ``python`` and ``nvidia-smi`` stood in (they print their arguments): the
    names of the steps it ran, in order, and the steps it skipped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("python", "nvidia-smi"):
        (bin_dir / tool).write_text("#!/bin/sh\necho \"$0 $*\"\n")
        (bin_dir / tool).chmod(0o755)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(out), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", "bench/gpu.sh", *selection], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return re.findall(r"^=== (?:\S+ )?\[([\w-]+)\] (?!exit)(\S+)", done.stdout, re.M)


def test_gpu_sh_runs_the_first_part_or_the_rest_or_named_steps(tmp_path):
    """``first`` fits one device call and ``rest`` is everything else, so two calls run it all;
    named steps run alone; a side-by-side step without its reference checkout says it is skipped."""
    every = _dry_run(tmp_path)
    first, rest = _dry_run(tmp_path, "first"), _dry_run(tmp_path, "rest")
    assert first and rest and sorted(first + rest) == sorted(every)
    assert [name for name, _ in first][:1] == ["moshi-duplex"]
    assert _dry_run(tmp_path, "glm-int4-engine", "hertz-duplex") == [("glm-int4-engine", "python"),
                                                                     ("hertz-duplex", "python")]
    limits = {name: int(limit) for name, limit in re.findall(r"^step ([\w-]+) (\d+)", (REPO / "bench" / "gpu.sh").read_text(), re.M)}
    assert sum(limits[name] for name, _ in first) <= 570  # a 10-minute call, with room for the start
    if not (REPO / ".refs").exists():
        assert ("compare-moshi", "skipped:") in rest
