"""README.md's commands, run as a reader would, and the output it documents, checked.

Every command line of every ```bash block and every ```python block must be known here: either
run (against one `python server.py --tiny --max-sessions 32` on a free loopback port, as README
starts it, and a tiny Hertz-dev server for the full-duplex demo), or listed in NOT_RUN with the
reason, in which case what can run without its hardware or network does (its flags are parsed by
the program's own parser, `hf download`'s repos are checked against the cards). A new block the
test does not know fails it.

Commands are rewritten only in these documented ways:
- `127.0.0.1:60808` -> the test server's port; the terminal demos get the server through `API_URL`;
- `python inference.py` gets `--tiny` (unless it names weight folders) and `--max-new-tokens 8`;
- `weights/<part>` folders are the tiny checkpoints, written in the published layout;
- `zoo.load("mini-omni")` in the Python example gets `random_weights="tiny"`.
Each expected output is (what README shows, a pattern the output must match): the first must be
in README, so the check is of the documented output.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO, load_script
from procs import LoopbackProcess

import zoo

README = (REPO / "README.md").read_text()
SERVER_LINE = "python server.py --tiny --max-sessions 32"  # the README line the test serves with
DOCUMENTED_PORT = "127.0.0.1:60808"
TOKENS = "8"
TIMEOUT_S = 300


@dataclass
class Block:
    lang: str
    code: str
    line: int  # in README.md, for messages

    @property
    def commands(self) -> list[str]:
        """One command a line, without its trailing comment (two spaces or more, then #)."""
        lines = (re.sub(r"\s{2,}#.*$", "", line).strip() for line in self.code.splitlines())
        return [c for c in lines if c and not c.startswith("#")]


def readme_blocks() -> list[Block]:
    blocks = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.M | re.S):
        blocks.append(Block(match[1], match[2], README.count("\n", 0, match.start()) + 1))
    return blocks


BLOCKS = readme_blocks()
BASH = [b for b in BLOCKS if b.lang == "bash"]
PYTHON = [b for b in BLOCKS if b.lang == "python"]


# -- what each command is ----------------------------------------------------------------------------
@dataclass
class Rule:
    pattern: str  # matched against the command (re.search)
    reason: str | None = None  # not run, because ...
    expect: list[tuple[str, str]] = field(default_factory=list)  # (shown in README, regex on the output)
    files: dict[str, int] = field(default_factory=dict)  # file written -> sample rate (0: any non-empty file)
    server: str = "mini"  # which test server API_URL names

    def matches(self, command: str) -> bool:
        return re.search(self.pattern, command) is not None


CI = "CI runs the first two commands (install, inference with the published weights, the test suite)"
NO_NETWORK = "downloads from the Hugging Face hub; the tests have no network"
GPU = "needs a CUDA GPU and the published weights"
ANSWERED = ("answered 5 of 5 questions", r"answered (\d+) of \1 questions")
RULES = [
    Rule(r"^pip install -r requirements(-dev)?\.txt && python (inference\.py|-m pytest -q)$", reason=CI),
    Rule(r"^hf download ", reason=NO_NETWORK),
    Rule(r"--device cuda", reason=GPU),
    Rule(r"^python server\.py ", reason="a server runs until stopped: the test serves with "
                                        f"`{SERVER_LINE}` for the commands below, and parses this one's flags"),
    Rule(r"^python demos/mic_chat\.py", reason="needs a microphone and a speaker (PyAudio); its flags are parsed"),
    Rule(r"^python demos/duplex_chat\.py$", reason="needs a microphone and a speaker (PyAudio)"),
    Rule(r"^docker ", reason="needs Docker, which the tests do not have; tests/test_container.py checks the "
                             "image's and the compose example's server.py flags"),
    Rule(r"^hf (repos create|upload|spaces) ", reason="needs a Hugging Face account and the network; "
                                                    "tests/test_space.py runs the built folder as the Space runs it"),
    Rule(r"^python space/app\.py ", reason="a page runs until stopped: tests/test_space.py runs it in a browser"),
    Rule(r"^python space/build\.py ", files={"dist/space/app.py": 0, "dist/space/README.md": 0},
         expect=[("wrote the Space for mini-omni to dist/space", r"wrote the Space for mini-omni to dist/space")]),
    Rule(r"^(python webui/|streamlit run |API_URL=)", reason="the pages' own tests run them in a browser "
                                                             "(tests/test_webui_gradio.py, tests/test_webui_streamlit.py)"),
    Rule(r"^pip install -e \.\[quality\]$", reason="installs packages: requirements-dev.txt installs the same extra for CI"),
    Rule(r"^pip install -r requirements-ray\.txt$", reason="installs packages: requirements-dev.txt installs the same "
                                                           "[ray] extra for CI (tests/test_scale_ray.py)"),
    Rule(r"^python -m bench\.quality .*--tiny", reason="tests/test_quality.py runs the same pipeline end to end on tiny models"),
    Rule(r"^python -m bench\.quality .*(--checkpoint|--data) ", reason="needs the published weights or a local data set"),
    Rule(r"^python inference\.py --checkpoint weights/", expect=[ANSWERED]),
    Rule(r"^python inference\.py --tiny", expect=[ANSWERED, ("RANDOM WEIGHTS", r"RANDOM WEIGHTS")]),
    Rule(r"^python inference\.py --input ", expect=[ANSWERED]),
    Rule(r"^python inference\.py --model mini-omni2 --tiny", expect=[ANSWERED, ("RANDOM WEIGHTS", r"RANDOM WEIGHTS")]),
    Rule(r"^python -c \"import base64, json;.*> question\.json$", files={"question.json": 0}),
    Rule(r"^curl -sS -D - -o reply\.pcm .*/chat$",
         expect=[("HTTP/1.1 200 OK", r"HTTP/1.1 200 OK"), ("x-model: mini-omni", r"(?i)x-model: mini-omni"),
                 ("x-sample-rate: 24000", r"(?i)x-sample-rate: 24000"),
                 ("x-audio-format: pcm_s16le", r"(?i)x-audio-format: pcm_s16le"),
                 ("x-request-id", r"(?i)x-request-id: req_\w+")],
         files={"reply.pcm": 0}),
    Rule(r"^python -c \"import numpy as np, soundfile as sf; sf\.write\('reply\.wav'", files={"reply.wav": 24000}),
    Rule(r"^curl -s http://127\.0\.0\.1:60808/v1/models$",
         expect=[('{"object":"list","data":[{"id":"mini-omni"', r'^\{"object":"list","data":\[\{"id":"mini-omni"'),
                 ('"default_max_new_tokens"', r'"default_max_new_tokens":\d+'), ('"notice"', r'"notice":"RANDOM')]),
    Rule(r"^curl -s .*\"model\": \"glm-4-voice\".*/chat$",
         expect=[('{"error":{"type":"model_not_found"', r'^\{"error":\{"type":"model_not_found"'),
                 ("request_id", r'"request_id":"req_\w+"')]),
    Rule(r"^python demos/duplex_chat\.py --wav ", server="hertz", files={"reply.wav": 16000},
         expect=[("[connected to hertz-dev: 2000-sample frames at 16000 Hz, both ways at once]",
                  r"\[connected to hertz-dev: 2000-sample frames at 16000 Hz, both ways at once\]"),
                 ("[16 frames, 2.00 s of the model's audio]", r"\[16 frames, 2\.00 s of the model's audio\]")]),
]
PYTHON_RULES = [
    Rule(r'zoo\.load\("mini-omni"\)', files={"reply.wav": 24000},
         expect=[("wrote reply.wav at 24000 Hz", r"wrote reply\.wav at 24000 Hz")]),
    Rule(r"AsyncOpenAI\(api_key=", files={"reply.wav": 24000},
         expect=[("response completed:", r"response completed: \d+\.\d s of audio in reply\.wav")]),
]


def rule_for(command: str, rules=RULES) -> Rule | None:
    return next((r for r in rules if r.matches(command)), None)


def test_every_command_block_is_known_and_only_the_documented_ones_are_skipped():
    unknown = [f"README.md:{b.line}: {c}" for b in BASH for c in b.commands if rule_for(c) is None]
    unknown += [f"README.md:{b.line}: python block" for b in PYTHON if rule_for(b.code, PYTHON_RULES) is None]
    assert not unknown, "commands this test does not know (add a rule: run it, or say why not):\n" + "\n".join(unknown)
    assert [c for c in BASH[0].commands] == [
        "pip install -r requirements.txt && python inference.py",
        "pip install -r requirements-dev.txt && python -m pytest -q"]  # the only ones skipped for CI
    assert not [c for b in BASH[1:] for c in b.commands if rule_for(c).reason == CI]
    assert any(SERVER_LINE in c for b in BASH for c in b.commands)
    assert not [b for b in BLOCKS if b.lang not in ("bash", "python")], "a code block of another language"
    assert not [b for b in BASH if "\\\n" in b.code], "continued lines: one command a line"


def test_every_documented_output_is_in_readme():
    for rule in RULES + PYTHON_RULES:
        for shown, _ in rule.expect:
            assert shown in README, f"{rule.pattern}: README does not show {shown!r}"


# -- what is not run still runs what it can -------------------------------------------------------
def parse_flags(command: str) -> None:
    """The program's own parser accepts the command's flags (a renamed or removed flag fails)."""
    argv = shlex.split(command)
    assert argv[0] == "python"
    program, flags = argv[1], argv[2:]
    if program == "server.py":
        import server

        server.parse_args(flags)
    elif program == "inference.py":
        import inference

        inference.parse_args(flags)
    elif program.startswith("demos/"):
        load_script(program).build_parser().parse_args(flags)
    else:
        raise AssertionError(f"no parser known for {program}")




def test_commands_not_run_have_flags_their_programs_accept(monkeypatch):
    monkeypatch.setenv("OMNI_ZOO_API_KEY", "k")  # "$OMNI_ZOO_API_KEY" in a command is a value, not empty
    checked = 0
    for block in BASH:
        for command in block.commands:
            if rule_for(command).reason and command.startswith(("python server.py", "python inference.py",
                                                                 "python demos/")):
                parse_flags(os.path.expandvars(command))
                checked += 1
    assert checked >= 6


def test_hf_download_lines_fetch_every_published_part_and_the_cli_takes_them():
    from zoo.mini_omni.model import WHISPER_HUB_FALLBACK

    lines = [shlex.split(c) for b in BASH for c in b.commands if c.startswith("hf download ")]
    repos = {argv[2] for argv in lines}
    published = {repo for name in zoo.names() for repo in zoo.card(name).components.values()}
    assert repos == published | {WHISPER_HUB_FALLBACK}, "one `hf download` per published part (and Whisper's)"
    folders = {argv[argv.index("--local-dir") + 1] for argv in lines}
    used = {f for b in BASH for c in b.commands if "hf download" not in c for f in re.findall(r"weights/[\w.-]+", c)}
    assert used <= folders, f"commands name folders nothing downloads: {used - folders}"
    result = subprocess.run(["hf", "download", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--local-dir" in result.stdout


def test_the_space_commands_take_their_flags():
    """`hf` lines not run (no network) still name flags and a hardware flavor the installed `hf` has."""
    lines = [shlex.split(c) for b in BASH for c in b.commands if re.match(r"hf (repos create|upload|spaces) ", c)]
    assert len(lines) == 3
    for argv in lines:
        command = argv[:next(i for i, a in enumerate(argv) if "/" in a)]  # the words before the Space's id
        helped = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
        assert helped.returncode == 0, helped.stderr
        for flag in [a.split("=")[0] for a in argv if a.startswith("--")]:
            assert flag in helped.stdout, (command, flag)
        if "--flavor" in argv:
            assert argv[argv.index("--flavor") + 1] in helped.stdout


def test_the_models_table_is_the_cards():
    from zoo.model_table import BEGIN, END, models_table

    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == models_table(), "README's models table differs from the cards: " \
                                                "paste `python -m zoo.model_table` over it"
    for name in zoo.names():
        card = zoo.card(name)
        assert f"{card.output_sample_rate / 1000:g} kHz" in README[start:end] and card.download_size


# -- what runs ----------------------------------------------------------------------------------------
def tiny_server(*flags: str) -> LoopbackProcess:
    return LoopbackProcess(["server.py", *flags, "--port", "{port}"], health="/health")


@pytest.fixture(scope="module")
def servers():
    started = {"mini": tiny_server(*shlex.split(SERVER_LINE)[2:])}
    try:
        started["hertz"] = tiny_server("--tiny", "--model", "hertz-dev")
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder that looks like the repository (its files linked), with weights/ holding the tiny
    checkpoints where README's download commands put the published ones."""
    from zoo.mini_omni.random_weights import tiny_checkpoint

    root = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in (".git", "output", "weights"):
            (root / entry.name).symlink_to(entry)
    tiny = tiny_checkpoint(seed=0)
    (root / "weights").mkdir()
    (root / "weights" / "mini-omni").symlink_to(tiny.checkpoint)
    (root / "weights" / "snac_24khz").symlink_to(tiny.codec)
    return root


def rewrite(command: str, servers) -> str:
    command = command.replace(DOCUMENTED_PORT, f"127.0.0.1:{servers['mini'].port}")
    if command.startswith("python inference.py"):
        if "--max-new-tokens" not in command:
            command += f" --max-new-tokens {TOKENS}"
        if "--tiny" not in command and "weights/" not in command:
            command += " --tiny"
    return command


def run(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    environment.pop("OMNI_ZOO_API_KEY", None)  # the test servers have no key
    # the python of this test, whatever `python` is on PATH
    command = re.sub(r"^python ", shlex.quote(sys.executable) + " ", command)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def check(rule: Rule, result: subprocess.CompletedProcess, cwd: Path, what: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    for shown, pattern in rule.expect:
        assert re.search(pattern, output, re.M), f"{what}: README shows {shown!r}, the output has no {pattern!r}:\n" \
                                                  f"{output[-3000:]}"
    for name, rate in rule.files.items():
        path = cwd / name
        assert path.is_file() and path.stat().st_size > 0, f"{what} did not write {name}"
        if rate:
            audio, file_rate = sf.read(path)
            assert file_rate == rate and np.size(audio) > 0, (name, file_rate)


def forget(rule: Rule, cwd: Path) -> None:
    """Remove what the command is to write, so that an earlier command's file cannot pass for it."""
    for name in rule.files:
        (cwd / name).unlink(missing_ok=True)


RUN_BLOCKS = [b for b in BASH if any(rule_for(c) and not rule_for(c).reason for c in b.commands)]


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[f"README.md:{b.line}" for b in RUN_BLOCKS])
def test_bash_block_runs_and_prints_what_readme_says(block, servers, workdir):
    for command in block.commands:
        rule = rule_for(command)
        if rule.reason:
            continue  # listed in RULES with its reason (and its flags parsed above)
        forget(rule, workdir)
        result = run(rewrite(command, servers), workdir, {"API_URL": servers[rule.server].url})
        check(rule, result, workdir, command)


@pytest.mark.parametrize("block", PYTHON, ids=[f"README.md:{b.line}" for b in PYTHON])
def test_python_block_runs_and_prints_what_readme_says(block, servers, workdir):
    rule = rule_for(block.code, PYTHON_RULES)
    code = block.code.replace(DOCUMENTED_PORT, f"127.0.0.1:{servers['mini'].port}")
    loads = 'zoo.load("mini-omni")'
    if loads in code:
        code = code.replace(loads, 'zoo.load("mini-omni", random_weights="tiny")')
    script = workdir / "readme_block.py"
    script.write_text(code)
    forget(rule, workdir)
    try:
        check(rule, run(f"python {script.name}", workdir, {}), workdir, f"the python block at README.md:{block.line}")
    finally:
        script.unlink()


def test_the_server_logged_each_request_as_readme_says(servers):
    import base64

    import requests

    shown = "POST /chat 200 2.315s ttfa=0.163s req_"
    assert shown in README
    question = base64.b64encode((REPO / "demos" / "samples" / "01.wav").read_bytes()).decode()
    reply = requests.post(servers["mini"].url + "/chat", json={"audio": question, "max_tokens": 30}, timeout=120)
    assert reply.status_code == 200 and reply.content
    log = servers["mini"].output()
    assert "serving mini-omni on http://127.0.0.1:" in log and "serving mini-omni on http://127.0.0.1:60808" in README
    assert re.search(r"POST /chat 200 \d+\.\d{3}s ttfa=\d+\.\d{3}s req_\w+", log), log[-3000:]
