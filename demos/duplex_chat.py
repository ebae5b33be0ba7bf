"""Full-duplex talk with server.py (a model whose card says duplex, e.g. hertz-dev) from a
terminal: microphone -> /v1/duplex -> speaker, both at once, one frame (125 ms for Hertz-dev)
each way per model step. Needs a sound card and PyAudio (`pip install pyaudio`); headphones
help (otherwise the model hears itself). A model with a text stream (Moshi) has its text printed
as it comes. Or stream a file and save the model's side:

    python server.py --model hertz-dev &
    python demos/duplex_chat.py [--server http://127.0.0.1:60808]
    python demos/duplex_chat.py --wav question.wav --out reply.wav   # no sound card needed

The server's API key comes from OMNI_ZOO_API_KEY (or --api-key); the server must run a full-duplex
model, and --model, if given, that one (zoo/client_cli.py: the flags both terminal demos share).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import websockets

from zoo.client_cli import ClientError, add_client_flags, connect
from zoo.core.audio import float_to_pcm16


async def duplex(url: str, microphone: Callable[[dict], AsyncIterator[bytes]], play: Callable[[bytes], None],
                 show: Callable[[str], None], options: dict | None = None, window: int | None = None,
                 headers: dict | None = None) -> dict:
    """Connect, send ``options`` (if any), stream ``microphone(session)`` (PCM16 LE at the
    session's rate, any block size) and ``play`` every frame the model sends back until the
    microphone ends and every frame is answered. ``window``: at most this many frames sent and
    not yet answered (a file streamed as fast as the model goes); ``headers``: the API key's
    (ServerInfo.headers()). Returns the session."""
    async with websockets.connect(url, max_size=None, additional_headers=headers or {}) as ws:
        created = json.loads(await ws.recv())
        if created.get("type") == "error":
            raise RuntimeError(f"the server refused: {created['error']['message']}")
        session = created["session"]
        show(f"[connected to {session['model']}: {session['frame_samples']}-sample frames at "
             f"{session['sample_rate']} Hz, both ways at once]\n")
        if session.get("random_weights"):
            show("[the server runs random weights: the model's audio is noise]\n")
        if options:
            await ws.send(json.dumps({"type": "session.update", "options": options}))
            reply = json.loads(await ws.recv())
            if reply["type"] == "error":
                raise RuntimeError(f"options refused: {reply['error']['message']}")
        frame_bytes = 2 * session["frame_samples"]
        sent, answered = 0, 0
        done_sending, progress = asyncio.Event(), asyncio.Event()

        async def send():
            nonlocal sent
            async for pcm in microphone(session):
                while window is not None and sent // frame_bytes - answered >= window:
                    progress.clear()
                    await progress.wait()
                await ws.send(pcm)
                sent += len(pcm)
            done_sending.set()

        sender = asyncio.create_task(send())
        try:
            while not (done_sending.is_set() and answered >= sent // frame_bytes):
                try:
                    message = await asyncio.wait_for(ws.recv(), 1.0)
                except TimeoutError:
                    continue
                if isinstance(message, bytes):
                    answered += 1
                    progress.set()
                    play(message)
                    continue
                event = json.loads(message)
                if event.get("type") == "text.delta":  # the model's text, as it streams (text_output cards)
                    show(event["delta"])
                elif event.get("type") == "error":
                    answered += event["error"].get("frames_dropped", 0)
                    progress.set()
                    show(f"[server: {event['error']['message']}]\n")
        finally:
            sender.cancel()
        return session


def file_microphone(path: str, real_time: bool):
    """A wav file as the microphone, in frame-sized blocks, paced in real time unless told not to
    (then ``duplex(window=...)`` keeps the client within the server's backlog)."""
    import soundfile as sf
    import soxr

    audio, rate = sf.read(path, dtype="float32", always_2d=True)

    async def microphone(session):
        mono = soxr.resample(audio.mean(axis=1), rate, session["sample_rate"]) if rate != session["sample_rate"] \
            else audio.mean(axis=1)
        pcm = float_to_pcm16(mono).tobytes()
        step = 2 * session["frame_samples"]
        pcm += bytes(-len(pcm) % step)
        start = time.monotonic()
        for i in range(0, len(pcm), step):
            yield pcm[i : i + step]
            if real_time:
                await asyncio.sleep(max(0.0, start + (i + step) / 2 / session["sample_rate"] - time.monotonic()))

    return microphone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wav", help="stream this file instead of the microphone")
    parser.add_argument("--out", help="with --wav: write the model's audio here")
    parser.add_argument("--fast", action="store_true", help="with --wav: do not pace the file in real time")
    parser.add_argument("--temperature", type=float, help="token temperature (0: deterministic)")
    add_client_flags(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    options = {"temperature": args.temperature} if args.temperature is not None else None
    try:
        server = connect(args, duplex=True)
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    url, headers = server.ws_url("/v1/duplex"), server.headers()
    show = lambda text: print(text, end="", flush=True)  # noqa: E731
    if args.wav:
        received: list[bytes] = []
        try:
            session = asyncio.run(duplex(url, file_microphone(args.wav, not args.fast), received.append, show,
                                         options, window=2 if args.fast else None, headers=headers))
        except (OSError, RuntimeError, websockets.WebSocketException) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        audio = np.frombuffer(b"".join(received), "<i2")
        show(f"[{len(received)} frames, {audio.size / session['output_sample_rate']:.2f} s of the model's audio]\n")
        if args.out:
            import soundfile as sf

            sf.write(args.out, audio, session["output_sample_rate"], subtype="PCM_16")
        return 0
    try:
        import pyaudio  # only the microphone mode needs a sound card
    except ImportError:
        print("error: the microphone mode needs PyAudio: pip install pyaudio (and PortAudio, e.g. apt install "
              "portaudio19-dev); or stream a file with --wav", file=sys.stderr)
        return 2
    sound = pyaudio.PyAudio()
    streams = {}

    def microphone(session):
        rate, frame = session["sample_rate"], session["frame_samples"]
        streams["mic"] = sound.open(format=pyaudio.paInt16, channels=1, rate=rate, input=True, frames_per_buffer=frame)
        streams["speaker"] = sound.open(format=pyaudio.paInt16, channels=1, rate=session["output_sample_rate"], output=True)

        async def blocks():
            while True:
                yield await asyncio.to_thread(streams["mic"].read, frame, exception_on_overflow=False)

        return blocks()

    def play(pcm: bytes) -> None:
        streams["speaker"].write(pcm)  # blocks at most one frame: the speaker paces itself

    try:
        asyncio.run(duplex(url, microphone, play, show, options, headers=headers))
    except KeyboardInterrupt:
        pass
    except (OSError, RuntimeError, websockets.WebSocketException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        for stream in streams.values():
            stream.close()
        sound.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
