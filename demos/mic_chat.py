"""Talk to server.py from a terminal: microphone -> live session (/v1/realtime, server-side voice
activity detection) -> speaker, with the transcript printed as it arrives. Speak while it answers
to interrupt it. Needs a local sound card and PyAudio (`pip install pyaudio`).

    python server.py &                      # the model, on this or another machine
    python demos/mic_chat.py [--server http://127.0.0.1:60808] [--model mini-omni]

The server's API key comes from OMNI_ZOO_API_KEY (or --api-key); --model is checked against what
the server runs (zoo/client_cli.py: the flags both terminal demos share).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator, Callable

import websockets

from zoo.client_cli import ClientError, add_client_flags, connect

RATE = 24000  # the wire format: PCM16 mono at 24 kHz
CHUNK = 2400  # 100 ms


async def converse(url: str, microphone: AsyncIterator[bytes], play: Callable[[bytes], None],
                   interrupt: Callable[[], None], show: Callable[[str], None], replies: int | None = None,
                   max_output_tokens: int | None = None, headers: dict | None = None) -> int:
    """Stream ``microphone`` PCM to the server and play and show what comes back (``headers``:
    the API key's, from ServerInfo.headers()). Returns the number of finished replies; stops after
    ``replies`` of them when given (tests use that)."""
    finished = 0
    async with websockets.connect(url, max_size=None, additional_headers=headers or {}) as ws:
        created = json.loads(await ws.recv())
        model = created.get("session", {}).get("model", "?")
        show(f"[connected to {model}; speak, and pause to let it answer]\n")
        if created.get("session", {}).get("zoo", {}).get("random_weights"):
            show("[the server runs random weights: replies are noise]\n")
        if max_output_tokens:
            await ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": max_output_tokens}}))

        async def send_audio():
            async for pcm in microphone:
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))

        sender = asyncio.create_task(send_audio())
        try:
            async for message in ws:
                event = json.loads(message)
                kind = event.get("type")
                if kind == "input_audio_buffer.speech_started":
                    interrupt()  # barge-in: stop playing the old reply at once
                    show("\n[you]\n")
                elif kind == "response.output_audio.delta":
                    play(base64.b64decode(event["delta"]))
                elif kind == "response.output_audio_transcript.delta":
                    show(event["delta"])
                elif kind == "response.done":
                    finished += 1
                    show(f"\n[{event['response']['status']}]\n")
                    if replies is not None and finished >= replies:
                        break
                elif kind == "error":
                    show(f"\n[server: {event['error']['message']}]\n")
        finally:
            sender.cancel()
    return finished


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-output-tokens", type=int, help="cap each reply (decode steps)")
    add_client_flags(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import pyaudio  # only this demo needs a sound card
    except ImportError:
        print("error: this demo needs PyAudio: pip install pyaudio (and PortAudio, e.g. apt install portaudio19-dev)",
              file=sys.stderr)
        return 2
    try:
        server = connect(args)
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    url = server.ws_url("/v1/realtime")
    audio = pyaudio.PyAudio()
    mic = audio.open(format=pyaudio.paInt16, channels=1, rate=RATE, input=True, frames_per_buffer=CHUNK)
    speaker = audio.open(format=pyaudio.paInt16, channels=1, rate=RATE, output=True)
    pending: list[bytes] = []

    async def microphone():
        loop = asyncio.get_running_loop()
        while True:
            yield await loop.run_in_executor(None, lambda: mic.read(CHUNK, exception_on_overflow=False))

    async def speak():
        loop = asyncio.get_running_loop()
        while True:
            if pending:
                await loop.run_in_executor(None, speaker.write, pending.pop(0))
            else:
                await asyncio.sleep(0.01)

    async def run():
        player = asyncio.create_task(speak())
        try:
            await converse(url, microphone(), pending.append, pending.clear, lambda s: print(s, end="", flush=True),
                           max_output_tokens=args.max_output_tokens, headers=server.headers())
        finally:
            player.cancel()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except (OSError, websockets.WebSocketException) as err:
        print(f"error: the live session at {url} failed: {err}", file=sys.stderr)
        return 1
    finally:
        mic.close()
        speaker.close()
        audio.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
