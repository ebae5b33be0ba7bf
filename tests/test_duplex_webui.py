"""The web UIs for the full-duplex models (hertz-dev and moshi, tiny). The Gradio page through server.py in
headless Chromium with a fake microphone: it shows the full-duplex widget (the card says duplex)
and the random-weights banner; the widget streams the mic to /v1/duplex and plays the model's
frames through WebAudio while it keeps sending. The in-process Gradio page and the Streamlit
chat page are checked without a browser (their widget markup and where it connects)."""
import json
import os
import shutil

import pytest
import requests
from browser import browser_page, fake_mic_wav
from conftest import REPO
from procs import LoopbackProcess
from test_duplex_server import HertzServer

import zoo

SHOTS = os.environ.get("WEBUI_SHOTS")  # also copy screenshots there, for people to look at
THREADS = {"OMP_NUM_THREADS": "1"}  # see test_duplex_server


class GradioPage(LoopbackProcess):
    """The Gradio page through a server (API_URL)."""

    def __init__(self, *args, api_url=None):
        super().__init__(["webui/omni_gradio.py", "--port", "{port}", *args],
                         env={"GRADIO_ANALYTICS_ENABLED": "False", "API_URL": api_url, **THREADS}, timeout=180)
        self.url += "/"


def stats(page) -> dict:
    return page.evaluate("() => window.omniDuplexStats ? JSON.parse(JSON.stringify(window.omniDuplexStats)) : null")


def talk_full_duplex(page, tmp_path, name: str, frames: int = 24, rate: int = 16000, frame: int = 2000) -> dict:
    """Start the widget, wait for ``frames`` of the model's frames, stop; the session must be at
    the card's ``rate`` and ``frame`` (samples)."""
    page.get_by_text("omni-zoo voice chat").first.wait_for(timeout=60000)
    body = page.inner_text("body")
    assert "random weights" in body.lower() and "full duplex" in body.lower()
    assert page.get_by_role("button", name="Start live chat").count() == 0  # not the half-duplex widget
    page.get_by_role("button", name="Start full duplex").click()
    for _ in range(1200):  # up to 60 s
        current = stats(page)
        if current and current["framesReceived"] >= frames:
            break
        page.wait_for_timeout(50)
    else:
        raise AssertionError(f"the model's frames did not arrive: {stats(page)}")
    status = page.locator(".omni-duplex-status").inner_text()
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        shutil.copy(shot, os.path.join(SHOTS, shot.name))
    page.get_by_role("button", name="Stop full duplex").click()
    assert "frames in" in status and "random weights" in status, status
    assert current["session"]["frame_samples"] == frame and current["session"]["sample_rate"] == rate
    assert current["playedSeconds"] >= frame / rate * frames - 1e-6  # every frame was scheduled for playback
    assert current["framesSent"] >= current["framesReceived"]  # answers follow the mic, frame by frame
    assert not [e for e in current["errors"] if e["code"] != "backlog_full"], current["errors"]
    latency = sorted(current["latencyMs"])
    panel = page.locator(".omni-duplex-text")
    return {"frames_received": current["framesReceived"], "median_frame_round_trip_ms": round(latency[len(latency) // 2]),
            "status": status, "text": current["text"], "text_panel": panel.inner_text() if panel.is_visible() else None}


@pytest.fixture(scope="module")
def server():
    s = HertzServer("--max-sessions", "2")
    yield s
    s.stop()


def test_gradio_page_through_server_talks_full_duplex(server, tmp_path):
    mic = fake_mic_wav(tmp_path / "mic.wav")
    ui = GradioPage(api_url=server.url)
    try:
        with browser_page(mic) as page:
            page.goto(ui.url)
            page.get_by_text("omni-zoo voice chat").first.wait_for(timeout=60000)
            assert f"server {server.url}" in page.inner_text("body")
            result = talk_full_duplex(page, tmp_path, "duplex_server")
        assert result["text"] == "" and result["text_panel"] is None  # hertz-dev has no text stream
        assert server.metric("zoo_duplex_sessions_total") == 1
        assert server.metric("zoo_duplex_frames_total") >= result["frames_received"]
        print(json.dumps(result))
    finally:
        ui.stop()


def test_gradio_page_talks_full_duplex_with_moshi_through_server(tmp_path):
    """The same widget, nothing changed, with the second duplex model: Moshi's card (24 kHz,
    1920-sample frames) is all the page reads."""
    from test_moshi_protocol import FRAME, RATE, MoshiServer

    server = MoshiServer("--max-sessions", "1")
    ui = GradioPage(api_url=server.url)
    try:
        with browser_page(fake_mic_wav(tmp_path / "mic.wav")) as page:
            page.goto(ui.url)
            result = talk_full_duplex(page, tmp_path, "duplex_moshi", frames=12, rate=RATE, frame=FRAME)
        # Moshi's text streams beside its audio, labelled, in the widget's panel
        assert result["text"] and result["text_panel"].startswith("moshi (text): ")
        assert result["text"][-20:] in result["text_panel"]
        assert server.metric("zoo_duplex_sessions_total") == 1
        assert server.metric("zoo_duplex_frames_total") >= result["frames_received"]
    finally:
        ui.stop()
        server.stop()


@pytest.mark.parametrize("name", [n for n in zoo.names() if zoo.card(n).duplex])
def test_in_process_gradio_page_offers_full_duplex_on_its_own_origin(name):
    """Without a browser, for every duplex model: the in-process page's widget connects to its own
    origin, whose app (server.py's routes) serves /v1/duplex, at the card's rate and frame."""
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.service import Service
    from webui.client import LocalBackend
    from webui.omni_gradio import build

    model = zoo.load(name, random_weights="tiny", device="cpu")
    rate, frame = model.card.input_sample_rate, model.card.frame_samples
    demo = build(LocalBackend(model), live_api="")
    html = [b.value for b in demo.blocks.values() if isinstance(getattr(b, "value", None), str)]
    assert any(f'data-omni-duplex data-ws="" data-rate="{rate}" data-frame="{frame}"' in h for h in html)
    assert not any("data-omni-live" in h for h in html)
    service = Service(model, max_sessions=2, duplex_sessions=1)
    try:
        with TestClient(create_app(service)) as client, client.websocket_connect("/v1/duplex") as ws:
            assert ws.receive_json()["session"]["random_weights"] is True
            ws.send_bytes(bytes(2 * frame))  # one PCM16 frame in, the model's frame out
            assert len(ws.receive_bytes()) == 2 * frame * model.card.output_sample_rate // rate
    finally:
        service.close()


def test_streamlit_chat_offers_full_duplex(server, monkeypatch):
    """The Streamlit chat page (run headless by streamlit's AppTest) embeds the full-duplex
    widget pointed at the server's /v1/duplex, with the server's random-weights notice."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("API_URL", server.url)
    app = AppTest.from_file(str(REPO / "webui" / "views" / "chat.py"), default_timeout=60).run()
    assert not app.exception
    assert any(e.label.startswith("Full duplex") for e in app.expander)
    frames = [f.proto.srcdoc for f in app.get("iframe")]
    assert len(frames) == 1 and f'data-omni-duplex data-ws="{server.ws}/v1/duplex"' in frames[0]
    assert "Start live chat" not in frames[0]
    notice = requests.get(server.url + "/v1/models", timeout=5).json()["data"][0]["notice"]
    assert notice and any(w.value == notice for w in app.warning)  # the server's own words
