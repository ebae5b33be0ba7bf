"""/v1/realtime driven by the official openai SDK's realtime client, as a user's tool would."""
import asyncio
import base64
import json
import time

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import SAMPLES
from openai import AsyncOpenAI
from test_server import Server

CHUNK = 2400  # 100 ms at 24 kHz


def speech_24k(pad_before=0.5, pad_after=1.2) -> np.ndarray:
    audio, rate = sf.read(SAMPLES / "01.wav", dtype="float32")
    audio = soxr.resample(audio, rate, 24000)
    return np.concatenate([np.zeros(int(pad_before * 24000), np.float32), audio,
                           np.zeros(int(pad_after * 24000), np.float32)])


def pcm_chunks(audio: np.ndarray):
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    for start in range(0, len(pcm), CHUNK * 2):
        yield base64.b64encode(pcm[start : start + CHUNK * 2]).decode()


@pytest.fixture(scope="module")
def server():
    s = Server("--max-sessions", "4")
    yield s
    s.stop()


def client(server) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="unused", base_url=server.url + "/v1", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")


async def next_of(conn, *types, timeout=60):
    """Events until one of ``types``; returns (that event, the types seen on the way)."""
    seen = []
    async def wait():
        async for event in conn:
            seen.append(event.type)
            if event.type in types:
                return event
    return await asyncio.wait_for(wait(), timeout), seen


def test_sdk_holds_a_spoken_turn_with_server_vad(server):
    async def run():
        async with client(server).realtime.connect(model="mini-omni") as conn:
            created, _ = await next_of(conn, "session.created")
            assert created.session.model == "mini-omni"
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 30})
            await next_of(conn, "session.updated")
            for chunk in pcm_chunks(speech_24k()):
                await conn.input_audio_buffer.append(audio=chunk)
            audio, transcript = b"", ""
            done = None
            async for event in conn:
                if event.type == "response.output_audio.delta":
                    audio += base64.b64decode(event.delta)
                elif event.type == "response.output_audio_transcript.delta":
                    transcript += event.delta
                elif event.type == "response.done":
                    done = event
                    break
                elif event.type == "error":
                    raise AssertionError(event.error.message)
            return done, audio, transcript
    done, audio, transcript = asyncio.run(run())
    assert done.response.status == "completed"
    assert transcript.strip() and done.response.output[0].content[0].transcript == transcript
    assert len(audio) == (30 - 7) * 2048 * 2  # 24 kHz PCM16, every frame


def test_sdk_events_in_order_and_barge_in_cancels(server):
    async def run():
        async with client(server).realtime.connect(model="mini-omni") as conn:
            await next_of(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 1500})
            for chunk in pcm_chunks(speech_24k()):
                await conn.input_audio_buffer.append(audio=chunk)
            _, before = await next_of(conn, "response.output_audio.delta")
            for chunk in pcm_chunks(speech_24k(pad_before=0.1, pad_after=0.0)):  # the user talks over it
                await conn.input_audio_buffer.append(audio=chunk)
            done, during = await next_of(conn, "response.done")
            return before, during, done
    before, during, done = asyncio.run(run())
    order = ["session.updated", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "response.created", "response.output_audio.delta"]
    assert [before.index(kind) for kind in order] == sorted(before.index(kind) for kind in order)
    assert "input_audio_buffer.speech_started" in during
    assert done.response.status == "cancelled"
    deadline = time.monotonic() + 15  # the cancelled reply's slot is freed (asynchronously)
    while server.metric("zoo_sessions_active") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("zoo_sessions_active") == 0


def test_manual_turns_and_protocol_errors(server):
    async def run():
        async with client(server).realtime.connect(model="mini-omni") as conn:
            await next_of(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 20,
                                               "audio": {"input": {"turn_detection": None}}})
            updated, _ = await next_of(conn, "session.updated")
            assert updated.session.audio.input.turn_detection is None
            errors = []
            await conn.send({"type": "no.such.event"})
            errors.append((await next_of(conn, "error"))[0].error.code)
            await conn.send({"type": "input_audio_buffer.append", "audio": "***"})
            errors.append((await next_of(conn, "error"))[0].error.code)
            await conn.input_audio_buffer.commit()  # nothing buffered yet
            errors.append((await next_of(conn, "error"))[0].error.code)
            await conn.response.create()  # nothing committed
            errors.append((await next_of(conn, "error"))[0].error.code)
            await conn.session.update(session={"type": "realtime", "zoo": {"options": {"top_p": 9}}})
            errors.append((await next_of(conn, "error"))[0].error.code)
            for chunk in pcm_chunks(speech_24k()):
                await conn.input_audio_buffer.append(audio=chunk)
            await conn.input_audio_buffer.commit()
            await next_of(conn, "input_audio_buffer.committed")
            await conn.response.create()
            done, seen = await next_of(conn, "response.done")
            return errors, done, seen
    errors, done, seen = asyncio.run(run())
    assert errors == ["unknown_event", "invalid_audio", "input_audio_buffer_commit_empty", "no_input", "bad_option"]
    assert done.response.status == "completed" and "response.output_audio.delta" in seen
    assert "input_audio_buffer.speech_started" not in seen  # no server VAD in manual mode


def test_raw_websocket_clients_get_errors_not_disconnects(server):
    import websockets

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send("{not json")
            first = json.loads(await ws.recv())
            await ws.send(b"\x00\x01")
            second = json.loads(await ws.recv())
            return first, second
    first, second = asyncio.run(run())
    assert first["type"] == second["type"] == "error"
    assert first["error"]["code"] == "invalid_json" and second["error"]["code"] == "binary_not_supported"
