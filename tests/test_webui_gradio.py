"""The Gradio page in headless Chromium with a fake microphone: record a spoken question, stop,
and the reply must play (the audio clock advances) with its transcript, in-process and through
server.py; an unreachable server gives a clear message, not a traceback."""
import json
import os
import shutil
import time

import pytest
from browser import audio_playing, browser_page, fake_mic_wav
from procs import LoopbackProcess, free_port
from test_server import Server

SHOTS = os.environ.get("WEBUI_SHOTS")  # also copy screenshots there, for people to look at


class GradioPage(LoopbackProcess):
    def __init__(self, *args, api_url=None):
        super().__init__(["webui/omni_gradio.py", "--port", "{port}", *args],
                         env={"GRADIO_ANALYTICS_ENABLED": "False", "API_URL": api_url})
        self.url += "/"


@pytest.fixture(scope="module")
def mic(tmp_path_factory):
    return fake_mic_wav(tmp_path_factory.mktemp("mic") / "question.wav")


def open_page(page, url):
    page.goto(url)
    page.get_by_text("omni-zoo voice chat").first.wait_for(timeout=60000)


def talk(page, seconds=3.0) -> float:
    """Record ``seconds`` from the fake mic, stop; returns seconds from stop to reply playback."""
    page.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_timeout(int(seconds * 1000))
    page.locator("button.stop-button").first.click()
    stopped = time.monotonic()
    for _ in range(1200):  # up to 60 s
        if audio_playing(page):
            return time.monotonic() - stopped
        page.wait_for_timeout(50)
    raise AssertionError("the reply never played")


def live_turn(page) -> dict:
    """The live widget: start, let the fake mic speak and pause; the reply must start playing
    through WebAudio. Returns the widget's own measurement (speech end -> first audio)."""
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
    assert page.locator(".omni-live-transcript").inner_text().strip()  # its transcript
    page.get_by_role("button", name="Stop live chat").click()
    return {"live_speech_end_to_audio_ms": current["firstAudioMs"]}


def check_turn(page, tmp_path, name) -> dict:
    stop_to_audio = talk(page)
    page.wait_for_timeout(1500)
    status = page.locator("#status").inner_text()
    assert "TTFA" in status and "mini-omni" in status
    body = page.inner_text("body")
    assert "spoken question" in body and len(body.split("spoken question", 1)[1].split()) > 4  # transcript
    assert "Random weights" in page.inner_text("body")
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        shutil.copy(shot, os.path.join(SHOTS, shot.name))
    return {"stop_to_audio_ms": round(stop_to_audio * 1000), "status": status}


def test_in_process_page_answers_a_spoken_question(mic, tmp_path):
    ui = GradioPage("--tiny")
    try:
        with browser_page(mic) as page:
            open_page(page, ui.url)
            result = check_turn(page, tmp_path, "gradio_in_process")
            result.update(live_turn(page))
            page.screenshot(path=str(tmp_path / "gradio_in_process_live.png"), full_page=True)
        print(json.dumps(result))
    finally:
        ui.stop()


def test_page_through_server_answers_a_spoken_question(mic, tmp_path):
    server = Server("--max-sessions", "4")
    ui = GradioPage(api_url=server.url)
    try:
        with browser_page(mic) as page:
            open_page(page, ui.url)
            assert f"server {server.url}" in page.inner_text("body")
            result = check_turn(page, tmp_path, "gradio_server")
            result.update(live_turn(page))
        print(json.dumps(result))
        assert server.metric("zoo_sessions_total") >= 1
    finally:
        ui.stop()
        server.stop()


def test_unreachable_server_is_a_clear_message(mic, tmp_path):
    ui = GradioPage(api_url=f"http://127.0.0.1:{free_port()}")
    try:
        with browser_page(mic) as page:
            open_page(page, ui.url)
            body = page.inner_text("body")
            assert "cannot reach the voice server" in body and "python server.py" in body
            page.get_by_role("button", name="Record", exact=True).click()
            page.wait_for_timeout(1500)
            page.locator("button.stop-button").first.click()
            page.get_by_text("not reachable").first.wait_for(timeout=30000)
            assert "Traceback" not in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "gradio_server_down.png"), full_page=True)
    finally:
        ui.stop()


def test_server_refusal_shows_its_message(mic, tmp_path):
    import threading
    from http.server import ThreadingHTTPServer

    from test_webui_streamlit import BusyStub

    stub = ThreadingHTTPServer(("127.0.0.1", 0), BusyStub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    ui = GradioPage(api_url=f"http://127.0.0.1:{stub.server_address[1]}")
    try:
        with browser_page(mic) as page:
            open_page(page, ui.url)
            assert "stub-omni" in page.inner_text("body")
            page.get_by_role("button", name="Record", exact=True).click()
            page.wait_for_timeout(1500)
            page.locator("button.stop-button").first.click()
            page.get_by_text("all 1 session slots are busy").first.wait_for(timeout=30000)
            assert "HTTP 503" in page.inner_text("body") and "Traceback" not in page.inner_text("body")
    finally:
        ui.stop()
        stub.shutdown()
        stub.server_close()
