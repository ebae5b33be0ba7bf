"""The soak clients' actions (bench/soak.py): valid replies, hostile requests and disconnects, each
bounded by the request timeout and judged by what a well-behaved server must do with it.

valid       must complete: a /chat or realtime reply read to its end (including the replies with a
            huge seed or a near-zero temperature, which are legal options)
hostile     must be refused (4xx, or an `error` event) or, for a half-sent request, dropped; a 5xx
            or no answer at all is a lost reply
disconnect  the client goes away mid-reply; the server must free the session (seen in /health)
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import requests
import soundfile as sf
import soxr
from loopback import ROOT, post_chat
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from zoo.core.audio import float_to_pcm16

SAMPLES = sorted((ROOT / "demos" / "samples").glob("*.wav"))
REPLY_TOKENS = (20, 30, 40)  # few lengths, so every valid reply has siblings of the same request
DROP_TOKENS = 200  # a disconnect leaves mid-reply: long enough never to finish first
REALTIME_RATE = 24000
REALTIME_CHUNK_S = 0.1
OVERSIZED_BYTES = 26 * 2**20  # over server.py's default 25 MB body limit
# "all slots (or connections) busy" is retried as real clients do, BUSY_RETRIES times, then lost
BUSY_RETRIES = 20
BUSY_STATUSES = (429, 503)
BUSY_CLOSE_CODE = 1013  # WebSocket "try again later"


@dataclass
class Sample:
    name: str
    chat_audio: str  # base64 of the WAV file, as /chat takes it
    realtime_chunks: list[str]  # base64 PCM16 at 24 kHz, 100 ms per input_audio_buffer.append


@dataclass
class Target:
    url: str
    headers: dict
    timeout: float
    output_rate: int
    samples: list[Sample]
    too_long_audio: str  # base64 FLAC of silence over the model's max_input_seconds

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")


@dataclass
class Outcome:
    result: str  # what happened, e.g. "completed", "HTTP 400 bad_json", "error event invalid_json"
    lost: bool = False
    ttfa_s: float | None = None
    audio_bytes: int = 0
    reply_key: tuple | None = None  # valid replies to the same request: must be equally long
    busy_retries: int = 0
    detail: str = ""
    action: str = ""  # the runner fills in these two from MIX
    category: str = ""


def load_samples() -> list[Sample]:
    samples = []
    for path in SAMPLES:
        audio, rate = sf.read(path, dtype="float32")
        pcm = float_to_pcm16(soxr.resample(audio, rate, REALTIME_RATE), rounding="truncate").tobytes()
        step = int(REALTIME_RATE * REALTIME_CHUNK_S) * 2
        chunks = [base64.b64encode(pcm[i:i + step]).decode() for i in range(0, len(pcm), step)]
        samples.append(Sample(path.name, base64.b64encode(path.read_bytes()).decode(), chunks))
    return samples


def silence_flac(seconds: float, rate: int = 16000) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(seconds * rate), np.float32), rate, format="FLAC")
    return base64.b64encode(buffer.getvalue()).decode()


# -- valid replies -------------------------------------------------------------------------------
def chat_reply(t: Target, rng: random.Random, action: str = "chat_reply", **options) -> Outcome:
    sample, tokens = rng.choice(t.samples), rng.choice(REPLY_TOKENS)
    body = {"audio": sample.chat_audio, "max_tokens": tokens, **options}
    for retry in range(BUSY_RETRIES + 1):  # noqa: B007 - the count is read after the loop
        reply = post_chat(t.url, body, t.output_rate, t.timeout, t.headers)
        if reply["status"] not in BUSY_STATUSES:
            break
        time.sleep(float(reply.get("retry_after") or 1))
    outcome = Outcome("completed", busy_retries=retry, reply_key=(action, sample.name, tokens))
    if reply["status"] != 200:
        status = reply["status"]
        outcome.result = f"HTTP {status}" if status else reply["error"].split(":")[0]  # the transport error
        outcome.lost, outcome.detail = True, reply["error"][:300]
    elif not reply["bytes"] or reply["bytes"] % 2:
        outcome.result, outcome.lost = "empty stream" if not reply["bytes"] else "odd-length stream", True
        outcome.detail = f"{reply['bytes']} bytes"
    else:
        outcome.ttfa_s, outcome.audio_bytes = reply["ttfa_s"], reply["bytes"]
    return outcome


def chat_huge_seed(t: Target, rng: random.Random) -> Outcome:
    return chat_reply(t, rng, "chat_huge_seed", seed=2**62)


def chat_tiny_temperature(t: Target, rng: random.Random) -> Outcome:
    """Sampled (top_k off) at a temperature that underflows logits/temperature to inf."""
    return chat_reply(t, rng, "chat_tiny_temperature", temperature=1e-39, top_k=None)


class RealtimeFailure(Exception):
    def __init__(self, reason: str, busy: bool = False) -> None:
        super().__init__(reason)
        self.busy = busy


def refused_as_busy(err: Exception) -> bool:
    """A realtime session refused because the server is full: an error event "busy", close code
    1013, or a 429/503 to the WebSocket upgrade."""
    if isinstance(err, InvalidStatus):
        return err.response.status_code in BUSY_STATUSES
    return isinstance(err, RealtimeFailure) and err.busy


@contextlib.contextmanager
def realtime_session(t: Target, max_tokens: int, deadline: float):
    """A connected /v1/realtime session with manual turns, after session.updated."""
    with connect(t.ws_url + "/v1/realtime", additional_headers=t.headers, open_timeout=t.timeout,
                 close_timeout=2, max_size=2**25) as ws:
        next_event(ws, deadline, "session.created")
        send(ws, {"type": "session.update", "session": {"type": "realtime", "max_output_tokens": max_tokens,
                                                        "audio": {"input": {"turn_detection": None}}}})
        next_event(ws, deadline, "session.updated")
        yield ws


def send(ws, event: dict) -> None:
    ws.send(json.dumps(event))


def next_event(ws, deadline: float, *wanted: str, seen: Callable[[dict], None] | None = None) -> dict:
    """Events until one of a ``wanted`` type (the others passed to ``seen``); an error event, a
    close or the deadline is a RealtimeFailure."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RealtimeFailure(f"timeout waiting for {' or '.join(wanted)}")
        try:
            event = json.loads(ws.recv(timeout=remaining))
        except TimeoutError:
            raise RealtimeFailure(f"timeout waiting for {' or '.join(wanted)}") from None
        except ConnectionClosed as err:
            code = err.rcvd.code if err.rcvd else None
            raise RealtimeFailure(f"closed ({code or 'no close frame'})", busy=code == BUSY_CLOSE_CODE) from None
        if event.get("type") in wanted:
            return event
        if event.get("type") == "error":
            code = event["error"].get("code")
            raise RealtimeFailure(f"error event {code}", busy=code == "busy")
        if seen:
            seen(event)


def ask_for_response(ws, sample: Sample, deadline: float) -> float:
    for chunk in sample.realtime_chunks:
        send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
    send(ws, {"type": "input_audio_buffer.commit"})
    next_event(ws, deadline, "input_audio_buffer.committed")
    send(ws, {"type": "response.create"})
    return time.perf_counter()


def read_reply(ws, deadline: float) -> tuple[dict, int, float | None]:
    """The response after response.create: (response.done's response, audio bytes, first delta time)."""
    audio = {"bytes": 0, "first": None}

    def on_event(event: dict) -> None:
        if event["type"] == "response.output_audio.delta":
            audio["first"] = audio["first"] or time.perf_counter()
            audio["bytes"] += len(base64.b64decode(event["delta"]))

    done = next_event(ws, deadline, "response.done", seen=on_event)["response"]
    return done, audio["bytes"], audio["first"]


def realtime_reply(t: Target, rng: random.Random) -> Outcome:
    sample, tokens = rng.choice(t.samples), rng.choice(REPLY_TOKENS)
    outcome = Outcome("completed", reply_key=("realtime_reply", sample.name, tokens))
    for retry in range(BUSY_RETRIES + 1):
        outcome.busy_retries = retry
        deadline = time.monotonic() + t.timeout
        try:
            with realtime_session(t, tokens, deadline) as ws:
                asked = ask_for_response(ws, sample, deadline)
                done, audio_bytes, first = read_reply(ws, deadline)
        except (RealtimeFailure, InvalidStatus) as err:
            if refused_as_busy(err) and retry < BUSY_RETRIES:
                time.sleep(1)
                continue
            outcome.result, outcome.lost = str(err) if isinstance(err, RealtimeFailure) else "connect refused", True
            outcome.detail = str(err)[:300]
            return outcome
        except OSError as err:
            outcome.result, outcome.lost, outcome.detail = "connect failed", True, str(err)[:300]
            return outcome
        break
    if done["status"] != "completed" or not audio_bytes:
        outcome.result, outcome.lost = f"response.done {done['status']}", True
        outcome.detail = f"{audio_bytes} bytes, {json.dumps(done.get('status_details'))}"[:300]
    else:
        outcome.ttfa_s, outcome.audio_bytes = first - asked, audio_bytes
    return outcome


# -- hostile requests ----------------------------------------------------------------------------
def refused(send_request: Callable[[], requests.Response], closing_is_fine: bool = False) -> Outcome:
    """A hostile /chat request: a 4xx is right (a busy 503 is fair too), another 5xx or no answer is
    a lost reply, a 2xx is noted."""
    try:
        with send_request() as response:
            status = response.status_code
            if status < 400:
                for _ in response.iter_content(65536):  # accepted after all: read it to the end
                    pass
                return Outcome(f"accepted ({status})")
            try:
                kind = response.json()["error"]["type"]
            except (ValueError, KeyError, TypeError):
                kind = "non-JSON body"
    except requests.Timeout:
        return Outcome("no answer (timeout)", lost=True)
    except requests.ConnectionError as err:
        return Outcome("connection closed", lost=not closing_is_fine, detail=str(err)[:300])
    return Outcome(f"HTTP {status} {kind}", lost=status >= 500 and status not in BUSY_STATUSES)


def post_body(t: Target, body: bytes | object) -> Callable[[], requests.Response]:
    headers = {**t.headers, "Content-Type": "application/json"}
    return lambda: requests.post(t.url + "/chat", data=body, headers=headers, timeout=t.timeout, stream=True)


def malformed_json(t: Target, rng: random.Random) -> Outcome:
    body = rng.choice([b"{not json", b"[1, 2]", b"", b'{"audio": ', b"\xff\xfe\x00"])
    return refused(post_body(t, body))


def bad_base64(t: Target, rng: random.Random) -> Outcome:
    return refused(post_body(t, json.dumps({"audio": "%%%not base64", "max_tokens": 20}).encode()))


def not_audio(t: Target, rng: random.Random) -> Outcome:
    junk = base64.b64encode(b"RIFF" + rng.randbytes(4000)).decode()  # a WAV's magic, then noise
    return refused(post_body(t, json.dumps({"audio": junk, "max_tokens": 20}).encode()))


WRONG_TYPES = [{"stream_stride": "fast"}, {"top_k": "x"}, {"temperature": "hot"}, {"max_tokens": [30]},
               {"top_p": {"a": 1}}, {"seed": "x"}]


def wrong_option_type(t: Target, rng: random.Random) -> Outcome:
    body = {"audio": rng.choice(t.samples).chat_audio, "max_tokens": 20, **rng.choice(WRONG_TYPES)}
    return refused(post_body(t, json.dumps(body).encode()))


def too_long_audio(t: Target, rng: random.Random) -> Outcome:
    return refused(post_body(t, json.dumps({"audio": t.too_long_audio, "max_tokens": 20}).encode()))


def oversized_body(t: Target, rng: random.Random) -> Outcome:
    """Sent chunked (no Content-Length), so the server has to count while it reads; it may answer
    413 and close before the upload ends."""
    def body():
        yield b'{"audio": "'
        for _ in range(OVERSIZED_BYTES // 2**20):
            yield b"A" * 2**20
    return refused(post_body(t, body()), closing_is_fine=True)


def half_sent(t: Target, rng: random.Random) -> Outcome:
    """Headers promising a body, part of it, then the client vanishes."""
    where = urlsplit(t.url)
    head = ["POST /chat HTTP/1.1", f"Host: {where.netloc}", "Content-Type: application/json",
            "Content-Length: 100000", *(f"{k}: {v}" for k, v in t.headers.items())]
    try:
        with socket.create_connection((where.hostname, where.port or 80), timeout=t.timeout) as raw:
            raw.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b'{"audio": "' + b"A" * rng.randint(0, 5000))
    except OSError as err:
        return Outcome("connect failed", lost=True, detail=str(err)[:300])
    return Outcome("dropped")


BAD_EVENTS = [
    "{not json", "[1, 2]", b"\x00\x01",
    {"type": "no.such.event"},
    {"type": "input_audio_buffer.append", "audio": "***"},
    {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"odd").decode()},
    {"type": "input_audio_buffer.commit"},  # nothing buffered
    {"type": "response.create"},  # nothing committed
    {"type": "session.update", "session": "not an object"},
    {"type": "session.update", "session": {"type": "realtime", "zoo": {"options": {"top_p": 9}}}},
    {"type": "session.update", "session": {"type": "realtime", "max_output_tokens": "many"}},
]


def realtime_bad_event(t: Target, rng: random.Random) -> Outcome:
    """One malformed event; the server's next event must be an error, and the socket stay open."""
    event = rng.choice(BAD_EVENTS)
    deadline = time.monotonic() + t.timeout
    try:
        with connect(t.ws_url + "/v1/realtime", additional_headers=t.headers, open_timeout=t.timeout,
                     close_timeout=2) as ws:
            next_event(ws, deadline, "session.created")
            ws.send(event if isinstance(event, (str, bytes)) else json.dumps(event))
            answer = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
    except TimeoutError:
        return Outcome("no answer (timeout)", lost=True)
    except ConnectionClosed as err:
        return Outcome(f"closed ({err.rcvd.code if err.rcvd else 'no close frame'})")
    except (RealtimeFailure, OSError, InvalidStatus) as err:
        busy = refused_as_busy(err)
        return Outcome("refused: busy" if busy else "connect failed", lost=not busy, detail=str(err)[:300])
    if answer.get("type") != "error":
        return Outcome(f"accepted ({answer.get('type')})", detail=json.dumps(event))
    return Outcome(f"error event {answer['error'].get('code')}")


# -- disconnects ---------------------------------------------------------------------------------
def chat_drop(t: Target, rng: random.Random) -> Outcome:
    body = {"audio": rng.choice(t.samples).chat_audio, "max_tokens": DROP_TOKENS}
    try:
        with requests.post(t.url + "/chat", json=body, headers=t.headers, stream=True, timeout=t.timeout) as response:
            if response.status_code != 200:  # busy is fair; another 5xx is a server fault
                return Outcome(f"HTTP {response.status_code}",
                               lost=response.status_code >= 500 and response.status_code not in BUSY_STATUSES)
            if not next(response.iter_content(4096), None):
                return Outcome("empty stream", lost=True)
    except requests.RequestException as err:
        return Outcome(type(err).__name__, lost=True, detail=str(err)[:300])
    return Outcome("dropped after the first chunk")


def realtime_drop(t: Target, rng: random.Random) -> Outcome:
    """Leaves without a close frame: the TCP connection just ends, as when a laptop lid shuts."""
    deadline = time.monotonic() + t.timeout
    try:
        with realtime_session(t, DROP_TOKENS, deadline) as ws:
            ask_for_response(ws, rng.choice(t.samples), deadline)
            first = next_event(ws, deadline, "response.output_audio.delta", "response.done")
            if first["type"] == "response.done":  # the reply failed before it could be dropped
                return Outcome(f"response.done {first['response']['status']} before any audio", lost=True,
                               detail=json.dumps(first["response"].get("status_details"))[:300])
            ws.socket.shutdown(socket.SHUT_RDWR)
    except (RealtimeFailure, InvalidStatus) as err:
        return Outcome(str(err) if isinstance(err, RealtimeFailure) else "connect refused", lost=not refused_as_busy(err),
                       detail=str(err)[:300])
    except OSError as err:
        return Outcome("connect failed", lost=True, detail=str(err)[:300])
    return Outcome("dropped after the first delta")


# weights: about 6 in 10 actions are valid replies, a quarter hostile, one in ten a disconnect
Action = Callable[[Target, random.Random], Outcome]
MIX: dict[str, tuple[Action, str, int]] = {  # name -> (function, category, weight)
    "chat_reply": (chat_reply, "valid", 30),
    "realtime_reply": (realtime_reply, "valid", 20),
    "chat_huge_seed": (chat_huge_seed, "valid", 4),
    "chat_tiny_temperature": (chat_tiny_temperature, "valid", 4),
    "malformed_json": (malformed_json, "hostile", 3),
    "bad_base64": (bad_base64, "hostile", 2),
    "not_audio": (not_audio, "hostile", 3),
    "wrong_option_type": (wrong_option_type, "hostile", 3),
    "too_long_audio": (too_long_audio, "hostile", 3),
    "oversized_body": (oversized_body, "hostile", 1),
    "half_sent": (half_sent, "hostile", 3),
    "realtime_bad_event": (realtime_bad_event, "hostile", 6),
    "chat_drop": (chat_drop, "disconnect", 5),
    "realtime_drop": (realtime_drop, "disconnect", 5),
}
