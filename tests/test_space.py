"""The Hugging Face Space (space/): the folder `python space/build.py` writes (its README front
matter from the cards and the installed Gradio, app.py, requirements, the packages), started as a
Space starts it (`python app.py` in that folder, nothing from the repository on its path) with tiny
weights and a stand-in `spaces` package that records `spaces.GPU`'s duration and calls, and driven
in headless Chromium as a visitor would: on a phone-sized screen a spoken question gets its reply
through the GPU decorator, under the random-weight banner, with the about panel's card facts; the
question is deleted once answered and Gradio's cached files after OMNI_ZOO_CACHE_S; a second
visitor waits in the queue (and sees their place) while the first is answered; a question over the
length limit and one over the per-visitor rate are refused with a message and never answered.
The rules themselves (rate window, memory pressure, reply cap, GPU duration) are checked without
a browser in test_space_parts.py.

``WEBUI_SHOTS=docs/screenshots`` also writes the phone screenshot committed there."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import gradio
import numpy as np
import pytest
import soundfile as sf
import yaml
from browser import browser_page, browser_pages, fake_mic_wav
from conftest import REPO
from procs import LoopbackProcess
from test_webui_gradio import REPLIES, open_page, record, talk, wait_ready

import zoo

SHOTS = os.environ.get("WEBUI_SHOTS")
PHONE = (390, 844)  # an iPhone 12-15's CSS viewport
CACHE_S = 6
MAX_REPLY_S = 90  # long enough a reply for a second visitor to queue behind it
FAKE_SPACES = '''"""Stand-in for Hugging Face's `spaces` package: spaces.GPU records its duration and each call."""
import functools
import inspect


def GPU(duration=60, **options):
    print(f"spaces.GPU(duration={duration})", flush=True)

    def decorate(function):
        assert inspect.isgeneratorfunction(function) or callable(function)

        @functools.wraps(function)
        def on_gpu(*args, **kwargs):
            print(f"spaces.GPU call {function.__name__}", flush=True)
            try:
                yield from function(*args, **kwargs)
            finally:
                print(f"spaces.GPU done {function.__name__}", flush=True)

        return on_gpu

    return decorate
'''


# -- the folder ---------------------------------------------------------------------------------
def front_matter(readme: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    assert match, "a Space's README starts with its YAML front matter"
    return yaml.safe_load(match[1])


def published_repos(name: str) -> list[str]:
    from zoo.mini_omni.model import WHISPER_HUB_FALLBACK

    repos = list(zoo.card(name).components.values())
    return repos + ([WHISPER_HUB_FALLBACK] if name == "mini-omni" else [])


def build_space(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "space/build.py", str(out), *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def space_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("space") / "omni-zoo"
    built = build_space(out)
    assert built.returncode == 0, built.stderr
    assert f"hf upload YOUR_NAME/omni-zoo {out} . --repo-type space" in built.stdout
    return out


def test_the_space_folder_is_what_hugging_face_runs(space_dir, tmp_path):
    meta = front_matter((space_dir / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__  # the Gradio tested here
    assert (space_dir / meta["app_file"]).is_file() and meta["app_file"] == "app.py"
    assert meta["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert meta["suggested_hardware"] == "zero-a10g"  # Mini-Omni's 3.4 GB: ZeroGPU
    assert meta["models"] == published_repos("mini-omni")  # every repo its weights come from
    assert len(meta["short_description"]) <= 60
    # the committed space/README.md is the default build's (regenerated when Gradio or a card changes)
    assert (REPO / "space" / "README.md").read_text() == (space_dir / "README.md").read_text()
    check = subprocess.run([sys.executable, "space/build.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # another model: its repos, a card big enough for a dedicated GPU, and app.py's default
    glm = tmp_path / "glm"
    assert build_space(glm, "--model", "glm-4-voice").returncode == 0
    glm_meta = front_matter((glm / "README.md").read_text())
    assert glm_meta["models"] == published_repos("glm-4-voice") and glm_meta["suggested_hardware"] == "l40sx1"
    assert 'os.environ.setdefault("OMNI_ZOO_MODEL", "glm-4-voice")' in (glm / "app.py").read_text()
    assert build_space(tmp_path / "x", "--model", "no-such-model").returncode == 2
    # the packages, without caches; the requirements are the project's, minus what the Space brings
    assert (space_dir / "zoo" / "__init__.py").is_file() and (space_dir / "webui" / "space.py").is_file()
    assert not list(space_dir.rglob("__pycache__"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [d for d in project if not d.startswith(("gradio", "streamlit"))] + ["requests>=2.31"]
    lines = [line for line in (space_dir / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    assert lines == wanted


def test_app_py_imports_the_folders_own_packages_and_nothing_it_does_not_ship(space_dir):
    probe = ("import runpy, sys; runpy.run_path('app.py', run_name='space'); "
             "print(sys.modules['zoo'].__file__); print(sys.modules['webui.space'].__file__); "
             "print(sorted(m for m in ('streamlit', 'serving') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=space_dir, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr
    zoo_file, space_file, extra = run.stdout.strip().splitlines()[-3:]
    assert Path(zoo_file).is_relative_to(space_dir) and Path(space_file).is_relative_to(space_dir)
    assert extra == "[]"


# -- the running Space ----------------------------------------------------------------------------
class SpaceApp(LoopbackProcess):
    """``python app.py`` in the built folder, as the Space runs it; ``spaces`` is the stand-in."""

    def __init__(self, space_dir: Path, tmp: Path, **env: str):
        (tmp / "stand-in" / "spaces").mkdir(parents=True, exist_ok=True)
        (tmp / "stand-in" / "spaces" / "__init__.py").write_text(FAKE_SPACES)
        self.cache, self.tmp = tmp / "gradio-cache", tmp / "tmp"
        self.tmp.mkdir(exist_ok=True)
        super().__init__([str(space_dir / "app.py"), "--host", "127.0.0.1", "--port", "{port}"], cwd=space_dir,
                         env={"PYTHONPATH": str(tmp / "stand-in"), "GRADIO_TEMP_DIR": str(self.cache),
                              "TMPDIR": str(self.tmp), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                              "OMNI_ZOO_RANDOM_WEIGHTS": "tiny", "OMNI_ZOO_CACHE_S": str(CACHE_S),
                              "OMNI_ZOO_MODEL": None, **env}, timeout=180)
        self.url += "/"

    def files(self) -> list[Path]:
        """What the page keeps on disk: Gradio's cache and the page's own temporary folders."""
        return [p for root in (self.cache, self.tmp) for p in root.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def mic(tmp_path_factory):
    return fake_mic_wav(tmp_path_factory.mktemp("mic") / "question.wav")


@pytest.fixture(scope="module")
def space(space_dir, tmp_path_factory):
    app = SpaceApp(space_dir, tmp_path_factory.mktemp("run"), OMNI_ZOO_CONCURRENCY="1",
                   OMNI_ZOO_RATE_PER_MINUTE="10", OMNI_ZOO_MAX_REPLY_S=str(MAX_REPLY_S))
    yield app
    app.stop()


def upload(page, path: Path) -> None:
    page.locator("#question button[aria-label='Upload file']").click()
    page.locator("#question input[type=file]").set_input_files(str(path))


def toast(page, words: str, timeout_ms: int = 30000) -> str:
    body = page.locator("[data-testid='toast-body']").filter(has_text=words).first
    try:
        body.wait_for(timeout=timeout_ms)
    except Exception:
        raise AssertionError(f"no message with {words!r} on the page: {page.inner_text('body')[:3000]}") from None
    return body.inner_text()


def test_a_visitor_on_a_phone_asks_and_is_answered_through_the_gpu_decorator(space, mic, tmp_path):
    from webui.space_backend import Settings

    duration = Settings(max_reply_s=MAX_REPLY_S).gpu_duration()
    assert f"spaces.GPU(duration={duration})" in space.output()  # fitted to the page's reply cap
    assert duration == 105
    with browser_page(mic, viewport=PHONE) as page:
        open_page(page, space.url)
        notice = page.locator("#notice")
        assert "RANDOM WEIGHTS (tiny)" in notice.inner_text() and "noise" in notice.inner_text()
        assert notice.evaluate("e => getComputedStyle(e).backgroundColor") not in ("rgba(0, 0, 0, 0)", "transparent")
        page.locator("#about-panel").get_by_text("About this model").click()
        about = page.locator("#about")
        about.wait_for()
        card = zoo.card("mini-omni")
        text = about.inner_text()
        for fact in (card.paper, card.license, "Time to first audio, measured: 247 ms", "no reply yet",
                     "nothing you say is stored", "1 mini-omni reply at a time"):
            assert fact in text, (fact, text)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE[0]  # no sideways scrolling
        box = page.get_by_role("button", name="Record", exact=True).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE[0]
        calls = space.output().count("spaces.GPU call")
        result = talk(page)  # record, the reply plays, then lands with its numbers and waveform
        assert result["text"] not in ("…", "(no text)") and result["audio_s"] > 0
        assert space.output().count("spaces.GPU call") == calls + 1  # the reply ran inside spaces.GPU
        page.wait_for_function("() => /median \\d+ ms over the last 1 replies/.test("
                               "document.querySelector('#about').innerText)", timeout=30000)
        page.locator("#about-panel").get_by_text("About this model").click()  # closed: the page as it opens
        about.wait_for(state="hidden")
        page.evaluate("() => window.scrollTo(0, 0)")
        if SHOTS:
            os.makedirs(SHOTS, exist_ok=True)
            page.screenshot(path=os.path.join(SHOTS, "space-phone.png"), full_page=True)
        page.screenshot(path=str(tmp_path / "space-phone.png"), full_page=True)

        # an uploaded question is deleted once answered; everything else once CACHE_S has passed
        question = tmp_path / "uploaded-question.wav"
        sf.write(question, sf.read(REPO / "demos" / "samples" / "01.wav")[0], 16000)
        count = page.locator(REPLIES).count()
        upload(page, question)
        page.wait_for_function(f"() => document.querySelectorAll({REPLIES!r}).length > {count}", timeout=60000)
        wait_ready(page)
        assert not [p for p in space.files() if p.name == question.name], "the question was kept"
        assert space.files(), "the reply's files are cached while it plays"
    deadline = time.monotonic() + CACHE_S + 15
    while space.files() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not space.files(), f"kept longer than OMNI_ZOO_CACHE_S: {space.files()}"


def test_a_second_visitor_waits_in_the_queue_and_sees_their_place(space, mic):
    """One reply at a time (OMNI_ZOO_CONCURRENCY=1): visitor B's question, sent while A's long
    reply plays, waits with its place shown and is answered only after A's reply ended."""
    with browser_pages(mic, 2) as (a, b):
        for page in (a, b):
            open_page(page, space.url)
        a.locator("#max-tokens input").fill("1000")  # about 85 s of audio: time enough to queue behind it
        a.locator("#max-tokens input").press("Tab")
        calls = len(re.findall(r"spaces\.GPU (call|done)", space.output()))
        record(a, 2.0)
        a.locator("#status").get_by_text("speaking").wait_for(timeout=60000)
        upload(b, REPO / "demos" / "samples" / "02.wav")
        seen_place, b_started, seen = None, None, []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and b_started is None:
            a_status, b_status = a.locator("#status").inner_text(), b.locator("#status").inner_text()
            b_status = re.sub(r"[\d.]+s", "", b_status)  # without the queue's timer
            if not seen or seen[-1][1:] != (a_status, b_status):
                seen.append((round(time.monotonic(), 1), a_status, b_status))
            if re.search(r"thinking|speaking", b_status):
                b_started = time.monotonic()
            elif seen_place is None and "speaking" in a_status:
                shown = b.evaluate("() => document.body.innerText.match(/queue: (\\d+)\\/(\\d+)/)")
                seen_place = shown and shown[0]
            time.sleep(0.1)
        seen = "\n".join(" | ".join(" ".join(str(x).split()) for x in row) for row in seen)
        assert seen_place == "queue: 1/1", seen  # B saw their place while A's reply was being spoken
        assert b_started is not None, seen
        wait_ready(b)
        wait_ready(a)
        assert "first audio after" in b.locator(REPLIES).last.inner_text()
        assert "first audio after" in a.locator(REPLIES).last.inner_text()
    # on the Space's side the two replies ran one after the other, never at once
    order = re.findall(r"spaces\.GPU (call|done)", space.output())[calls:]
    assert order == ["call", "done", "call", "done"], order


def test_questions_over_the_length_or_rate_limit_are_refused_with_a_message(space_dir, mic, tmp_path):
    app = SpaceApp(space_dir, tmp_path, OMNI_ZOO_RATE_PER_MINUTE="2", OMNI_ZOO_MAX_RECORDING_S="4")
    try:
        long_question = tmp_path / "long-question.wav"
        sf.write(long_question, 0.3 * np.sin(np.arange(16000 * 8) * 0.1), 16000)
        short = REPO / "demos" / "samples" / "02.wav"
        with browser_page(mic, viewport=PHONE) as page:
            open_page(page, app.url)
            upload(page, long_question)
            message = toast(page, "this page takes questions up to")
            assert "8 s long" in message and "up to 4 s" in message
            page.wait_for_timeout(1000)
            assert page.locator(REPLIES).count() == 0  # never answered
            assert not [p for p in app.files() if p.name == long_question.name]  # nor kept
            # the recorder stops by itself at the limit: no stop click, yet the question is sent
            page.locator("#question button[aria-label='Clear']").click()
            page.locator("#question button[aria-label='Record audio']").click()
            started = time.monotonic()
            page.get_by_role("button", name="Record", exact=True).click()
            page.wait_for_function(f"() => document.querySelectorAll({REPLIES!r}).length > 0", timeout=60000)
            assert time.monotonic() - started < 30
            wait_ready(page)  # question 1 of 2 this minute
            page.locator("#question button[aria-label='Clear']").click()
            upload(page, short)
            page.wait_for_function(f"() => document.querySelectorAll({REPLIES!r}).length > 1", timeout=60000)
            wait_ready(page)  # question 2 of 2
            page.locator("#question button[aria-label='Clear']").click()
            upload(page, short)
            message = toast(page, "Too many questions")
            assert "at most 2 questions a minute" in message and re.search(r"try again in \d+ s", message)
            page.wait_for_timeout(1500)
            assert page.locator(REPLIES).count() == 2 and "ready" in page.locator("#status").inner_text()
            page.screenshot(path=str(tmp_path / "refused.png"), full_page=True)
        log = app.output()  # Gradio logs each refusal (a gr.Error) with its traceback; nothing else failed
        assert log.count("Traceback") == log.count("gradio.exceptions.Error: "), log[-3000:]
    finally:
        app.stop()


def test_several_models_share_the_page_and_load_on_first_use(space_dir, mic, tmp_path):
    """OMNI_ZOO_MODEL=a,b: the picker offers both, the first is loaded at start, the second when
    first asked (the status says it is loading), and answers as its card says (audio only)."""
    app = SpaceApp(space_dir, tmp_path, OMNI_ZOO_MODEL="mini-omni,hertz-dev")
    try:
        assert "loaded mini-omni" in app.output() and "loaded hertz-dev" not in app.output()
        with browser_page(mic) as page:
            open_page(page, app.url)
            page.wait_for_timeout(1500)  # the page's load events settle (they refresh the picker)
            page.locator("#model input").click()
            options = page.locator("#model").get_by_role("option")
            options.first.wait_for(timeout=10000)
            assert [t.replace("✓", "").strip() for t in options.all_inner_texts()] == ["mini-omni", "hertz-dev"]
            page.locator("#model").get_by_role("option", name="hertz-dev").click()
            page.locator("#facts").get_by_text("hertz-dev").wait_for(timeout=30000)
            page.locator("#about-panel").get_by_text("About this model").click()
            page.locator("#about").get_by_text("Hertz-dev").first.wait_for(timeout=10000)  # follows the picker
            upload(page, REPO / "demos" / "samples" / "02.wav")
            page.locator("#status").get_by_text("loading hertz-dev").wait_for(timeout=60000)
            page.wait_for_function(f"() => document.querySelectorAll({REPLIES!r}).length > 0", timeout=120000)
            text = wait_ready(page)
            assert "(audio only)" in text and "first audio after" in text, text
        assert "loaded hertz-dev" in app.output()
    finally:
        app.stop()
