"""The public interface every model in the zoo implements: card, options, chunks, model."""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from .errors import OptionsError, UnsupportedError


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
    duplex: bool = False
    frame_samples: int | None = None  # duplex models: input samples per step
    multi_turn: bool = False  # whether respond() uses ``history``
    text_input: bool = False  # whether respond_text() answers typed questions

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["components"] = dict(self.components)
        d["languages"] = list(self.languages)
        return d


@dataclass
class Options:
    """Generation options shared by every model; models subclass it to set their reference defaults
    and add their own fields. ``temperature=0`` means greedy decoding."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0

    def validate(self) -> "Options":
        if not (0.0 <= self.temperature <= 10.0):
            raise OptionsError(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise OptionsError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise OptionsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise OptionsError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "Options":
        """Build options from untrusted key/value pairs (CLI, JSON): unknown keys and wrong types
        are reported by name instead of surfacing as a TypeError deep inside generation."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise OptionsError(f"unknown option(s) {unknown}; known: {sorted(known)}")
        converted = {}
        for name, value in values.items():
            if value is None:
                if "None" not in str(known[name].type):
                    raise OptionsError(f"option {name!r} cannot be null")
                converted[name] = None
                continue
            kind = _option_kind(cls, known[name])
            try:
                if kind is bool and not isinstance(value, bool):
                    raise TypeError
                if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
                    raise TypeError  # 2.7 steps or `true` steps are mistakes, not 2 or 1
                converted[name] = kind(value)
            except (TypeError, ValueError):
                raise OptionsError(f"option {name!r} must be {kind.__name__}, got {value!r}") from None
        return cls(**converted).validate()


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


class VoiceModel(ABC):
    """A loaded model. ``respond`` streams a reply to one spoken turn."""

    card: ModelCard
    options_class: ClassVar[type[Options]] = Options
    # "tiny" or "full" when zoo.load built the model with seeded random weights (its output is
    # noise, and everything that shows it says so); None for published weights
    random_weights: str | None = None

    def options(self, values: Mapping[str, Any] | Options | None = None) -> Options:
        if isinstance(values, Options):
            return values.validate()
        return self.options_class.from_dict(values)

    @abstractmethod
    def respond(
        self,
        audio: np.ndarray | str | bytes,
        sample_rate: int | None = None,
        options: Options | Mapping[str, Any] | None = None,
        history: Sequence[Any] | None = None,
    ) -> Iterator[Chunk]:
        """Stream the reply to ``audio`` (an array at ``sample_rate``, or a file path or bytes)."""

    def respond_text(
        self, text: str, options: Options | Mapping[str, Any] | None = None
    ) -> Iterator[Chunk]:
        """Stream a spoken reply to a typed question (models whose card says ``text_input``)."""
        raise UnsupportedError(f"{self.card.name} does not take typed questions")

    def stepper(self, max_sessions: int):
        """A batched stepper for zoo.core.scheduler (many sessions in one forward pass)."""
        raise UnsupportedError(f"{self.card.name} has no batched serving yet")

    def duplex(self, options: Options | Mapping[str, Any] | None = None):
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
