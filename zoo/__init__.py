"""omni-zoo: open end-to-end voice chat models behind one streaming interface.

    import zoo
    model = zoo.load("mini-omni")            # or random_weights="tiny": seeded noise, for tests
    for chunk in model.respond(audio, 16000):
        chunk.audio, chunk.text
"""
from __future__ import annotations

import importlib

from .core import (  # noqa: F401  (re-exported: the public interface)
    AudioInputError,
    AudioTooLong,
    Chunk,
    ImageInputError,
    ModelCard,
    Options,
    OptionsError,
    Stage,
    UnsupportedError,
    VoiceModel,
    WeightsNotFound,
    ZooError,
)

# name -> "module:Class"; the module defines CARD and the class implements VoiceModel; the
# package's random_weights module builds the model with seeded random weights (zoo.load below).
_REGISTRY = {
    "mini-omni": "zoo.mini_omni.model:MiniOmni",
    "hertz-dev": "zoo.hertz_dev.model:HertzDev",
    "glm-4-voice": "zoo.glm4_voice.model:GlmVoice",
    "moshi": "zoo.moshi.model:Moshi",
    "mini-omni2": "zoo.mini_omni2.model:MiniOmni2",
}


def names() -> list[str]:
    return list(_REGISTRY)


def _model_class(name: str) -> type[VoiceModel]:
    if name not in _REGISTRY:
        raise ZooError(f"unknown model {name!r}; available: {names()}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def card(name: str) -> ModelCard:
    """Static facts about a model; loads no weights."""
    return _model_class(name).card


RANDOM_WEIGHTS = ("tiny", "full")
# Random-weight replies are noise that rarely stops by itself: without a cap a first try of any
# page waits minutes. This is the default reply length then (a caller's max_new_tokens wins).
RANDOM_REPLY_SECONDS = 4.0


def load(name: str, *, device=None, dtype=None, random_weights: str | None = None, seed: int = 0,
         **components) -> VoiceModel:
    """Load a model. ``components`` name published parts (hub repo id or local folder), e.g.
    ``checkpoint=`` and ``codec=`` for Mini-Omni.

    ``random_weights`` (seeded by ``seed``; the output is noise): "tiny" writes tiny checkpoint
    folders in the published layouts and loads them through the real loader (for tests and smoke
    runs; a component given replaces its tiny folder); "full" builds the published dimensions in
    memory (the real compute cost, for benchmarks). Random-weight replies are capped to about
    ``RANDOM_REPLY_SECONDS`` by default (``model.default_max_new_tokens``)."""
    cls = _model_class(name)
    unknown = sorted(set(components) - set(cls.card.components))
    if unknown:
        raise ZooError(f"{name} has no component(s) {unknown}; its components: {sorted(cls.card.components)}")
    if random_weights is None:
        return cls.load(device=device, dtype=dtype, **components)
    if random_weights not in RANDOM_WEIGHTS:
        raise ZooError(f"random_weights must be one of {RANDOM_WEIGHTS} or None, got {random_weights!r}")
    # the package's random-weight builder: the model modules never import it (no import circle)
    builder = importlib.import_module(cls.__module__.rsplit(".", 1)[0] + ".random_weights")
    model = builder.build(random_weights, device=device, dtype=dtype, seed=seed, **components)
    model.random_weights = random_weights
    model.default_max_new_tokens = max(1, round(RANDOM_REPLY_SECONDS * cls.card.reply_tokens_per_second))
    return model
