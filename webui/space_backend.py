"""The Space's settings (``Settings``, from the environment), the GPU decorator (``gpu``: ZeroGPU's
``spaces.GPU`` or a stand-in) and its models (``SpaceBackend``: loaded on first use, unloaded
under memory pressure, a reply cap and a concurrency limit per model). webui/space.py builds the
page on them; its docstring says what each setting does.
"""
from __future__ import annotations

import collections
import gc
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zoo
from webui.client import BackendError, BackendInfo
from zoo.cli import DEFAULT_MODEL, noise_notice_for
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


