"""server.py serving tiny Moshi on the Kyutai reference protocol, ``WS /api/chat``
(serving/protocols/kyutai_reference.py), driven as the reference ``moshi.client`` drives it: the
handshake byte first, Ogg/Opus microphone pages (kind 0x01, encoded with sphn), Opus audio (0x01)
and text pieces (0x02) back. Sessions run greedy (``audio_temperature=0``: every codebook and the
text), so what the server says is checked against the same model stepped in this process on the
same decoded input. Hostile clients get a 0x05 error and go on; other sessions are unaffected.
The route itself is card-driven: a stub card that declares the protocol gets it, one that does
not is refused."""
import asyncio
import contextlib

import numpy as np
import pytest
import sphn
import torch
import websockets
from procs import LoopbackProcess
from test_protocol_adapters import StubModel
from test_server import Server

RATE, FRAME = 24000, 1920
GREEDY = "?audio_temperature=0&text_temperature=0&pad_mult=0"  # pad_mult: a web client parameter, ignored


class MoshiServer(Server):
    def __init__(self, *args):
        LoopbackProcess.__init__(self, ["server.py", "--model", "moshi", "--tiny", "--port", "{port}", *args],
                                 health="/health", timeout=180)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat"


@pytest.fixture(scope="module")
def server():
    s = MoshiServer("--max-sessions", "3", "--duplex-backlog", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model():
    import zoo

    return zoo.load("moshi", random_weights="tiny", device="cpu")


def speech(n: int, seed: int) -> np.ndarray:
    """n frames of a session-specific tone with a little noise, float32 (n * 1920,)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n * FRAME) / RATE
    audio = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.02 * rng.standard_normal(t.size)
    return audio.astype(np.float32)


def opus_pages(audio: np.ndarray) -> list[bytes]:
    """The microphone as the reference client sends it: one Ogg/Opus piece per 80 ms block."""
    writer = sphn.OpusStreamWriter(RATE)
    return [writer.append_pcm(audio[i : i + FRAME]) for i in range(0, audio.size, FRAME)]


def decoded(pages: list[bytes]) -> np.ndarray:
    """What the server decodes from ``pages`` (the model's input)."""
    reader = sphn.OpusStreamReader(RATE)
    return np.concatenate([reader.append_bytes(p) for p in pages])


def reference(model, audio: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The model stepped here, greedy, on the same input: its audio and its text pieces."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stepper = model.duplex_stepper(1)
        handle = stepper.open({"temperature": 0, "text_temperature": 0})
        out, texts = [], []
        for frame in audio.reshape(-1, FRAME):
            out.append(stepper.step([handle], [frame])[0])
            texts.append(handle.text)
        return np.concatenate(out), texts
    finally:
        torch.set_num_threads(threads)


class Session:
    """A client of /api/chat: the reference client's reading of the server's messages."""

    def __init__(self, ws) -> None:
        self.ws, self.reader = ws, sphn.OpusStreamReader(RATE)
        self.pcm: list[np.ndarray] = []
        self.texts: list[str] = []
        self.errors: list[str] = []

    @classmethod
    async def open(cls, url: str):
        ws = await websockets.connect(url, max_size=None)
        assert await asyncio.wait_for(ws.recv(), 30) == b"\x00"  # the handshake, before anything else
        return cls(ws)

    @property
    def samples(self) -> int:
        return sum(p.size for p in self.pcm)

    async def read(self) -> None:
        """One message from the server, filed by its kind byte."""
        message = await asyncio.wait_for(self.ws.recv(), 60)
        assert isinstance(message, bytes) and message, message
        kind, payload = message[0], message[1:]
        if kind == 1:
            self.pcm.append(self.reader.append_bytes(payload))
        elif kind == 2:
            self.texts.append(payload.decode())
        elif kind == 5:
            self.errors.append(payload.decode())
        else:
            raise AssertionError(f"unexpected message kind {kind}")

    async def until(self, samples: int = 0, errors: int = 0) -> None:
        while self.samples < samples or len(self.errors) < errors:
            await self.read()

    async def talk(self, pages: list[bytes], ahead: int = 2) -> None:
        """Send the pages with at most ``ahead`` 80 ms frames unanswered (a real-time client)."""
        start = self.samples
        for i, page in enumerate(pages):
            await self.ws.send(b"\x01" + page)
            await self.until(start + FRAME * max(0, i + 1 - ahead))
        await self.until(start + FRAME * len(pages))


def test_a_session_answers_opus_audio_and_text_as_the_model_does(server, model):
    n = 30
    pages = opus_pages(speech(n, seed=1))

    async def run():
        session = await Session.open(server.ws + GREEDY)
        async with session.ws:
            await session.talk(pages)
            await asyncio.sleep(0.3)  # then read whatever is still on its way
            while True:
                try:
                    await asyncio.wait_for(session.read(), 0.5)
                except TimeoutError:
                    break
        return session

    session = asyncio.run(run())
    assert not session.errors
    audio = np.concatenate(session.pcm)
    assert audio.dtype == np.float32 and audio.size == n * FRAME  # 2.4 s at 24 kHz: one frame per frame
    want_audio, want_texts = reference(model, decoded(pages))
    assert "".join(session.texts) == "".join(want_texts) and any(want_texts)  # the greedy text, in order
    assert session.texts == [t for t in want_texts if t]  # one message per step that has text
    assert np.abs(audio[:FRAME]).max() < 1e-3  # the first step answers silence (the acoustic delay)
    # Opus is lossy and delays: the model's audio through the same encoder and decoder is what must come
    want = decoded(opus_pages(want_audio))
    assert want.size == audio.size and np.abs(want[FRAME:]).max() > 1e-3
    assert np.corrcoef(audio[FRAME:], want[FRAME:])[0, 1] > 0.95, np.corrcoef(audio[FRAME:], want[FRAME:])
    rms = [np.sqrt((x.reshape(n, FRAME)[1:] ** 2).mean(1)) for x in (audio, want)]
    assert np.allclose(*rms, rtol=0.1, atol=1e-3)


def test_hostile_messages_get_errors_and_the_sessions_go_on(server, model):
    n = 12
    calm_pages = opus_pages(speech(n, seed=2))
    rude_pages = opus_pages(speech(n, seed=3))
    errors_before = server.metric('zoo_errors_total{kind="duplex_unknown_kind"}')

    async def calm():
        session = await Session.open(server.ws + GREEDY)
        async with session.ws:
            await session.talk(calm_pages, ahead=1)
            await asyncio.sleep(0.3)
            with contextlib.suppress(TimeoutError):
                while True:
                    await asyncio.wait_for(session.read(), 0.5)
        return session

    async def rude():
        session = await Session.open(server.ws + GREEDY)
        async with session.ws:
            await session.talk(rude_pages[: n // 2], ahead=1)
            for message in (b"\xff\x00garbage", "hello", b"\x03\x00", b"\x01" + b"not ogg" * 20, b"", b"\x06"):
                await session.ws.send(message)
            await session.until(errors=4)  # the empty message and the ping are ignored
            await session.talk(rude_pages[n // 2 :], ahead=1)  # the Opus stream picks up again
        return session

    async def run():
        return await asyncio.gather(calm(), rude())

    calm_session, rude_session = asyncio.run(run())
    codes = [e.split(":", 1)[0] for e in rude_session.errors]
    assert codes == ["unknown_kind", "bad_message", "unsupported_kind", "bad_audio"], rude_session.errors
    assert "unknown message kind 255" in rude_session.errors[0]
    assert rude_session.samples == n * FRAME
    assert not calm_session.errors and calm_session.samples == n * FRAME
    want_audio, want_texts = reference(model, decoded(calm_pages))  # the calm one is as if alone
    assert "".join(calm_session.texts) == "".join(want_texts)
    assert server.metric('zoo_errors_total{kind="duplex_unknown_kind"}') == errors_before + 1
    assert server.proc.poll() is None
    assert "unknown message kind 255" in server.output() and "req_" in server.output()  # logged with the request id


def test_bad_options_on_the_url_are_refused_visibly(server):
    async def run():
        async with websockets.connect(server.ws + "?text_temperature=nan") as ws:
            message = await asyncio.wait_for(ws.recv(), 30)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
        return message, closed.value.rcvd

    message, close = asyncio.run(run())
    assert message[:1] == b"\x05" and message[1:].decode().startswith("bad_option: ")
    assert close.code == 1008 and close.reason == "bad_option"


# -- the route comes from the card alone ------------------------------------------------------------
def stub_client(model, **app_args):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.service import Service

    service = Service(model, max_sessions=1, duplex_sessions=1)
    return TestClient(create_app(service, **app_args)), service


def test_a_card_that_declares_the_protocol_gets_api_chat():
    from starlette.websockets import WebSocketDisconnect

    from serving.protocols.duplex import DuplexSettings

    # 20 ms frames at 8 kHz (the stub's card; it answers half its input): sphn's Opus packets hold
    # 960 samples, so a message goes each way per 6 frames
    model = StubModel(duplex=True, frame_samples=160, text_output=False,
                      protocols={"kyutai-opus": {"audio_temperature": "temperature"}})
    client, service = stub_client(model, duplex_settings=DuplexSettings(max_session_s=5.0))
    tone = (0.5 * np.sin(2 * np.pi * 400 * np.arange(160 * 30) / 8000)).astype(np.float32)
    writer, reader = sphn.OpusStreamWriter(8000), sphn.OpusStreamReader(8000)
    try:
        with client, client.websocket_connect("/api/chat?audio_temperature=0.5") as ws:
            assert ws.receive_bytes() == b"\x00"
            got, sent = [], 0
            for i in range(30):
                page = writer.append_pcm(tone[160 * i : 160 * (i + 1)])
                if page:
                    ws.send_bytes(b"\x01" + page)
                    sent = (i + 1) // 6 * 960
                while sum(g.size for g in got) < sent:
                    message = ws.receive_bytes()
                    assert message[0] == 1, message
                    got.append(reader.append_bytes(message[1:]))
            audio = np.concatenate(got)
            assert audio.size == tone.size
            # half the input, through Opus twice (each adds its delay): half the level, the same pitch
            level = np.sqrt((audio[960:] ** 2).mean()) / np.sqrt((tone[960:] ** 2).mean())
            assert 0.4 < level < 0.6, level
            spectrum = np.abs(np.fft.rfft(audio[960:]))
            assert abs(np.argmax(spectrum) * 8000 / (audio.size - 960) - 400) < 10
            # the session limit of every duplex route: an error, then the close
            assert ws.receive_bytes().startswith(b"\x05max_duration: sessions last at most 5 s")
            with pytest.raises(WebSocketDisconnect):
                ws.receive_bytes()
    finally:
        service.close()


def test_a_card_without_the_protocol_does_not_get_it():
    model = StubModel(duplex=True, frame_samples=160)
    client, service = stub_client(model)
    try:
        with client, client.websocket_connect("/api/chat") as ws:
            assert ws.receive_bytes().startswith(b"\x05not_offered: ")
    finally:
        service.close()


def test_api_chat_needs_the_key_and_a_trusted_origin():
    from starlette.websockets import WebSocketDisconnect

    from serving.security import AccessSettings

    model = StubModel(duplex=True, frame_samples=160, protocols={"kyutai-opus": {}})
    client, service = stub_client(model, access=AccessSettings(api_key="k3y"))
    try:
        with client:
            for headers in ({}, {"Authorization": "Bearer k3y", "Origin": "https://evil.example"}):
                with pytest.raises(WebSocketDisconnect), client.websocket_connect("/api/chat", headers=headers):
                    pass
            with client.websocket_connect("/api/chat", headers={"Authorization": "Bearer k3y"}) as ws:
                assert ws.receive_bytes() == b"\x00"
    finally:
        service.close()


def test_the_pcm_duplex_socket_and_the_terminal_demo_serve_moshi_as_hertz_dev(server, model, tmp_path, capsys):
    """The zoo's own duplex path is card-driven too: demos/duplex_chat.py --wav streams a 24 kHz
    file over /v1/duplex in Moshi's 1920-sample frames and writes what the model said, which is
    what the model stepped here says on the same PCM16 input (greedy); its text pieces come as
    ``text.delta`` events (the card says text_output) and the demo prints them as they come."""
    import soundfile as sf
    from conftest import load_script

    n = 12
    question = tmp_path / "question.wav"
    sf.write(question, speech(n, seed=3), RATE, subtype="PCM_16")
    demo = load_script("demos/duplex_chat.py")
    out = tmp_path / "reply.wav"
    assert demo.main(["--server", server.url, "--wav", str(question), "--out", str(out), "--fast",
                      "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    reply, rate = sf.read(out, dtype="float32")
    sent, _ = sf.read(question, dtype="float32")  # the PCM16 samples the socket carried
    want, texts = reference(model, sent)
    assert any(texts) and "".join(texts) in printed, (texts, printed)
    assert rate == RATE and reply.size == want.size == n * FRAME
    assert np.abs(want).max() > 1e-2  # not a silent comparison
    assert np.abs(reply - np.clip(want, -1, 1)).max() <= 2 / 32768  # PCM16 rounding on the way out
