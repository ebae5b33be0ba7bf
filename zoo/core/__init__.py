"""What every model shares: interface types, errors, audio I/O, checkpoints, sampling."""
from .errors import AudioInputError, AudioTooLong, OptionsError, UnsupportedError, WeightsNotFound, ZooError
from .types import Chunk, ModelCard, Options, Stage, VoiceModel

__all__ = [
    "AudioInputError",
    "AudioTooLong",
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
