"""Audio in: any soundfile-readable file (path, bytes, file object) or array, any rate and channel
count, turned into mono float32 at the rate a model wants. Problems become AudioInputError."""
from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioInputError, AudioTooLong

DECODE_BLOCK_FRAMES = 65536
UNKNOWN_LENGTH = 2**63 - 1  # libsndfile's frame count for a stream whose header does not say
AudioSource = str | os.PathLike | bytes | bytearray | BinaryIO | np.ndarray


def _check_file(path: str | os.PathLike) -> None:
    """A path that is no readable file is named with the reason (libsndfile says only "System error")."""
    if not os.path.exists(path):
        raise AudioInputError(f"audio file not found: {path}")
    if os.path.isdir(path):
        raise AudioInputError(f"{path} is a folder, not an audio file")
    if not os.access(path, os.R_OK):
        raise AudioInputError(f"cannot read the audio file {path}: permission denied")


def read_audio(source: AudioSource, sample_rate: int | None = None, *,
               max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode ``source`` to float32 of shape (samples,) or (samples, channels) and its rate.

    ``max_seconds``: longer audio raises AudioTooLong. A file's length is read from its header
    before anything is decoded, and decoding stops one frame past the limit, so a small
    compressed file of hours of silence (or a header that lies) costs no more memory than the
    longest audio accepted."""
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioInputError("an audio array needs its sample_rate")
        _check_length(source.shape[0] if source.ndim else 0, int(sample_rate), max_seconds)
        return _as_float(source), int(sample_rate)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        _check_file(source)
    try:
        with sf.SoundFile(source) as audio_file:
            rate = int(audio_file.samplerate)
            if audio_file.frames != UNKNOWN_LENGTH:
                _check_length(audio_file.frames, rate, max_seconds)  # the header's claim, before decoding
            data = _decode(audio_file, None if max_seconds is None else int(max_seconds * rate) + 1)
    except sf.LibsndfileError as err:
        raise AudioInputError(f"could not decode the audio: {err.error_string.rstrip('.')} "
                              f"(send a WAV, FLAC, OGG or MP3 file)") from None
    except (RuntimeError, TypeError) as err:
        raise AudioInputError(f"could not decode the audio: {err}") from None
    except OSError as err:  # e.g. the file went away or became unreadable after the check
        raise AudioInputError(f"cannot read the audio file {source}: {err.strerror or err}") from None
    if max_seconds is not None and data.shape[0] > max_seconds * rate:  # the header said less, or nothing
        raise AudioTooLong(f"the audio is longer than {max_seconds:g} s, the most this model accepts")
    return data, rate


def _decode(audio_file: sf.SoundFile, max_frames: int | None) -> np.ndarray:
    """Decode in blocks, stopping once past ``max_frames``: memory follows what is decoded, not
    what the header claims (a stream may not say its length at all)."""
    blocks, total = [], 0
    while max_frames is None or total < max_frames:
        block = audio_file.read(frames=DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)
        if not block.shape[0]:
            break
        blocks.append(block)
        total += block.shape[0]
    data = np.concatenate(blocks) if blocks else np.zeros((0, audio_file.channels), np.float32)
    return data[:, 0] if audio_file.channels == 1 else data


def _check_length(samples: int, rate: int, max_seconds: float | None) -> None:
    if rate <= 0:
        raise AudioInputError(f"sample rate must be positive, got {rate}")
    if max_seconds is not None and samples > max_seconds * rate:
        raise AudioTooLong(f"the audio is {samples / rate:.1f} s long; this model accepts at most {max_seconds:g} s")


def _as_float(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "i":  # integer PCM, e.g. int16 from a wire protocol
        return array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
    if array.dtype.kind != "f":
        raise AudioInputError(f"audio array must hold numbers, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def to_mono(data: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) -> (samples,), averaging channels."""
    if data.ndim == 1:
        return data
    if data.ndim == 2:
        # Arrays given as (channels, samples) are common too; channels are the short side.
        if data.shape[0] < data.shape[1] and data.shape[0] <= 8:
            data = data.T
        return data.mean(axis=1, dtype=np.float32)
    raise AudioInputError(f"audio must be 1-D or 2-D (samples, channels), got shape {data.shape}")


def resample(audio: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    if rate == target_rate:
        return audio
    if rate <= 0:
        raise AudioInputError(f"sample rate must be positive, got {rate}")
    return soxr.resample(audio, rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(
    source: AudioSource,
    sample_rate: int | None = None,
    *,
    target_rate: int,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Any audio -> mono float32 at ``target_rate``.

    Raises AudioInputError for: undecodable data, no samples, NaN/inf samples, or audio longer
    than ``max_seconds``. Silence is valid input (the model answers what it hears).
    """
    data, rate = read_audio(source, sample_rate, max_seconds=max_seconds)
    mono = to_mono(np.asarray(data))
    if mono.size == 0:
        raise AudioInputError("the audio is empty (no samples)")
    if not np.all(np.isfinite(mono)):
        raise AudioInputError("the audio contains NaN or infinite samples")
    _check_length(mono.size, rate, max_seconds)  # an array given as (channels, samples)
    out = resample(mono, rate, target_rate)
    return np.clip(out, -1.0, 1.0)


PCM16 = "<i2"  # signed 16-bit little-endian: every PCM wire format and file the project writes


def pcm16_to_float(data: bytes | bytearray, scale: float = 32768.0) -> np.ndarray:
    """Signed 16-bit little-endian PCM -> float32 samples / ``scale`` (32768 maps the full int16
    range into [-1, 1); a protocol that divides by 32767 says so). A trailing odd byte is ignored."""
    pcm = np.frombuffer(data, PCM16, count=len(data) // 2)
    return pcm.astype(np.float32) / np.float32(scale)


def float_to_pcm16(audio: np.ndarray, *, rounding: str = "round", scale: float = 32767.0) -> np.ndarray:
    """float audio -> int16 samples (little-endian; ``.tobytes()`` is the PCM16 wire format):
    clipped to [-1, 1] (no wrap-around), times ``scale``, then ``rounding`` "round" (to the
    nearest) or "truncate" (toward zero, what a plain ``astype`` does)."""
    if rounding not in ("round", "truncate"):
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    scaled = np.clip(audio, -1.0, 1.0) * scale
    return (scaled.round() if rounding == "round" else scaled).astype(PCM16)
