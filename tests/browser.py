"""Headless Chromium (Debian's, driven by Playwright) with a fake microphone playing a spoken
question, for the web UI tests. Outside traffic is blocked: only loopback is reachable."""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def fake_mic_wav(path: Path, text: str = "What is your name?") -> Path:
    """espeak-ng speech, 16-bit PCM at 48 kHz, padded with silence (the fake device loops the file)."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", str(path), "pad", "0.3", "6"], check=True)
    return path


@contextlib.contextmanager
def browser_page(mic_wav: Path, viewport=(1280, 900)):
    with browser_pages(mic_wav, 1, viewport) as (page,):
        yield page


@contextlib.contextmanager
def browser_pages(mic_wav: Path, count: int, viewport=(1280, 900)):
    """``count`` pages, each in its own browser context: separate visitors (cookies, sessions)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                  f"--use-file-for-fake-audio-capture={mic_wav}",
                  "--autoplay-policy=no-user-gesture-required"],
        )
        contexts = []
        try:
            for _ in range(count):
                context = browser.new_context(permissions=["microphone", "camera"],
                                              viewport={"width": viewport[0], "height": viewport[1]})
                context.route("**/*", lambda route: route.continue_() if _loopback(route.request.url) else route.abort())
                contexts.append(context)
            yield [context.new_page() for context in contexts]
        finally:
            for context in contexts:
                context.close()
            browser.close()


def _loopback(url: str) -> bool:
    return url.startswith(("http://127.0.0.1", "http://localhost", "ws://127.0.0.1", "ws://localhost", "data:", "blob:"))


def audio_playing(page, selector: str = "audio") -> bool:
    """Some <audio> on the page has advanced its playback clock."""
    return page.evaluate(f"""() => Array.from(document.querySelectorAll({selector!r})).some(a => a.currentTime > 0)""")
