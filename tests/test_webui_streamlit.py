"""The Streamlit UI (webui/omni_streamlit.py) in a real browser: headless Chromium with a fake
microphone, a real `streamlit run` process, and a real server.py (tiny models) or a stub."""
import base64
import os
import shutil
import subprocess
import sys
import time

import requests
from browser import _loopback as loopback
from browser import browser_page, fake_mic_wav
from busy_stub import BusyStub  # noqa: F401 - test_webui_gradio imports it from here
from conftest import REPO
from playwright.sync_api import expect
from procs import LoopbackProcess, free_port
from realtime_stub import RealtimeStub
from test_server import Server

SHOTS = REPO / "docs" / "screenshots"
UPDATE_SHOTS = os.environ.get("UPDATE_SCREENSHOTS")  # set: the committed screenshots are replaced
STREAMED_TOKENS = 150  # ~11 s of the tiny Mini-Omni's audio: long enough to hear it stream
LONG_TOKENS = 2000  # a reply that is still running when the test kills the server
PICTURE = REPO / "demos" / "images" / "red_circle.png"


class StreamlitApp(LoopbackProcess):
    """`streamlit run webui/omni_streamlit.py` on a free loopback port, from the repository root
    (so it reads the repository's .streamlit/config.toml, as a person's run does)."""

    def __init__(self, api_url: str, **env):
        super().__init__(["-m", "streamlit", "run", "webui/omni_streamlit.py", "--server.port", "{port}",
                          "--server.address", "127.0.0.1", "--server.headless", "true"],
                         health="/_stcore/health", timeout=60,
                         env={"API_URL": api_url, "OMNI_MAX_TOKENS": None, **env})


def record(page, seconds: float = 2.0) -> float:
    """Click the audio_input's record button, speak (the fake mic), stop; returns when stopped."""
    mic = page.get_by_test_id("stAudioInput")
    mic.get_by_role("button", name="Record", exact=True).click()
    mic.get_by_role("button", name="Stop recording", exact=True).wait_for(timeout=10_000)
    page.wait_for_timeout(seconds * 1000)
    mic.get_by_role("button", name="Stop recording", exact=True).click()
    return time.monotonic()


def reply_stats(page, timeout: float = 120, until=lambda stats: stats["status"] in ("completed", "failed"),
                turn: str | None = None) -> dict:
    """The reply player's stats (webui/static/reply.js) once ``until`` holds for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in page.frames:
            if "omni_reply" not in frame.url:
                continue
            try:
                stats = frame.evaluate("() => window.omniReplyStats || null")
            except Exception:  # noqa: BLE001 - a player being replaced by the next turn's
                continue
            if stats and stats["turn"] and stats["turn"] != turn and until(stats):
                return stats
        page.wait_for_timeout(50)
    raise AssertionError("the reply player never got there")


def assistant_messages(page):
    return page.get_by_test_id("stChatMessage").filter(has=page.get_by_test_id("stChatMessageAvatarAssistant"))


def picker(page):
    """The sidebar's model picker (a combobox whose value is the chosen model)."""
    return page.get_by_test_id("stSidebar").get_by_role("combobox", name="Model")


def set_reply_cap(page, tokens: int) -> None:
    box = page.get_by_test_id("stSidebar").get_by_label("Reply cap (max tokens)", exact=True)
    box.fill(str(tokens))
    box.press("Enter")
    page.wait_for_timeout(1000)  # the rerun that takes the new value


def mic_ready(page) -> bool:
    return page.get_by_test_id("stAudioInput").get_by_role("button", name="Record", exact=True).is_enabled()


def assert_no_traceback(page):
    assert "Traceback" not in page.inner_text("body")
    assert page.get_by_test_id("stException").count() == 0


def screenshot(page, tmp_path, name: str) -> None:
    shot = tmp_path / name
    page.screenshot(path=str(shot))  # the desktop viewport, as a person sees it
    if UPDATE_SHOTS:
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SHOTS / name)


def live_turn(page) -> int:
    """The live widget in its component iframe: start it; the fake mic speaks and pauses; the
    reply must play through WebAudio. Returns the widget's speech end -> first audio (ms)."""
    page.frame_locator("iframe").first.get_by_role("button", name="Start live chat").click()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for frame in page.frames:
            current = frame.evaluate("() => window.omniLiveStats ? window.omniLiveStats.current || null : null")
            if current and current.get("firstAudioMs") is not None:
                assert frame.locator(".omni-live-transcript").inner_text().strip()
                frame.get_by_role("button", name="Stop live chat").click()
                return current["firstAudioMs"]
        page.wait_for_timeout(50)
    raise AssertionError("the live reply never played")


def test_reply_plays_while_it_streams_and_a_broken_reply_says_so(tmp_path):
    wav = fake_mic_wav(tmp_path / "q.wav")
    server = Server("--max-sessions", "4")
    try:
        offered = requests.get(server.url + "/v1/models", timeout=5).json()["data"][0]
        with StreamlitApp(server.url) as app, browser_page(wav) as page:
            outside = []  # requests that would leave this machine (the browser blocks them)
            page.on("request", lambda r: outside.append(r.url) if not loopback(r.url) else None)
            # home page at /, linking to the chat page at /chat
            page.goto(app.url + "/")
            page.get_by_role("heading", name="omni-zoo").wait_for(timeout=30_000)
            page.get_by_role("link", name="Open the voice chat").click()
            page.wait_for_url(app.url + "/chat", timeout=15_000)

            # the picker offers the server's model; the server's notice is the page's warning
            sidebar = page.get_by_test_id("stSidebar")
            expect(picker(page)).to_have_value("mini-omni", timeout=30_000)
            page.get_by_test_id("stAudioInput").wait_for(timeout=15_000)
            assert offered["card"]["image_input"] is False and image_upload(page).count() == 0
            page.get_by_test_id("stAlertContentWarning").get_by_text(offered["notice"]).wait_for(timeout=5_000)
            cap = sidebar.get_by_label("Reply cap (max tokens)", exact=True)
            assert cap.input_value() == str(offered["default_max_new_tokens"])  # the server's cap, overridable
            set_reply_cap(page, STREAMED_TOKENS)

            stopped = record(page)
            reply_stats(page, until=lambda s: s["firstAudioMs"] is not None)
            stop_to_audio_ms = (time.monotonic() - stopped) * 1000  # upload, rerun, player, request
            stats = reply_stats(page)
            print(f"streamed reply: first audio {stats['firstAudioMs']} ms after the request "
                  f"({stop_to_audio_ms:.0f} ms after the recording stopped; the player sent the request "
                  f"{stats['sentMs']} ms after it was created), last byte {stats['endMs']} ms after the request, "
                  f"{stats['chunks']} chunks")
            assert stats["status"] == "completed", stats
            assert stats["firstAudioMs"] is not None and stats["playingBeforeEnd"], stats
            assert stats["firstAudioMs"] < stats["endMs"], stats  # heard before the reply was all there

            turn = assistant_messages(page).last
            turn.get_by_text("time to first audio").wait_for(timeout=15_000)
            caption = turn.get_by_text("time to first audio").inner_text()
            assert f"time to first audio {stats['firstAudioMs']} ms" in caption, caption
            seconds = float(caption.split(" · ")[-1].split(" s of audio")[0])
            assert 5 < seconds < 20, caption  # ~150 tokens of the tiny model's audio
            turn.get_by_alt_text("waveform of the reply").wait_for(timeout=15_000)
            turn.locator("audio").wait_for(timeout=15_000)  # to hear it again
            text = turn.get_by_test_id("stMarkdownContainer").first.inner_text().strip()
            assert text and text not in ("(no text)", "(audio only)")
            assert_no_traceback(page)
            # the whole page on a tall desktop screen: the notice, the picker and the finished turn
            page.set_viewport_size({"width": 1280, "height": 1500})
            page.get_by_role("heading", name="Voice chat").scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            screenshot(page, tmp_path, "streamlit-turn.png")
            page.set_viewport_size({"width": 1280, "height": 900})

            live_ms = live_turn(page)  # the live widget (server VAD) on the same page
            print(f"live widget: speech end -> reply audio playing: {live_ms} ms")
            assert outside == []

            # a reply cut off mid-stream (the server dies) says so and the page is ready again
            set_reply_cap(page, LONG_TOKENS)
            record(page)
            reply_stats(page, until=lambda s: s["firstAudioMs"] is not None, turn=stats["turn"])
            server.proc.kill()
            broken = reply_stats(page, turn=stats["turn"])
            assert broken["status"] == "failed" and "closed before the reply finished" in broken["error"], broken
            turn = assistant_messages(page).last
            turn.get_by_test_id("stAlertContentError").wait_for(timeout=15_000)
            assert "closed before the reply finished" in turn.get_by_test_id("stAlertContentError").inner_text()
            assert "incomplete:" in turn.inner_text() and "time to first audio" not in turn.inner_text()
            assert assistant_messages(page).count() == 2
            assert mic_ready(page)
            assert_no_traceback(page)
            page.get_by_test_id("stAlertContentWarning").get_by_text("cannot reach the voice server").wait_for()
            page.wait_for_timeout(1000)
            # the rerun that noticed the server gone kept the broken turn's player: it did not ask again
            assert reply_stats(page, turn=stats["turn"])["error"] == broken["error"]
            turn.evaluate("message => message.scrollIntoView({block: 'start'})")
            screenshot(page, tmp_path, "streamlit-error.png")

            # the server is gone now: the next question says so in the conversation
            record(page, seconds=1.0)
            gone = reply_stats(page, turn=broken["turn"])
            assert gone["status"] == "failed" and "cannot reach the voice server" in gone["error"], gone
            assistant_messages(page).nth(2).get_by_text("cannot reach the voice server").wait_for(timeout=15_000)
            assert mic_ready(page)
    finally:
        server.stop()


def test_server_down_shows_an_error(tmp_path):
    wav = fake_mic_wav(tmp_path / "q.wav")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with StreamlitApp(down) as app, browser_page(wav) as page:
        outside = []  # requests that would leave this machine (the browser blocks them)
        page.on("request", lambda r: outside.append(r.url) if not loopback(r.url) else None)
        page.goto(app.url + "/chat")
        error = page.get_by_test_id("stAlertContentError")
        error.wait_for(timeout=30_000)
        assert "cannot reach the voice server" in error.inner_text() and down in error.inner_text()
        assert page.get_by_text("python server.py").first.is_visible()  # the hint
        assert_no_traceback(page)
        page.wait_for_timeout(2000)  # Streamlit reports usage statistics (if on) soon after the page loads
        assert outside == []  # no usage statistics (.streamlit/config.toml), no fonts from elsewhere


def test_model_picker_refusal_and_audio_only_replies(tmp_path):
    """Several models offered: the picker lists them, the chosen one's card is shown and asked
    for; a refused turn says why in the conversation and the next turn works; a model whose card
    has no text stream shows "(audio only)". The API key reaches the server from the page."""
    wav = fake_mic_wav(tmp_path / "q.wav")
    stub = RealtimeStub([("stub-talker", True), ("stub-hum", False)], api_key="s3cret")
    try:
        # the page's Python side and the browser reach the server by different names (as in
        # docker/compose.yaml): the player connects to the browser's
        python_url = stub.url.replace("127.0.0.1", "localhost")
        with StreamlitApp(python_url, BROWSER_API_URL=stub.url, OMNI_ZOO_API_KEY="s3cret") as app, \
                browser_page(wav) as page:
            page.goto(app.url + "/chat")
            sidebar = page.get_by_test_id("stSidebar")
            expect(picker(page)).to_have_value("stub-talker", timeout=30_000)
            assert "speech and text out" in sidebar.inner_text()
            assert page.get_by_test_id("stAlertContentWarning").count() == 0  # published weights: no notice
            picker(page).click()
            options = page.get_by_role("option")
            assert [options.nth(i).inner_text() for i in range(options.count())] == ["stub-talker", "stub-hum"]
            page.get_by_role("option", name="stub-hum").click()
            sidebar.get_by_text("audio only (no text)").wait_for(timeout=15_000)
            page.get_by_text("Model: stub-hum").wait_for(timeout=5_000)

            stub.replies = ["busy", "ok"]
            record(page, seconds=1.0)
            refused = reply_stats(page, timeout=60)
            assert refused["status"] == "failed" and "all 1 session slots are busy" in refused["error"], refused
            turn = assistant_messages(page).last
            turn.get_by_test_id("stAlertContentError").get_by_text("all 1 session slots are busy").wait_for(timeout=15_000)
            assert mic_ready(page)

            record(page, seconds=1.0)
            done = reply_stats(page, timeout=60, turn=refused["turn"])
            assert done["status"] == "completed", done
            turn = assistant_messages(page).last
            turn.get_by_text("time to first audio").wait_for(timeout=15_000)
            assert turn.get_by_test_id("stMarkdownContainer").first.inner_text().strip() == "(audio only)"
            assert [s["model"] for s in stub.sessions] == ["stub-hum", "stub-hum"]
            assert all(s["key"] == "s3cret" for s in stub.sessions)
            assert all(s["host"] == f"127.0.0.1:{stub.port}" for s in stub.sessions)
            assert_no_traceback(page)
    finally:
        stub.stop()


def test_hertz_dev_replies_are_audio_only(tmp_path):
    """A real server with a model whose card has no text stream, behind an API key."""
    wav = fake_mic_wav(tmp_path / "q.wav")
    server = Server("--model", "hertz-dev", "--max-sessions", "2", "--api-key", "k3y")
    try:
        with StreamlitApp(server.url, OMNI_ZOO_API_KEY="k3y") as app, browser_page(wav) as page:
            page.goto(app.url + "/chat")
            expect(picker(page)).to_have_value("hertz-dev", timeout=30_000)
            record(page, seconds=1.5)
            stats = reply_stats(page, timeout=120)
            assert stats["status"] == "completed", stats
            turn = assistant_messages(page).last
            turn.get_by_text("time to first audio").wait_for(timeout=15_000)
            assert turn.get_by_test_id("stMarkdownContainer").first.inner_text().strip() == "(audio only)"
            assert_no_traceback(page)
    finally:
        server.stop()


def test_usage_statistics_are_off_for_a_run_from_the_repository_root():
    probe = "from streamlit import config; print(config.get_option('browser.gatherUsageStats'))"
    here = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert here.stdout.strip() == "False"


def image_upload(page):
    return page.get_by_test_id("stFileUploader")


def attach_image(page, path=PICTURE) -> None:
    """Choose an image file in the page's image upload; returns once the page has it."""
    image_upload(page).locator("input[type=file]").set_input_files(str(path))
    image_upload(page).get_by_text(path.name).wait_for(timeout=15_000)
    page.wait_for_timeout(1000)  # the rerun that takes the file


def user_messages(page):
    return page.get_by_test_id("stChatMessage").filter(has=page.get_by_test_id("stChatMessageAvatarUser"))


def choose(page, model: str) -> None:
    picker(page).click()
    page.get_by_role("option", name=model).click()
    page.get_by_text(f"Model: {model}").wait_for(timeout=15_000)


def test_the_image_upload_follows_the_card_and_goes_with_the_question(tmp_path):
    """Only a model whose card says image_input gets the upload; the image goes with the recorded
    question (conversation.item.create with an input_image before the audio) and shows in the
    turn; a model without image input has no upload and is sent none."""
    wav = fake_mic_wav(tmp_path / "q.wav")
    stub = RealtimeStub([("stub-talker", True), ("stub-seeing", True, True)], api_key="k3y")
    try:
        with StreamlitApp(stub.url, OMNI_ZOO_API_KEY="k3y") as app, browser_page(wav) as page:
            page.goto(app.url + "/chat")
            expect(picker(page)).to_have_value("stub-talker", timeout=30_000)
            page.get_by_test_id("stAudioInput").wait_for(timeout=15_000)
            assert image_upload(page).count() == 0
            choose(page, "stub-seeing")
            image_upload(page).wait_for(timeout=15_000)
            assert "takes an image with the question" in page.get_by_test_id("stSidebar").inner_text()
            attach_image(page)
            record(page, seconds=1.0)
            done = reply_stats(page, timeout=60)
            assert done["status"] == "completed", done
            assert stub.sessions[-1]["model"] == "stub-seeing"
            assert stub.sessions[-1]["images"] == ["data:image/png;base64," + base64.b64encode(PICTURE.read_bytes()).decode()]
            shown = user_messages(page).last.get_by_role("img")
            shown.wait_for(timeout=15_000)
            assert user_messages(page).last.get_by_text("the image the question is about").is_visible()

            choose(page, "stub-talker")  # no image input: no upload, nothing sent
            page.get_by_test_id("stAudioInput").wait_for(timeout=15_000)
            assert image_upload(page).count() == 0
            record(page, seconds=1.0)
            again = reply_stats(page, timeout=60, turn=done["turn"])
            assert again["status"] == "completed", again
            assert stub.sessions[-1]["model"] == "stub-talker" and stub.sessions[-1]["images"] == []
            assert user_messages(page).count() == 2 and user_messages(page).last.get_by_role("img").count() == 0
            assert_no_traceback(page)
    finally:
        stub.stop()


def test_mini_omni2_answers_a_spoken_question_about_an_image(tmp_path):
    """server.py --model mini-omni2 --tiny: the upload is there, the exchange with an image
    completes (played while it streamed, its record) and the image shows in the user's turn."""
    wav = fake_mic_wav(tmp_path / "q.wav", "What color is the circle?")
    server = Server("--model", "mini-omni2", "--max-sessions", "2")
    try:
        offered = requests.get(server.url + "/v1/models", timeout=5).json()["data"][0]
        assert offered["card"]["image_input"] is True
        with StreamlitApp(server.url) as app, browser_page(wav) as page:
            page.goto(app.url + "/chat")
            expect(picker(page)).to_have_value("mini-omni2", timeout=30_000)
            image_upload(page).wait_for(timeout=15_000)
            attach_image(page)
            record(page)
            stats = reply_stats(page)
            assert stats["status"] == "completed" and stats["firstAudioMs"] is not None, stats
            turn = assistant_messages(page).last
            turn.get_by_text("time to first audio").wait_for(timeout=15_000)
            turn.get_by_alt_text("waveform of the reply").wait_for(timeout=15_000)
            text = turn.get_by_test_id("stMarkdownContainer").first.inner_text().strip()
            assert text and text not in ("(no text)", "(audio only)")
            shown = user_messages(page).last.get_by_role("img")
            shown.wait_for(timeout=15_000)
            page.wait_for_function("(img) => img.complete && img.naturalWidth > 100", arg=shown.element_handle(),
                                   timeout=15_000)
            assert server.metric("zoo_sessions_total") >= 1
            assert_no_traceback(page)
            page.set_viewport_size({"width": 1280, "height": 1500})
            page.get_by_role("heading", name="Voice chat").scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            screenshot(page, tmp_path, "streamlit-image-turn.png")
            print(f"image turn: first audio {stats['firstAudioMs']} ms after the request, {stats['chunks']} chunks")
    finally:
        server.stop()
