"""The Gradio page as a public Hugging Face Space (space/app.py runs ``main``): the same page as
webui/omni_gradio.py (``webui.gradio_chat.build``), with what a page open to everyone needs.

- The model: ``OMNI_ZOO_MODEL`` (default: zoo.cli's default model). A comma-separated list offers several in the
  page's picker: the first loads at start, the others on first use (the status says so), and the
  least recently used idle model is unloaded when memory runs short or ``OMNI_ZOO_MAX_LOADED``
  models are held. ``OMNI_ZOO_RANDOM_WEIGHTS=tiny`` (or ``--tiny``) runs random weights, under a
  banner that says so.
- The GPU: on ZeroGPU the reply's GPU work runs inside ``spaces.GPU(duration=...)``, a duration
  fitted to the page's reply cap; without the ``spaces`` package the same code runs on a
  dedicated GPU or the CPU (a stand-in decorator that does nothing).
- Queue: ``OMNI_ZOO_CONCURRENCY`` replies of each model at once; the others wait in Gradio's queue
  (at most ``OMNI_ZOO_QUEUE_SIZE``), which shows each visitor their place.
- Per visitor: ``OMNI_ZOO_RATE_PER_MINUTE`` questions a minute and questions up to
  ``OMNI_ZOO_MAX_RECORDING_S`` seconds; more is refused at once with a message saying why.
  Replies are capped to ``OMNI_ZOO_MAX_REPLY_S`` seconds.
- Nothing is kept: each recording is deleted once answered and Gradio deletes its cached files
  (the streamed reply, waveforms) after ``OMNI_ZOO_CACHE_S`` seconds, unless the operator sets
  ``OMNI_ZOO_KEEP_DIR``: then each exchange (question, reply audio, text) is saved there.
- An "about" panel per model: the card's facts, paper, license, measured time to first audio and
  this page's own.
- Weights come from the hub into ``HF_HOME``, on the persistent ``/data`` volume when the Space
  has one (``webui.space_env``), so a restart does not download them again.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import gradio as gr
import numpy as np
import soundfile as sf

import zoo
from webui.client import BackendError, BackendInfo
from webui.gradio_chat import PAGE_CSS, WAVEFORMS, PublicPolicy, build
from zoo.cli import DEFAULT_MODEL, add_model_flags, component_values, noise_notice, noise_notice_for, random_weights
from zoo.core.types import ModelCard, VoiceModel

# a reply's GPU time: what the page allows as audio, at worst real time (a streamed reply that
# is slower than real time stutters anyway), plus the question's encoding and prefill
GPU_MARGIN_S = 15
GPU_REAL_TIME_FACTOR = 1.0
ZERO_GPU_MAX_S = 120  # ZeroGPU refuses longer requests for most accounts


@dataclass
class Settings:
    """The page's knobs, from the environment (the Space's variables)."""

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    random_weights: str | None = None
    device: str | None = None
    dtype: str | None = None
    concurrency: int = 1  # replies of one model at once
    queue_size: int = 32  # visitors waiting, all models together
    rate_per_minute: int = 6  # questions per visitor per minute
    max_recording_s: float = 30.0
    max_reply_s: float = 30.0
    cache_s: int = 300  # Gradio's cached files (streamed replies, waveforms) live at most this long
    keep_dir: Path | None = None  # the operator's opt-in: every exchange is saved there
    max_loaded: int = 0  # models held in memory at once; 0: as many as fit

    @classmethod
    def from_env(cls, env: dict | None = None) -> Settings:
        env = os.environ if env is None else env

        def number(name: str, default, kind=int):
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise SystemExit(f"error: {name}={raw!r} is not a number") from None
            if value < 0 or not math.isfinite(value):
                raise SystemExit(f"error: {name} must be a positive number, got {raw!r}")
            return value

        models = [m.strip() for m in env.get("OMNI_ZOO_MODEL", "").split(",") if m.strip()] or [DEFAULT_MODEL]
        unknown = [m for m in models if m not in zoo.names()]
        if unknown:
            raise SystemExit(f"error: OMNI_ZOO_MODEL names unknown model(s) {unknown}; available: {zoo.names()}")
        keep = env.get("OMNI_ZOO_KEEP_DIR", "").strip()
        return cls(models=list(dict.fromkeys(models)), random_weights=env.get("OMNI_ZOO_RANDOM_WEIGHTS") or None,
                   device=env.get("OMNI_ZOO_DEVICE") or None, dtype=env.get("OMNI_ZOO_DTYPE") or None,
                   concurrency=max(1, number("OMNI_ZOO_CONCURRENCY", 1)),
                   queue_size=max(1, number("OMNI_ZOO_QUEUE_SIZE", 32)),
                   rate_per_minute=max(1, number("OMNI_ZOO_RATE_PER_MINUTE", 6)),
                   max_recording_s=number("OMNI_ZOO_MAX_RECORDING_S", 30.0, float) or 30.0,
                   max_reply_s=number("OMNI_ZOO_MAX_REPLY_S", 30.0, float) or 30.0,
                   cache_s=max(1, number("OMNI_ZOO_CACHE_S", 300)),
                   keep_dir=Path(keep) if keep else None, max_loaded=number("OMNI_ZOO_MAX_LOADED", 0))

    def gpu_duration(self) -> int:
        """Seconds of GPU one reply may take (``spaces.GPU(duration=...)``)."""
        return min(ZERO_GPU_MAX_S, math.ceil(GPU_MARGIN_S + self.max_reply_s * GPU_REAL_TIME_FACTOR))


def gpu(duration: int) -> Callable:
    """``spaces.GPU(duration=duration)`` on Hugging Face's ZeroGPU; elsewhere (no ``spaces``
    package: a dedicated GPU, the CPU, these tests) a stand-in that returns the function as is."""
    try:
        import spaces
    except ImportError:
        return lambda function: function
    return spaces.GPU(duration=duration)


# -- the models ----------------------------------------------------------------------------------
def needed_bytes(card: ModelCard, random: str | None) -> int:
    """Memory a model is expected to take, from the card's download size (its first "N GB")."""
    if random == "tiny":
        return 0
    found = re.search(r"([\d.]+)\s*GB", card.download_size)
    return int(float(found[1]) * 1e9) if found else 0


def free_bytes() -> int | None:
    """Free memory where the models live: the GPU's if there is one, else the machine's."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            free, _total = torch.cuda.mem_get_info()
            return int(free)
    except Exception:  # noqa: BLE001 - no answer means no pressure known
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class SpaceBackend:
    """The page's models in this process: ``models()`` lists every offered model from its card
    (loaded or not), ``stream`` loads one on first use, unloading idle ones under memory pressure,
    and runs its reply inside the GPU decorator, capped to the page's reply length."""

    def __init__(self, settings: Settings, load: Callable[[str], VoiceModel],
                 free: Callable[[], int | None] = free_bytes) -> None:
        self.settings, self._load, self._free = settings, load, free
        self.cards = {name: zoo.card(name) for name in settings.models}
        self.loaded: collections.OrderedDict[str, VoiceModel] = collections.OrderedDict()  # least recent first
        self.active = collections.Counter()  # replies streaming, per model
        self.slots = {name: threading.BoundedSemaphore(settings.concurrency) for name in settings.models}
        self.lock = threading.Lock()
        self.load_locks = {name: threading.Lock() for name in settings.models}
        self.unloaded: list[str] = []  # what was unloaded, in order (the log and the tests read it)
        self._generate = gpu(settings.gpu_duration())(self._generate_on_gpu)

    # what the page reads
    def reply_cap(self, name: str) -> int:
        """The most ``max_new_tokens`` a reply gets on this page."""
        return max(1, round(self.settings.max_reply_s * self.cards[name].reply_tokens_per_second))

    def default_cap(self, name: str) -> int:
        model = self.loaded.get(name)
        own = model.default_max_new_tokens if model is not None else (
            max(1, round(zoo.RANDOM_REPLY_SECONDS * self.cards[name].reply_tokens_per_second))
            if self.settings.random_weights else None)
        return min(own or self.reply_cap(name), self.reply_cap(name))

    def info(self, name: str) -> BackendInfo:
        card = self.cards[name]
        random = self.settings.random_weights
        notices = [noise_notice_for(card, random, self.default_cap(name)) if random else None,
                   "THIS PAGE KEEPS WHAT YOU SAY: every question and reply is saved for its operator"
                   if self.settings.keep_dir is not None else None]
        notice = "; ".join(n for n in notices if n) or None
        return BackendInfo(name, card.output_sample_rate, random is not None, "this Space", duplex=card.duplex,
                           input_sample_rate=card.input_sample_rate, frame_samples=card.frame_samples or 0,
                           text_output=card.text_output, notice=notice, default_max_new_tokens=self.default_cap(name),
                           image_input=card.image_input)

    def models(self) -> list[BackendInfo]:
        return [self.info(name) for name in self.settings.models]

    def loading_note(self, name: str | None) -> str | None:
        if name in self.cards and name not in self.loaded:
            return f"loading {name} (its first use here: its weights are fetched and loaded, which can take minutes)…"
        return None

    # loading and unloading
    def model(self, name: str) -> VoiceModel:
        """The loaded model, loading it first if need be (idle models make room)."""
        with self.load_locks[name]:
            with self.lock:
                if name in self.loaded:
                    self.loaded.move_to_end(name)
                    return self.loaded[name]
                self._make_room(name)
            try:
                model = self._load(name)
            except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
                if "out of memory" not in str(err).lower() and not isinstance(err, MemoryError):
                    raise
                with self.lock:
                    self._make_room(name, everything=True)
                model = self._load(name)
            with self.lock:
                self.loaded[name] = model
            return model

    def _make_room(self, name: str, everything: bool = False) -> None:
        """Unload idle models, least recently used first, until ``name`` should fit (called under
        the lock)."""
        need = needed_bytes(self.cards[name], self.settings.random_weights)
        limit = self.settings.max_loaded
        for other in list(self.loaded):
            free = self._free()
            crowded = bool(limit) and len(self.loaded) >= limit
            short = free is not None and free < need * 1.2
            if not (everything or crowded or short):
                break
            if self.active[other]:
                continue  # answering someone: kept
            del self.loaded[other]
            self.unloaded.append(other)
            print(f"unloaded {other} to make room for {name}", flush=True)
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - best effort
                pass

    # replies
    def capped(self, name: str, options: dict | None) -> dict:
        options = dict(options or {})
        asked = options.get("max_new_tokens")
        options["max_new_tokens"] = min(asked, self.reply_cap(name)) if asked else self.default_cap(name)
        return options

    def _generate_on_gpu(self, name: str, wav: bytes, options: dict, image: bytes | None) -> Iterator:
        """The GPU work of one reply (ZeroGPU runs it inside ``spaces.GPU``)."""
        yield from self.loaded[name].respond(wav, options=options, image=image)

    def stream(self, wav: bytes, options: dict | None = None, model: str | None = None,
               image: bytes | None = None) -> Iterator:
        """As the other backends: ``image`` goes with the question only where the card says
        image_input (the page hides its input otherwise, so a stray one is dropped, not refused)."""
        name = model or self.settings.models[0]
        if name not in self.cards:
            raise BackendError(f"this page offers {', '.join(self.settings.models)}, not {name!r}")
        with self.slots[name]:
            with self.lock:
                self.active[name] += 1
            try:
                try:
                    self.model(name)
                except zoo.ZooError as err:
                    raise BackendError(f"{name} could not be loaded: {err}") from None
                try:
                    picture = image if image and self.cards[name].image_input else None
                    yield from self._generate(name, wav, self.capped(name, options), picture)
                except Exception as err:  # zoo errors carry clear messages: show them, the page goes on
                    raise BackendError(str(err)) from None
            finally:
                with self.lock:
                    self.active[name] -= 1


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


# -- the program -----------------------------------------------------------------------------------
def create(settings: Settings, args: argparse.Namespace | None = None,
           load: Callable[[str], VoiceModel] | None = None) -> tuple[gr.Blocks, SpaceBackend]:
    """The page and its backend; the first model is loaded now (a Space is ready once it serves)."""
    first = settings.models[0]

    def load_model(name: str) -> VoiceModel:
        components = component_values(args, zoo.card(name)) if args is not None and name == first else {}
        model = zoo.load(name, device=settings.device, dtype=settings.dtype, random_weights=settings.random_weights,
                         **components)
        print(f"loaded {name}" + (f" ({noise_notice(model)})" if model.random_weights else ""), flush=True)
        return model

    backend = SpaceBackend(settings, load or load_model)
    backend.model(first)
    policy = SpacePolicy(settings, backend)
    demo = build(backend, live_api=None, policy=policy)
    demo.queue(default_concurrency_limit=policy.concurrency_limit, max_size=settings.queue_size)
    # Gradio's cached copies go whether or not the operator keeps exchanges (those go to keep_dir)
    CacheSweeper([gradio_cache(), WAVEFORMS], age=settings.cache_s, every=policy.sweep_every,
                 in_use=policy.in_use).start()
    return demo, backend


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser, argv, default=settings.models[0])
    page = parser.add_argument_group("page")
    page.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                      help="default GRADIO_SERVER_NAME, else 0.0.0.0 (what a Space expects)")
    page.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                      help="default GRADIO_SERVER_PORT, else 7860")
    args = parser.parse_args(argv)
    if args.model != settings.models[0]:  # --model wins over the environment's first model
        settings.models = [args.model] + [m for m in settings.models if m != args.model]
    settings.random_weights = random_weights(args) or settings.random_weights
    settings.device, settings.dtype = args.device or settings.device, args.dtype or settings.dtype
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        demo, _backend = create(settings, args)
    except zoo.ZooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, css=PAGE_CSS, max_file_size="25mb", ssr_mode=False,
                footer_links=[])
    return 0
