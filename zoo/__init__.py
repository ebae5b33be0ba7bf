"""omni-zoo: open end-to-end voice chat models behind one streaming interface.

    import zoo
    model = zoo.load("mini-omni")            # or tiny=True for random weights (noise)
    for chunk in model.respond(audio, 16000):
        chunk.audio, chunk.text
"""
from __future__ import annotations

import importlib

from .core import (  # noqa: F401  (re-exported: the public interface)
    AudioInputError, AudioTooLong, Chunk, ModelCard, Options, OptionsError, UnsupportedError, VoiceModel,
    WeightsNotFound, ZooError,
)

# name -> "module:Class"; the module defines CARD and the class implements VoiceModel.
_REGISTRY = {
    "mini-omni": "zoo.mini_omni.model:MiniOmni",
    "hertz-dev": "zoo.hertz_dev.model:HertzDev",
    "glm-4-voice": "zoo.glm4_voice.model:GlmVoice",
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


def random_model(name: str, size: str = "full", *, device=None, dtype=None, seed: int = 0) -> VoiceModel:
    """A model with seeded random weights built in memory, for benchmarks: ``size="full"`` has the
    published dimensions (the real compute cost), ``"tiny"`` the test ones. Its output is noise."""
    package = _REGISTRY[name].split(":")[0].rsplit(".", 1)[0] if name in _REGISTRY else None
    if package is None:
        raise ZooError(f"unknown model {name!r}; available: {names()}")
    testing = importlib.import_module(f"{package}.testing")
    return testing.random_model(size, device=device, dtype=dtype, seed=seed)


def load(name: str, *, device=None, dtype=None, tiny: bool = False, seed: int = 0, **components) -> VoiceModel:
    """Load a model. ``components`` name published parts (hub repo id or local folder), e.g.
    ``checkpoint=`` and ``codec=`` for Mini-Omni. ``tiny=True``: seeded random tiny weights."""
    cls = _model_class(name)
    unknown = sorted(set(components) - set(cls.card.components))
    if unknown:
        raise ZooError(f"{name} has no component(s) {unknown}; its components: {sorted(cls.card.components)}")
    return cls.load(device=device, dtype=dtype, tiny=tiny, seed=seed, **components)
