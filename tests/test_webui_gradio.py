"""The Gradio page in headless Chromium with a fake microphone, asserting what a person sees:
a spoken question gets a reply that plays and lands in the conversation with its text (or
"(audio only)" when the card has no text stream), time to first audio, length and waveform; the
model picker lists what the backend offers; the random-weight notice and reply cap come from the
model; every failure (server down, refusal, a reply cut short) ends as a message in the
conversation with the status back to ready; the live transcript is labelled, in the conversation
column, and scrolls in its panel however long the talk; the program prints its URL and takes the
shared model flags.

``WEBUI_SHOTS=docs/screenshots`` also writes the screenshots committed there."""
import base64
import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from browser import audio_playing, browser_page, fake_mic_wav
from conftest import REPO
from PIL import Image
from procs import LoopbackProcess, free_port
from test_server import Server
from voice_stub import ABORT_REASON, ABORTED, BUSY, CUT, GONE, MODELS, SEEING, VoiceStub

import zoo

SHOTS = os.environ.get("WEBUI_SHOTS")  # also write screenshots there, for people to look at
PAGE_HEIGHT_BOUND = 1400  # px at 1280x900: the page must not grow with the conversation
STATS = re.compile(r"first audio after (\d+) ms · (\d+\.\d) s of audio")
PICTURE = REPO / "demos" / "images" / "red_circle.png"
PICTURE_QUESTION = REPO / "demos" / "images" / "red_circle_question.wav"


class GradioPage(LoopbackProcess):
    """webui/omni_gradio.py on a free port; ``line(pattern)`` waits for a line of its output."""

    def __init__(self, *args, api_url=None):
        super().__init__(["webui/omni_gradio.py", "--port", "{port}", *args],
                         env={"GRADIO_ANALYTICS_ENABLED": "False", "API_URL": api_url})
        self.url += "/"

    def line(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if re.search(pattern, line):
                    return line.strip()
            time.sleep(0.5)
        raise AssertionError(f"no line matching {pattern!r} in the page's output: {self.output().splitlines()}")


@pytest.fixture(scope="module")
def mic(tmp_path_factory):
    return fake_mic_wav(tmp_path_factory.mktemp("mic") / "question.wav")


def open_page(page, url):
    page.goto(url)
    page.get_by_text("omni-zoo voice chat").first.wait_for(timeout=60000)
    page.locator("#model input").first.wait_for(timeout=30000)


def record(page, seconds=2.0) -> float:
    page.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_timeout(int(seconds * 1000))
    page.locator("button.stop-button").first.click()
    return time.monotonic()


REPLIES = "#conversation .bot-row"  # one row per assistant message, with all its parts


def last_reply(page):
    return page.locator(REPLIES).last


def wait_ready(page, timeout_s=120) -> str:
    """The status returns to ready after a reply (finished or failed); returns the last reply's text."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = page.locator("#status").inner_text()
        if status.strip().endswith("ready") and page.locator(REPLIES).count():
            return last_reply(page).inner_text()
        page.wait_for_timeout(200)
    raise AssertionError(f"the page never returned to ready: {page.locator('#status').inner_text()!r}")


def talk(page) -> dict:
    """Record a question; the reply must play, then finish in the conversation with its numbers
    and waveform. Returns what the turn showed."""
    stopped = record(page, 3.0)
    for _ in range(1200):  # up to 60 s
        if audio_playing(page):
            break
        page.wait_for_timeout(50)
    else:
        raise AssertionError("the reply never played")
    stop_to_audio = time.monotonic() - stopped
    text = wait_ready(page)
    stats = STATS.search(text)
    assert stats, f"no time to first audio and length with the turn: {text!r}"
    waveform = last_reply(page).locator('img[src*="waveform-"]')
    waveform.wait_for(timeout=30000)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 100", arg=waveform.element_handle(),
                           timeout=30000)
    return {"stop_to_audio_ms": round(stop_to_audio * 1000), "ttfa_ms": int(stats[1]),
            "audio_s": float(stats[2]), "text": text.split("\n")[0].strip()}


def live_turn(page, model: str) -> dict:
    """The live widget: start, let the fake mic speak and pause; the reply must play through
    WebAudio and appear, labelled, in the live conversation panel."""
    page.get_by_role("button", name="Start live chat").click()
    for _ in range(1200):  # up to 60 s
        current = page.evaluate("() => window.omniLiveStats && window.omniLiveStats.current")
        if current and current.get("firstAudioMs") is not None:
            break
        page.wait_for_timeout(50)
    else:
        raise AssertionError("the live reply never played")
    page.wait_for_timeout(500)
    assert "first audio" in page.locator(".omni-live-status").inner_text()
    transcript = page.locator(".omni-live-transcript")
    assert transcript.get_attribute("aria-label") == "Live conversation"
    assert page.locator(".omni-live-label").inner_text() == "Live conversation"
    assert transcript.locator(".omni-live-you").first.inner_text().startswith("You:")
    reply = transcript.locator(".omni-live-reply").first.inner_text()
    assert reply.startswith(f"{model}:") and len(reply) > len(model) + 2
    page.get_by_role("button", name="Stop live chat").click()
    return {"live_speech_end_to_audio_ms": current["firstAudioMs"]}


def assert_bounded_after_a_long_talk(page):
    """The live transcript sits in the conversation column and scrolls inside its panel: forty
    more turns (copies of the real ones) must not grow the page."""
    column = page.locator("#conversation").locator("xpath=..")
    assert column.locator(".omni-live-transcript").count() == 1  # beside the turn-by-turn conversation
    page.evaluate("""() => {
        const t = document.querySelector('.omni-live-transcript');
        const turn = Array.from(t.children);
        for (let i = 0; i < 40; i++) turn.forEach((line) => t.appendChild(line.cloneNode(true)));
    }""")
    page.wait_for_timeout(300)
    panel = page.evaluate("""() => { const t = document.querySelector('.omni-live-transcript');
                                     return {scroll: t.scrollHeight, client: t.clientHeight}; }""")
    assert panel["scroll"] > 3 * panel["client"], panel  # the long talk is there, scrolling
    height = page.evaluate("() => document.documentElement.scrollHeight")
    assert height < PAGE_HEIGHT_BOUND, f"the page grew to {height} px"


def screenshot(page, tmp_path, name):
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def served_models(url) -> list[dict]:
    return requests.get(url.rstrip("/") + "/v1/models", timeout=10).json()["data"]


def check_model_header(page, entry: dict):
    """The picker shows the model; the header its card facts; the banner its notice; the reply
    cap field the cap requests get by default."""
    assert page.locator("#model input").input_value() == entry["id"]
    facts = page.locator("#facts").inner_text()
    assert entry["id"] in facts and f"{entry['card']['output_sample_rate'] / 1000:g} kHz out" in facts
    if entry["notice"]:
        assert entry["notice"] in page.locator("#notice").inner_text()
    assert page.locator("#max-tokens input").input_value() == str(entry["default_max_new_tokens"] or "")


def test_in_process_page_answers_a_spoken_question(mic, tmp_path):
    ui = GradioPage("--tiny")
    try:
        assert ui.line(r"Running on local URL") == f"* Running on local URL:  http://127.0.0.1:{ui.port}"
        (entry,) = served_models(ui.url)  # in-process: the one loaded model
        assert entry["notice"] and "noise" in entry["notice"]
        with browser_page(mic) as page:
            open_page(page, ui.url)
            check_model_header(page, entry)
            assert picker_options(page) == [entry["id"]]
            result = talk(page)
            assert result["text"] not in ("…", "(no text)")  # a text model's reply has text
            rate = entry["card"]["reply_tokens_per_second"]
            # the default cap (about 4 s for random weights) holds: the reply is not longer
            assert 0 < result["audio_s"] <= entry["default_max_new_tokens"] / rate + 0.5
            assert page.locator("#status").inner_text().strip().endswith("ready")
            screenshot(page, tmp_path, "gradio-turn")
            result.update(live_turn(page, entry["id"]))
            assert_bounded_after_a_long_talk(page)
            screenshot(page, tmp_path, "gradio-live")
        print(json.dumps(result))
    finally:
        ui.stop()


def test_page_through_server_answers_within_the_users_reply_cap(mic, tmp_path):
    server = Server("--max-sessions", "4")
    ui = GradioPage(api_url=server.url)
    try:
        (entry,) = served_models(server.url)
        with browser_page(mic) as page:
            open_page(page, ui.url)
            assert f"server {server.url}" in page.locator("#facts").inner_text()
            check_model_header(page, entry)
            assert entry["card"]["image_input"] is False and not image_input(page).is_visible()
            cap = 20  # short, yet past the audio codebooks' start-up delay
            page.locator("#max-tokens input").fill(str(cap))
            page.locator("#max-tokens input").press("Tab")
            result = talk(page)
            rate = entry["card"]["reply_tokens_per_second"]
            assert 0 < result["audio_s"] <= cap / rate + 0.3, result  # the user's cap, not the default
            assert entry["default_max_new_tokens"] / rate > cap / rate + 1  # ...which would be longer
            result.update(live_turn(page, entry["id"]))
        print(json.dumps(result))
        assert server.metric("zoo_sessions_total") >= 1
    finally:
        ui.stop()
        server.stop()


def test_a_model_without_text_output_reads_audio_only(mic, tmp_path):
    ui = GradioPage("--model", "hertz-dev", "--tiny")
    try:
        (entry,) = served_models(ui.url)
        assert entry["card"]["text_output"] is False
        with browser_page(mic) as page:
            open_page(page, ui.url)
            check_model_header(page, entry)
            assert "speech only" in page.locator("#facts").inner_text()
            result = talk(page)
            assert result["text"] == "(audio only)", result
            assert "…" not in last_reply(page).inner_text()
        print(json.dumps(result))
    finally:
        ui.stop()


def test_failures_end_in_the_conversation_and_the_page_is_ready_again(mic, tmp_path):
    with VoiceStub() as stub:
        ui = GradioPage(api_url=stub.url)
        try:
            with browser_page(mic) as page:
                open_page(page, ui.url)
                assert picker_options(page) == [m["id"] for m in MODELS]
                record(page, 1.5)
                text = wait_ready(page, 60)
                assert "reply failed" in text and "HTTP 503" in text and "all 1 session slots are busy" in text
                assert stub.requests[-1]["model"] == BUSY  # the picker's default
                expected = {
                    ABORTED: [ABORT_REASON, "broke off"],  # the server's reason, after what arrived
                    CUT: ["broke off before it finished"],  # cut without a reason
                    GONE: ["HTTP 404", "not 'stub-gone'"],  # a model the server no longer runs
                }
                for model, words in expected.items():
                    choose(page, model)
                    entry = next(m for m in MODELS if m["id"] == model)
                    check_model_header(page, entry)
                    count = page.locator(REPLIES).count()
                    page.get_by_role("button", name="Send again").click()
                    page.wait_for_function(f"() => document.querySelectorAll({REPLIES!r}).length > {count}")
                    text = wait_ready(page, 60)
                    assert "reply failed" in text and all(w in text for w in words), (model, text)
                    assert not STATS.search(text), text  # a cut reply never looks finished
                    assert stub.requests[-1]["model"] == model
                assert "Traceback" not in page.inner_text("body")
                screenshot(page, tmp_path, "gradio-error")
        finally:
            ui.stop()


def picker_options(page) -> list[str]:
    """The model picker's entries, as its open list shows them (the chosen one has a tick)."""
    page.locator("#model input").click()
    options = page.locator("#model").get_by_role("option")
    options.first.wait_for(timeout=10000)
    names = [text.replace("✓", "").strip() for text in options.all_inner_texts()]
    page.keyboard.press("Escape")
    return names


def choose(page, model):
    page.locator("#model input").click()
    page.locator("#model").get_by_role("option", name=model).click()
    page.locator("#facts").get_by_text(model).wait_for(timeout=30000)


def test_unreachable_server_is_a_reply_error_and_the_page_prints_its_urls(mic, tmp_path):
    ui = GradioPage("--share", api_url=f"http://127.0.0.1:{free_port()}")
    try:
        assert ui.line(r"Running on local URL") == f"* Running on local URL:  http://127.0.0.1:{ui.port}"
        # the share tunnel needs the internet, which the tests do not have: it must say so, once
        assert re.match(r"\* (Running on public URL: https://|Could not create a share link)",
                        ui.line(r"public URL|share link", timeout=90))
        with browser_page(mic) as page:
            open_page(page, ui.url)
            facts = page.locator("#facts").inner_text()
            assert "cannot reach the voice server" in facts and "python server.py" in facts
            record(page, 1.5)
            text = wait_ready(page, 60)
            assert "reply failed" in text and "cannot reach the voice server" in text
            assert "Traceback" not in page.inner_text("body")
        busy = subprocess.run([sys.executable, "webui/omni_gradio.py", "--port", str(ui.port)], cwd=REPO,
                              env={**os.environ, "API_URL": "http://127.0.0.1:9"}, capture_output=True, text=True,
                              timeout=120)
        assert busy.returncode == 2 and busy.stdout == ""
        assert busy.stderr.strip().count("\n") == 0 and "is another program using that port" in busy.stderr
    finally:
        ui.stop()


def test_the_page_takes_the_shared_model_flags(tmp_path):
    """--checkpoint (a component flag from the card) is accepted: a missing folder is the model's
    own clear error, not argparse's "unrecognized arguments"."""
    missing = tmp_path / "no-such-checkpoint"
    run = subprocess.run([sys.executable, "webui/omni_gradio.py", "--checkpoint", str(missing), "--port",
                          str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "API_URL": ""})
    assert run.returncode == 2, run.stderr
    assert "unrecognized" not in run.stderr and str(missing) in run.stderr and "--checkpoint" in run.stderr
    helped = subprocess.run([sys.executable, "webui/omni_gradio.py", "--model", "hertz-dev", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    components = [f"--{c.replace('_', '-')}" for c in zoo.card("hertz-dev").components]
    assert components and all(flag in helped.stdout for flag in components)  # the card's parts, not mini-omni's
    assert all(flag in helped.stdout for flag in ("--tiny", "--random-full", "--dtype", "--share", "--port"))


def image_input(page):
    return page.locator("#image")


def attach_image(page, path=PICTURE):
    """Upload an image into the page's image input (its file chooser)."""
    image_input(page).locator("input[type=file]").set_input_files(str(path))
    image_input(page).locator("img[src]").first.wait_for(timeout=30000)  # the preview


def asked_images(page):
    """The images shown in the user's turns of the conversation."""
    return page.locator("#conversation .user-row img")


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def send_again(page) -> str:
    count = page.locator(REPLIES).count()
    page.get_by_role("button", name="Send again").click()
    page.wait_for_function(f"() => document.querySelectorAll({REPLIES!r}).length > {count}")
    return wait_ready(page, 60)


def test_the_image_input_follows_the_chosen_models_card(mic, tmp_path):
    """Shown only while the chosen model's card says image_input, with both sources (a file, the
    webcam); the image goes with the question in /chat's image field and shows in the user's
    turn; switching to a model without image input hides and empties it, and nothing is sent."""
    with VoiceStub() as stub:
        ui = GradioPage(api_url=stub.url)
        try:
            with browser_page(mic) as page:
                open_page(page, ui.url)
                assert not image_input(page).is_visible()  # the default model takes no image
                record(page, 1.5)
                wait_ready(page, 60)
                assert "image" not in stub.requests[-1]
                choose(page, SEEING)
                image_input(page).wait_for(state="visible", timeout=10000)
                assert "takes an image" in page.locator("#facts").inner_text()
                for source in ("Upload file", "Capture from camera"):
                    assert image_input(page).get_by_role("button", name=source).is_visible()
                attach_image(page)
                send_again(page)
                body = stub.requests[-1]
                assert body["model"] == SEEING
                assert np.array_equal(pixels(base64.b64decode(body["image"])), pixels(PICTURE.read_bytes()))
                assert asked_images(page).count() == 1

                choose(page, CUT)  # no image input: hidden, emptied, nothing sent along
                image_input(page).wait_for(state="hidden", timeout=10000)
                send_again(page)
                assert stub.requests[-1]["model"] == CUT and "image" not in stub.requests[-1]

                choose(page, SEEING)  # back: the input is there again, empty; now the webcam (fake camera)
                image_input(page).wait_for(state="visible", timeout=10000)
                assert image_input(page).locator("img[src]").count() == 0
                image_input(page).get_by_role("button", name="Capture from camera").click()
                image_input(page).get_by_text("Click to Access Webcam").click()
                page.wait_for_function("() => { const v = document.querySelector('#image video');"
                                       " return v && v.readyState >= 2 && v.videoWidth > 0; }", timeout=30000)
                image_input(page).get_by_role("button", name="capture photo").click()
                image_input(page).locator("img[src]").first.wait_for(timeout=30000)
                page.wait_for_timeout(500)  # the capture is uploaded
                send_again(page)
                body = stub.requests[-1]
                assert body["model"] == SEEING and pixels(base64.b64decode(body["image"])).shape[0] > 100
                assert asked_images(page).count() == 2
                assert "Traceback" not in page.inner_text("body")
        finally:
            ui.stop()


def test_mini_omni2_answers_a_spoken_question_about_an_image(tmp_path):
    """server.py --model mini-omni2 --tiny behind the page: the image input is there (and not for
    Mini-Omni, whose card takes no image: test_page_through_server_...), the exchange with an
    image completes (reply played, numbers, waveform) and the image shows in the user's turn."""
    mic = fake_mic_wav(tmp_path / "question.wav", "What color is the circle?")
    server = Server("--model", "mini-omni2", "--max-sessions", "2")
    ui = GradioPage(api_url=server.url)
    try:
        (entry,) = served_models(server.url)
        assert entry["card"]["image_input"] is True
        with browser_page(mic) as page:
            open_page(page, ui.url)
            check_model_header(page, entry)
            image_input(page).wait_for(state="visible", timeout=10000)
            attach_image(page)
            result = talk(page)
            assert result["text"] not in ("…", "(no text)")
            shown = asked_images(page)
            assert shown.count() == 1
            page.wait_for_function("(img) => img.complete && img.naturalWidth > 100", arg=shown.element_handle(),
                                   timeout=30000)
            assert "(spoken question)" in page.locator("#conversation .user-row").first.inner_text()
            # the conversation scrolls to the reply's end; the picture shows the question's image too
            page.locator("#conversation .bubble-wrap").evaluate("panel => { panel.scrollTop = 0; }")
            page.wait_for_timeout(300)
            screenshot(page, tmp_path, "gradio-image-turn")
        assert server.metric("zoo_sessions_total") >= 1
        print(json.dumps(result))
    finally:
        ui.stop()
        server.stop()
