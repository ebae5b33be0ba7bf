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
