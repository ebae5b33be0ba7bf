"""What every model shares: interface types, errors, audio I/O, checkpoints, sampling, the KV cache."""
from .errors import AudioInputError, OptionsError, UnsupportedError, WeightsNotFound, ZooError
from .types import Chunk, ModelCard, Options, Stage, VoiceModel

__all__ = [
    "AudioInputError",
    "Chunk",
    "ModelCard",
    "Options",
    "Stage",
    "OptionsError",
    "UnsupportedError",
    "VoiceModel",
    "WeightsNotFound",
    "ZooError",
]
