"""The Space's rules for a page open to everyone (``SpacePolicy``, the gradio_chat ``PublicPolicy``
of webui/space.py): who is asking, the per-visitor rate and recording limits, what is kept
(nothing unless the operator says so) and swept from Gradio's cache, and the about panel.
"""
from __future__ import annotations

import collections
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path

import gradio as gr
import numpy as np
import soundfile as sf

from webui.gradio_chat import PublicPolicy
from webui.space_backend import Settings, SpaceBackend
from zoo.core.types import ModelCard


# -- the public page's rules ---------------------------------------------------------------------
def visitor(request: gr.Request | None) -> str:
    """Who is asking: the address the Space's proxy saw (X-Forwarded-For's first entry), else the
    connection's; the browser session when neither is known. A visitor who forges the header can
    dodge the rate limit, not the queue: its concurrency and size bounds hold for everyone."""
    if request is None:
        return "anonymous"
    forwarded = (request.headers.get("x-forwarded-for") or "").split(",")[0].strip()
    host = getattr(request.client, "host", None)
    return forwarded or host or getattr(request, "session_hash", None) or "anonymous"


class RateLimit:
    """At most ``per_minute`` questions per visitor in any 60 s."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.clock = per_minute, clock
        self.asked: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.lock = threading.Lock()

    def take(self, who: str) -> float | None:
        """Count a question; None if allowed, else the seconds until the next one is."""
        now = self.clock()
        with self.lock:
            asked = self.asked[who]
            while asked and now - asked[0] >= 60:
                asked.popleft()
            if len(asked) >= self.per_minute:
                return 60 - (now - asked[0])
            asked.append(now)
            if len(self.asked) > 10000:  # forget visitors with nothing in the window
                for key in [k for k, v in self.asked.items() if not v]:
                    del self.asked[key]
            return None


def seconds_of(path: str) -> float | None:
    """The recording's length from its header (None when soundfile cannot tell)."""
    try:
        info = sf.info(path)
    except Exception:  # noqa: BLE001 - the model's own checks decide then
        return None
    return info.frames / info.samplerate if info.samplerate else None


class SpacePolicy(PublicPolicy):
    resend_button = False  # recordings are deleted once answered
    api_visibility = "private"  # questions come through the page, past its checks

    def __init__(self, settings: Settings, backend: SpaceBackend) -> None:
        self.settings, self.backend = settings, backend
        self.concurrency_limit = settings.concurrency * len(settings.models)
        self.concurrency_id = "omni-zoo-replies"
        self.max_recording_s = min([settings.max_recording_s] + [c.max_input_seconds for c in backend.cards.values()])
        # Gradio's own delete_cache stays off: it would delete a question still waiting in the queue
        # (and it misses the streamed chunks); the page's CacheSweeper does both right
        self.sweep_every = max(1, min(60, settings.cache_s // 2))
        self.rate = RateLimit(settings.rate_per_minute)
        self.waiting: dict[str, float] = {}  # questions admitted and not yet answered -> when
        self.lock = threading.Lock()
        self.ttfa: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=200))

    def check(self, recording: str | None, request: gr.Request) -> None:
        if not recording:
            return
        seconds = seconds_of(recording)
        if seconds is not None and seconds > self.max_recording_s + 0.5:
            forget(recording)
            raise gr.Error(f"Your question is {seconds:.0f} s long; this page takes questions up to "
                           f"{self.max_recording_s:g} s. Please ask a shorter one.", title="Question too long",
                           print_exception=False)
        wait = self.rate.take(visitor(request))
        if wait is not None:
            forget(recording)
            raise gr.Error(f"Too many questions: this page answers at most {self.rate.per_minute} questions a "
                           f"minute per visitor. Please try again in {math.ceil(wait)} s.", title="Please wait",
                           print_exception=False)
        with self.lock:
            now = time.time()
            for path in [p for p, since in self.waiting.items() if now - since > 3600]:  # given up on
                del self.waiting[path]
            self.waiting[str(Path(recording))] = now

    def in_use(self) -> list[str]:
        """The recordings waiting in the queue: the cache sweeper leaves them alone."""
        with self.lock:
            return list(self.waiting)

    def turn_ended(self, recording, model, text, audio, sample_rate, ttfa_ms, error) -> None:
        with self.lock:
            self.waiting.pop(str(Path(recording)), None)
        if error is None and ttfa_ms is not None:
            self.ttfa[model].append(ttfa_ms)
        if self.settings.keep_dir is not None:
            try:
                keep(self.settings.keep_dir, recording, model, text, audio, sample_rate, ttfa_ms, error)
            except OSError as err:
                print(f"could not keep the exchange in {self.settings.keep_dir}: {err}", file=sys.stderr, flush=True)
        forget(recording)

    def about(self, model: str | None) -> str | None:
        if model not in self.backend.cards:
            return "No model chosen."
        return about_markdown(self.backend.cards[model], self.settings, self.ttfa.get(model, ()),
                              self.backend.reply_cap(model), self.max_recording_s)


class CacheSweeper(threading.Thread):
    """Every ``every`` s, deletes the files under ``folders`` older than ``age`` s (and the folders
    they leave empty). Gradio's ``delete_cache`` alone is not enough: it forgets the files it
    writes for each chunk of a streamed reply, which would stay until the Space restarts, and it
    deletes an upload still waiting in the queue; ``in_use`` names the files to leave alone."""

    def __init__(self, folders: list[Path], age: float, every: float,
                 in_use: Callable[[], Collection[str]] = tuple) -> None:
        super().__init__(name="cache-sweeper", daemon=True)
        self.folders, self.age, self.every, self.in_use = folders, age, every, in_use

    def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        deleted, in_use = 0, {str(Path(p)) for p in self.in_use()}
        for root in self.folders:
            for folder, _dirs, files in os.walk(root, topdown=False):
                for name in files:
                    path = Path(folder, name)
                    if str(path) in in_use:  # a question still waiting for its reply
                        continue
                    try:
                        if now - max(path.lstat().st_mtime, path.lstat().st_ctime) > self.age:
                            path.unlink()
                            deleted += 1
                    except OSError:
                        continue
                if Path(folder) != Path(root):
                    try:
                        Path(folder).rmdir()  # only if empty
                    except OSError:
                        pass
        return deleted

    def run(self) -> None:
        while True:
            time.sleep(self.every)
            try:
                self.sweep()
            except Exception as err:  # noqa: BLE001 - the next sweep tries again
                print(f"cache sweep failed: {err}", file=sys.stderr, flush=True)


def gradio_cache() -> Path:
    """Where Gradio keeps uploads and the files it serves (``GRADIO_TEMP_DIR``)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def forget(recording: str) -> None:
    """Delete an uploaded recording (and Gradio's folder for it, once empty)."""
    path = Path(recording)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def keep(folder: Path, recording: str, model: str, text: str, audio: np.ndarray, sample_rate: int,
         ttfa_ms: float | None, error: str | None) -> Path:
    """The operator asked for exchanges to be kept: question, reply audio and a JSON record."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    turn = folder / f"{stamp}-{model}"
    turn.mkdir(parents=True, exist_ok=True)
    if Path(recording).is_file():
        shutil.copyfile(recording, turn / ("question" + (Path(recording).suffix or ".wav")))
    if audio.size:
        sf.write(turn / "reply.wav", audio, sample_rate)
    (turn / "turn.json").write_text(json.dumps({"model": model, "text": text, "ttfa_ms": ttfa_ms, "error": error,
                                                "reply_seconds": audio.size / sample_rate, "utc": stamp}, indent=1))
    return turn


def about_markdown(card: ModelCard, settings: Settings, ttfa: Collection, reply_cap: int,
                   max_recording_s: float) -> str:
    mode = "full duplex (answered turn by turn on this page)" if card.duplex else "turn by turn"
    weights = (f"**random ({settings.random_weights})**: every reply is noise" if settings.random_weights
               else ", ".join(card.components.values()))
    here = (f"median {statistics.median(ttfa):.0f} ms over the last {len(ttfa)} replies" if ttfa
            else "no reply yet since it started")
    kept = ("the operator keeps every exchange (OMNI_ZOO_KEEP_DIR)" if settings.keep_dir is not None
            else "nothing you say is stored: each recording is deleted once answered, and the page's cached "
                 f"copies of replies within {settings.cache_s} s")
    return "\n".join([
        f"**{card.title}**: {card.description}",
        "",
        f"- Paper: {card.paper or 'none published'}",
        f"- License: {card.license or 'not stated'}",
        f"- Networks: {card.parameters}",
        f"- Weights: {weights}",
        f"- Download: {card.download_size}",
        f"- Hardware: {card.hardware}",
        f"- Audio: {card.input_sample_rate / 1000:g} kHz in, {card.output_sample_rate / 1000:g} kHz out; "
        f"languages {', '.join(card.languages)}; {mode}",
        f"- Time to first audio, measured: {card.measured_ttfa or 'not measured yet'}",
        f"- Time to first audio on this page: {here}",
        f"- This page: {settings.concurrency} {card.name} repl{'y' if settings.concurrency == 1 else 'ies'} at a "
        f"time (the others wait in the queue), {settings.rate_per_minute} questions a minute per visitor, "
        f"questions up to {max_recording_s:g} s, replies up to {settings.max_reply_s:g} s "
        f"({reply_cap} tokens); {kept}.",
    ])


