"""The Streamlit UI (webui/omni_streamlit.py) in a real browser: headless Chromium with a fake
microphone, a real `streamlit run` process, and a real server.py (tiny model) or a stub."""
import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from browser import audio_playing, browser_page, fake_mic_wav
from procs import LoopbackProcess, free_port
from test_server import Server

SHOTS = os.environ.get("WEBUI_SHOTS")  # also copy screenshots there, for people to look at
REPLY_TOKENS = 60  # a 4.5 s reply from the tiny model (its default reply is minutes of noise)
REPLY_AUDIO = "[data-testid=stChatMessage] audio"


class StreamlitApp(LoopbackProcess):
    """`streamlit run webui/omni_streamlit.py` on a free loopback port."""

    def __init__(self, api_url: str):
        super().__init__(["-m", "streamlit", "run", "webui/omni_streamlit.py", "--server.port", "{port}",
                          "--server.address", "127.0.0.1", "--server.headless", "true",
                          "--browser.gatherUsageStats", "false"],
                         health="/_stcore/health", timeout=60,
                         env={"API_URL": api_url, "OMNI_MAX_TOKENS": str(REPLY_TOKENS)})


def record(page, seconds: float = 3.0) -> float:
    """Click the audio_input's record button, speak (the fake mic), stop; returns when stopped."""
    mic = page.get_by_test_id("stAudioInput")
    mic.get_by_role("button", name="Record", exact=True).click()
    mic.get_by_role("button", name="Stop recording", exact=True).wait_for(timeout=10_000)
    page.wait_for_timeout(seconds * 1000)
    mic.get_by_role("button", name="Stop recording", exact=True).click()
    return time.monotonic()


def assert_no_traceback(page):
    assert "Traceback" not in page.inner_text("body")
    assert page.get_by_test_id("stException").count() == 0


def live_turn(page) -> int:
    """The live widget in its component iframe: start it; the fake mic speaks and pauses; the
    reply must play through WebAudio. Returns the widget's speech end -> first audio (ms)."""
    page.frame_locator("iframe").first.get_by_role("button", name="Start live chat").click()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for frame in page.frames:
            current = frame.evaluate("() => window.omniLiveStats ? window.omniLiveStats.current || null : null")
            if current and current.get("firstAudioMs") is not None:
                assert frame.locator(".omni-live-transcript").inner_text().strip()
                frame.get_by_role("button", name="Stop live chat").click()
                return current["firstAudioMs"]
        page.wait_for_timeout(50)
    raise AssertionError("the live reply never played")


def test_voice_turn_plays_the_reply(tmp_path):
    wav = fake_mic_wav(tmp_path / "q.wav")
    server = Server("--max-sessions", "4")
    try:
        with StreamlitApp(server.url) as app, browser_page(wav) as page:
            # home page at /, linking to the chat page at /chat
            page.goto(app.url + "/")
            page.get_by_role("heading", name="omni-zoo").wait_for(timeout=30_000)
            page.get_by_role("link", name="Open the voice chat").click()
            page.wait_for_url(app.url + "/chat", timeout=15_000)

            page.goto(app.url + "/chat")
            page.get_by_text("mini-omni", exact=True).wait_for(timeout=30_000)
            page.get_by_text("random weights: replies are noise").wait_for(timeout=5_000)

            stopped = record(page)
            deadline = stopped + 90
            while not audio_playing(page, REPLY_AUDIO):
                assert time.monotonic() < deadline, "the reply audio never started playing"
                page.wait_for_timeout(50)
            stop_to_audio_ms = (time.monotonic() - stopped) * 1000
            print(f"stop -> reply audio playing: {stop_to_audio_ms:.0f} ms")

            assistant = page.get_by_test_id("stChatMessage").filter(has=page.get_by_test_id("stChatMessageAvatarAssistant"))
            assert assistant.count() == 1
            assistant.get_by_text("TTFA").wait_for(timeout=5_000)
            caption = assistant.get_by_text("TTFA").inner_text()
            assert caption.startswith("TTFA ") and " ms" in caption, caption
            reply_text = assistant.get_by_test_id("stMarkdownContainer").first.inner_text()
            assert reply_text.strip() and reply_text != "(no text)"
            user = page.get_by_test_id("stChatMessage").filter(has=page.get_by_test_id("stChatMessageAvatarUser"))
            assert user.get_by_text("(spoken question)").is_visible() and user.locator("audio").count() == 1
            assert_no_traceback(page)

            page.wait_for_timeout(500)
            shot = tmp_path / "streamlit_chat.png"
            page.screenshot(path=str(shot), full_page=True)
            live_ms = live_turn(page)
            print(f"live widget: speech end -> reply audio playing: {live_ms} ms")
            page.screenshot(path=str(tmp_path / "streamlit_live.png"), full_page=True)
            if SHOTS:
                os.makedirs(SHOTS, exist_ok=True)
                shutil.copy(shot, os.path.join(SHOTS, "streamlit_chat.png"))
                shutil.copy(tmp_path / "streamlit_live.png", os.path.join(SHOTS, "streamlit_live.png"))
                with open(os.path.join(SHOTS, "streamlit_timing.json"), "w") as f:
                    json.dump({"stop_to_audio_ms": round(stop_to_audio_ms, 1), "live_speech_end_to_audio_ms": live_ms}, f)
    finally:
        server.stop()


def test_server_down_shows_an_error(tmp_path):
    wav = fake_mic_wav(tmp_path / "q.wav")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with StreamlitApp(down) as app, browser_page(wav) as page:
        page.goto(app.url + "/chat")
        error = page.get_by_test_id("stAlertContentError")
        error.wait_for(timeout=30_000)
        assert "cannot reach the voice server" in error.inner_text() and down in error.inner_text()
        assert page.get_by_text("python server.py").first.is_visible()  # the hint
        assert_no_traceback(page)


class BusyStub(BaseHTTPRequestHandler):
    """A server that describes a model but refuses every /chat with 503 busy."""

    def do_GET(self):
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": "stub-omni", "object": "model", "card": {"output_sample_rate": 24000}, "random_weights": False}]})
        else:
            self._json(404, {"error": {"type": "not_found", "message": "no such route"}})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._json(503, {"error": {"type": "busy", "message": "all 1 session slots are busy"}}, {"Retry-After": "1"})

    def _json(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_server_refusal_shows_its_message(tmp_path):
    wav = fake_mic_wav(tmp_path / "q.wav")
    stub = ThreadingHTTPServer(("127.0.0.1", 0), BusyStub)
    thread = threading.Thread(target=stub.serve_forever, daemon=True)
    thread.start()
    try:
        with StreamlitApp(f"http://127.0.0.1:{stub.server_address[1]}") as app, browser_page(wav) as page:
            page.goto(app.url + "/chat")
            page.get_by_text("stub-omni", exact=True).wait_for(timeout=30_000)
            assert page.get_by_text("random weights").count() == 0
            record(page, seconds=1.5)
            error = page.get_by_test_id("stAlertContentError")
            error.wait_for(timeout=30_000)
            assert "HTTP 503" in error.inner_text() and "all 1 session slots are busy" in error.inner_text()
            assert_no_traceback(page)
    finally:
        stub.shutdown()
        stub.server_close()
