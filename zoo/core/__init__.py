"""What every model shares: the interface types (the contract), errors, audio I/O, checkpoints,
sampling, scheduling, the KV cache and the streaming vocabulary."""
from .errors import (
    AudioInputError,
    AudioTooLong,
    ImageInputError,
    OptionsError,
    UnsupportedError,
    WeightsNotFound,
    ZooError,
)
from .types import Chunk, ModelCard, Options, Stage, VoiceModel

__all__ = [
    "AudioInputError",
    "AudioTooLong",
    "Chunk",
    "ImageInputError",
    "ModelCard",
    "Options",
    "Stage",
    "OptionsError",
    "UnsupportedError",
    "VoiceModel",
    "WeightsNotFound",
    "ZooError",
]
