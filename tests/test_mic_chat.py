"""demos/mic_chat.py's conversation loop against a real server, with a file as the microphone."""
import asyncio
import subprocess
import sys

import numpy as np
from conftest import REPO, load_script
from test_realtime import speech_24k
from test_server import Server


def test_a_spoken_turn_is_played_and_printed():
    demo = load_script("demos/mic_chat.py")
    server = Server("--max-sessions", "2")
    try:
        pcm = (np.clip(speech_24k(pad_after=1.5), -1, 1) * 32767).astype("<i2").tobytes()

        async def microphone():
            for start in range(0, len(pcm), demo.CHUNK * 2):
                yield pcm[start : start + demo.CHUNK * 2]
                await asyncio.sleep(0.01)
            while True:  # a quiet room after the question
                yield bytes(demo.CHUNK * 2)
                await asyncio.sleep(0.05)

        played, shown, interrupts = [], [], []
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        finished = asyncio.run(asyncio.wait_for(
            demo.converse(url, microphone(), played.append, lambda: interrupts.append(1), shown.append, replies=1, max_output_tokens=40), 120))
        text = "".join(shown)
        assert finished == 1 and "[completed]" in text and "connected to mini-omni" in text
        assert "replies are noise" in text and interrupts == [1]  # one speech start: the question
        assert sum(len(p) for p in played) > 24000 * 2 * 0.5  # over half a second of reply audio
    finally:
        server.stop()


def test_without_pyaudio_it_says_what_to_install():
    code = "import sys; sys.modules['pyaudio'] = None; sys.argv = ['mic_chat.py']; import runpy; runpy.run_path('demos/mic_chat.py', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "pip install pyaudio" in result.stderr and "Traceback" not in result.stderr
