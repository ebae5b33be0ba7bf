"""The few exception types every caller of the zoo can catch by name."""


class ZooError(Exception):
    """Base class: anything the zoo raises on purpose."""


class WeightsNotFound(ZooError):
    """A published checkpoint could not be found locally or fetched from the hub."""


class CheckpointMismatch(WeightsNotFound):
    """A file is there but does not hold the published tensors (wrong file, another model,
    truncated): the message names every missing, unexpected and mis-shaped tensor."""


class AudioInputError(ZooError, ValueError):
    """The audio given to a model cannot be used (empty, not audio, NaN, too long, ...)."""


class AudioTooLong(AudioInputError):
    """The audio is longer than the model accepts (refused before it is decoded in full)."""


class OptionsError(ZooError, ValueError):
    """A generation option is unknown, of the wrong type or out of range."""


class UnknownOption(OptionsError):
    """An option name the model does not have (a client's typo or another model's option)."""


class UnsupportedError(ZooError):
    """The model does not offer this mode (e.g. duplex on a half-duplex model)."""


class ImageInputError(ZooError, ValueError):
    """The image given to a model cannot be used (not an image, corrupt, too large, ...)."""
