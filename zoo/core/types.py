"""The public interface every model in the zoo implements: card, options, chunks, model."""
from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from .errors import OptionsError, UnknownOption, UnsupportedError


@dataclass(frozen=True)
class ModelCard:
    """Static facts about a model, readable without loading it (server and UIs use only this)."""

    name: str
    title: str
    description: str
    input_sample_rate: int
    output_sample_rate: int
    languages: tuple[str, ...]
    parameters: str  # human-readable sizes of the networks, e.g. "0.5B LLM + ..."
    hardware: str  # what it needs to run, in words
    components: Mapping[str, str]  # component name -> default Hugging Face repo id
    max_input_seconds: float
    # generation steps (``max_new_tokens`` units) per second of reply audio, on average: how a
    # cap in seconds becomes a token limit (zoo.load's random-weight reply cap)
    reply_tokens_per_second: float
    duplex: bool = False
    frame_samples: int | None = None  # duplex models: input samples per step
    multi_turn: bool = False  # whether respond() uses ``history``
    text_input: bool = False  # whether respond_text() answers typed questions
    text_output: bool = True  # whether replies carry text (False: audio only, chunk.text is "")
    image_input: bool = False  # whether respond() (and Stepper.prepare) take an ``image`` with the question
    # what the published files of every component take on disk, in words ("≈" where computed from
    # parameter counts rather than read from the published repo); README's model table shows it
    download_size: str = ""
    # the ``dtype`` names that pack the weights (zoo.core.quantize), beside the float dtypes every
    # model takes; () when the model has none
    quantizations: tuple[str, ...] = ()
    # the wire protocols of the model's own reference clients that a server should speak for it
    # (serving/protocols/ names them), each with the model option that each of the protocol's
    # parameters sets, e.g. {"data-url-live": {"token_temp": "temperature"}}
    protocols: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # where the model is described: its paper (or the authors' write-up when there is none)
    paper: str = ""
    # the licenses of the published code and weights, as their authors state them
    license: str = ""
    # time to first audio measured with this code (bench/results/), with the machine and the date;
    # "" when not measured yet
    measured_ttfa: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["components"] = dict(self.components)
        d["protocols"] = {name: dict(params) for name, params in self.protocols.items()}
        d["languages"] = list(self.languages)
        return d


# Seeds are torch.Generator seeds: any int in [0, 2**63) (what JSON clients and int64 fields carry).
SEED_LIMIT = 2**63


@dataclass
class Options:
    """Generation options shared by every model; models subclass it to set their reference defaults
    and add their own fields. A temperature below zoo.core.sampling.MIN_TEMPERATURE (e.g. 0) means
    greedy decoding. ``max_new_tokens`` above ``MAX_NEW_TOKENS`` (what the model's context or time
    budget allows; each model's class sets its own) is lowered to it, as a token limit is a ceiling."""

    MAX_NEW_TOKENS: ClassVar[int] = 1 << 16

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0

    def validate(self) -> Options:
        """Check every field's type (strictly: no strings for numbers, no NaN or infinity) and
        range, in place; returns self. Models' subclasses add their own checks after this one."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked_value(f.name, getattr(self, f.name), type(self), f))
        if not (0.0 <= self.temperature <= 10.0):
            raise OptionsError(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise OptionsError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise OptionsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise OptionsError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.max_new_tokens = min(self.max_new_tokens, self.MAX_NEW_TOKENS)
        if not 0 <= self.seed < SEED_LIMIT:
            raise OptionsError(f"seed must be in [0, 2**63), got {self.seed}")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> Options:
        """Build options from untrusted key/value pairs (JSON): unknown keys and wrong types are
        reported by name instead of surfacing as a TypeError deep inside generation. Types are
        JSON's: a number for a numeric option (a whole float such as 30.0 for an int one), a
        boolean for a flag, a string for a choice; strings are never parsed as numbers (callers
        holding text, e.g. command lines, parse it themselves)."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UnknownOption(f"unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**{name: _checked_value(name, value, cls, known[name]) for name, value in values.items()}).validate()


def _checked_value(name: str, value: Any, cls: type, f: dataclasses.Field) -> Any:
    """``value`` as option ``name``'s kind (int, float, bool or str), or OptionsError."""
    if value is None:
        if "None" not in str(f.type):
            raise OptionsError(f"option {name!r} cannot be null")
        return None
    kind = _option_kind(cls, f)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False  # `true` steps or "10" steps are mistakes, not 1 or 10
    elif isinstance(value, float) and not math.isfinite(value):
        raise OptionsError(f"option {name!r} must be a finite number, got {value!r}")
    else:
        ok = kind is float or isinstance(value, int) or value.is_integer()  # 2.7 steps is not 2
    if not ok:
        raise OptionsError(f"option {name!r} must be {kind.__name__}, got {value!r}")
    try:
        return kind(value)
    except OverflowError:  # an int beyond any float
        raise OptionsError(f"option {name!r} is out of range, got {value!r}") from None


def _option_kind(cls: type, f: dataclasses.Field) -> type:
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, (bool, int, float, str)):
        return type(default)
    annotation = str(f.type)
    for kind in (bool, int, float, str):
        if kind.__name__ in annotation:
            return kind
    return str


@dataclass
class Chunk:
    """One piece of a streamed reply: new audio (float32 mono in [-1, 1] at the card's output
    rate, possibly empty) and the text decoded since the previous chunk (possibly ""). Models whose
    card says ``multi_turn`` set ``turn`` on a reply's last chunk: a JSON-able record of the
    exchange to pass back in ``history`` on the next turn."""

    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    text: str = ""
    turn: Any = None


# -- the serving contract: what zoo.core.scheduler drives ---------------------------------------
class Job(Protocol):
    """One reply being generated (``Stepper.prepare``'s result)."""

    done: bool
    error: Exception | None  # why the job failed (then done is set too); None otherwise

    def poll(self) -> Chunk | None: ...


class Stepper(Protocol):
    """Half-duplex replies of many sessions in one batched step (``VoiceModel.stepper``)."""

    # ``image``: only for cards with image_input; callers go through ``prepare_job``
    def prepare(self, audio: Any, sample_rate: int | None, options: Any, history: Any = None,
                image: Any = None) -> Job: ...
    def start(self, job: Job) -> None: ...
    def step(self, jobs: list[Job]) -> None: ...
    def release(self, job: Job) -> None: ...


@runtime_checkable
class BatchStarter(Protocol):
    """A ``Stepper`` that can also prefill several new jobs in one forward (the scheduler then
    admits a burst of arrivals in batches instead of one prefill each). A job that cannot start
    (its prompt does not fit, ...) gets its own ``error`` and ``done`` and the others start; an
    exception out of ``start_many`` (the batched forward itself failed) fails every job in it.
    The jobs' outputs are those ``start`` one at a time gives (identical tokens, float32)."""

    def start_many(self, jobs: list[Job]) -> None: ...


@runtime_checkable
class ChunkedStarter(Protocol):
    """A ``Stepper`` whose prefill can run in parts (chunked prefill, as vLLM's scheduler runs
    it): the scheduler then bounds the prompt positions it prefills between two decode steps, so
    one long prompt (a long question, a long conversation) never stalls the sessions already
    speaking for its whole prefill. ``prompt_length``: the positions ``job``'s prefill runs.
    ``start_part``: the next ``positions`` of them, appended to its slot's cache (the first call
    takes the slot, as ``start`` does, and raises as ``start`` does); True once the whole prompt is
    in, the job then standing exactly as ``start`` leaves it (its first output drawn: the same
    tokens as ``start``, float32). ``release`` frees a job stopped between parts."""

    def prompt_length(self, job: Job) -> int: ...
    def start_part(self, job: Job, positions: int) -> bool: ...


def check_image(card: ModelCard, image: Any) -> None:
    """The one place a model without vision refuses an image (UnsupportedError)."""
    if image is not None and not card.image_input:
        raise UnsupportedError(f"{card.name} does not take images (its card says image_input=False)")


def prepare_job(stepper: Stepper, card: ModelCard, audio: Any, sample_rate: int | None, options: Any,
                history: Any = None, image: Any = None) -> Job:
    """``stepper.prepare`` for any model: an image goes only to a model whose card takes one (the
    steppers of models without vision have no ``image`` parameter at all)."""
    check_image(card, image)
    if image is None:
        return stepper.prepare(audio, sample_rate, options, history)
    return stepper.prepare(audio, sample_rate, options, history, image=image)


class DuplexStepper(Protocol):
    """Full-duplex sessions over one set of caches (``VoiceModel.duplex_stepper``): ``open``
    returns a handle (a session slot); ``step`` takes one input frame (``card.frame_samples``
    float32 samples at the input rate) per handle and answers, per handle, the model's next frame
    or the Exception that ended (and closed) that session alone; ``close`` frees a slot at once.
    A handle of a model with text output (``card.text_output``) has ``text``: the text piece of
    its last step ("" when none); zoo.core.duplex has what every model's stepper shares."""

    def open(self, options: Any = None, prompt: Any = None, sample_rate: int | None = None) -> Any: ...
    def step(self, handles: Sequence[Any], frames: Sequence[Any]) -> list[np.ndarray | Exception]: ...
    def close(self, handle: Any) -> None: ...
    def nbytes(self) -> int: ...  # device memory held for all slots


@runtime_checkable
class BatchOpener(Protocol):
    """A ``DuplexStepper`` that can also open several sessions with one prompt (a server's) at
    once, the prompt prefilled for all of them in one forward (the duplex scheduler then opens a
    burst of arrivals together): per session its handle or the Exception that kept it from
    opening; an exception out of ``open_many`` (a bad prompt, the batched forward failed) is
    every session's."""

    def open_many(self, options: Sequence[Any], prompt: Any = None,
                  sample_rate: int | None = None) -> list[Any]: ...


class DuplexSession(Protocol):
    """One full-duplex session on a one-slot stepper (``VoiceModel.duplex``)."""

    def step(self, frame: np.ndarray) -> Chunk: ...
    def close(self) -> None: ...
    def __enter__(self) -> DuplexSession: ...
    def __exit__(self, *exc: Any) -> None: ...


class VoiceModel(ABC):
    """A loaded model. ``respond`` streams a reply to one spoken turn."""

    card: ModelCard
    options_class: ClassVar[type[Options]] = Options
    # "tiny" or "full" when zoo.load built the model with seeded random weights (its output is
    # noise, and everything that shows it says so); None for published weights
    random_weights: str | None = None
    # the ``max_new_tokens`` used when a caller sets none (zoo.load sets it for random weights,
    # whose replies rarely stop by themselves); None: the options class's own default
    default_max_new_tokens: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every model's ``respond`` takes ``image=``: a model without vision (its card says
        image_input=False) refuses a non-None image here, once, and its own ``respond`` never
        sees the parameter; a model with vision gets it passed on."""
        super().__init_subclass__(**kwargs)
        respond = cls.__dict__.get("respond")
        if respond is None or getattr(respond, "_checks_image", False):
            return

        @functools.wraps(respond)
        def checked(self, audio, sample_rate=None, options=None, history=None, image=None):
            check_image(self.card, image)
            if image is None:
                return respond(self, audio, sample_rate, options, history)
            return respond(self, audio, sample_rate, options, history, image=image)

        checked._checks_image = True
        cls.respond = checked

    def options(self, values: Mapping[str, Any] | Options | None = None) -> Options:
        """Any options -> a validated instance of this model's own options class (a new object:
        validation may lower ``max_new_tokens``). A base ``zoo.Options`` (or another model's) gives
        its shared fields; this model's own fields keep their defaults."""
        if isinstance(values, self.options_class):
            return dataclasses.replace(values).validate()
        if isinstance(values, Options):
            values = {f.name: getattr(values, f.name) for f in dataclasses.fields(Options)}
        values = dict(values or {})
        if self.default_max_new_tokens is not None:
            values.setdefault("max_new_tokens", self.default_max_new_tokens)
        return self.options_class.from_dict(values)

    @abstractmethod
    def respond(
        self,
        audio: np.ndarray | str | bytes,
        sample_rate: int | None = None,
        options: Options | Mapping[str, Any] | None = None,
        history: Sequence[Any] | None = None,
        image: Any = None,
    ) -> Iterator[Chunk]:
        """Stream the reply to ``audio`` (an array at ``sample_rate``, or a file path or bytes).
        ``image`` (cards with image_input): an HxWx3 uint8 array, a path, PNG/JPEG bytes or a PIL
        image that the question is about; other models raise UnsupportedError for one."""

    def respond_text(
        self, text: str, options: Options | Mapping[str, Any] | None = None
    ) -> Iterator[Chunk]:
        """Stream a spoken reply to a typed question (models whose card says ``text_input``)."""
        raise UnsupportedError(f"{self.card.name} does not take typed questions")

    def stepper(self, max_sessions: int) -> Stepper:
        """A batched stepper for zoo.core.scheduler (many sessions in one forward pass)."""
        raise UnsupportedError(f"{self.card.name} has no batched serving yet")

    def duplex_stepper(self, max_sessions: int, *, graphs: bool | None = None) -> DuplexStepper:
        """Batched full-duplex sessions for zoo.core.scheduler (models whose card says duplex).
        ``graphs``: the transformers' one-token steps as CUDA graphs (zoo.core.graphs; None: on
        CUDA, False: exact eager steps, what benchmarks compare the graphs with)."""
        raise UnsupportedError(f"{self.card.name} is a half-duplex model: it has no duplex stepper")

    def duplex(self, options: Options | Mapping[str, Any] | None = None) -> DuplexSession:
        """One full-duplex session (models whose card says duplex)."""
        raise UnsupportedError(
            f"{self.card.name} is a half-duplex model: use respond() for turn-by-turn chat"
        )

    @abstractmethod
    def benchmark_stages(self, audio: np.ndarray, sample_rate: int) -> dict[str, Callable[[], object]]:
        """One call per pipeline stage on ``audio``, for bench/latency.py to time: every model
        has the four ``Stage`` names; a model may add stages of its own under other names. Each
        call keeps its own state (caches, streams), so live replies are unaffected."""


class Stage(StrEnum):
    """The pipeline stages every model times the same way (``VoiceModel.benchmark_stages``)."""

    ENCODE = "encode"  # the question's audio -> what the generator reads (features, tokens, latents)
    PREFILL = "prefill"  # the prompt through the generator, up to its first output
    DECODE_STEP = "decode_step"  # one generation step of one session (a frame, for frame-based models)
    FIRST_AUDIO = "first_audio"  # the audio decoder's first piece of a reply
