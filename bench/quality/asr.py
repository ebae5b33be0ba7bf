"""Offline speech recognition of the replies: Whisper through transformers when its weights are
already on this machine (a local folder, or the Hugging Face cache: looked up with
local_files_only, so nothing is downloaded and nothing waits on a network), else pocketsphinx,
whose English model ships inside its wheel. ``Transcriber.name`` says which one ran; the report
carries it, because the two differ a lot: pocketsphinx mis-hears even clean synthetic speech
(0-40% WER on the bundled espeak-ng questions), Whisper-small is near 0% on them."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import soxr

RATE = 16000  # both recognisers read 16 kHz mono
WHISPER_CANDIDATES = ("openai/whisper-large-v3-turbo", "openai/whisper-large-v3", "openai/whisper-medium.en",
                      "openai/whisper-small.en", "openai/whisper-small", "openai/whisper-base.en",
                      "openai/whisper-base", "openai/whisper-tiny.en", "openai/whisper-tiny")


class AsrUnavailable(RuntimeError):
    """The requested recogniser cannot run here (no local weights, package missing)."""


@dataclass
class Transcriber:
    name: str  # which recogniser and weights, for the report
    _run: Any

    def transcribe(self, audio: np.ndarray, rate: int) -> str:
        audio = np.asarray(audio, np.float32)
        if rate != RATE and audio.size:
            audio = soxr.resample(audio, rate, RATE).astype(np.float32)
        if audio.size < RATE // 10:  # under 0.1 s: nothing to recognise
            return ""
        return self._run(np.clip(audio, -1.0, 1.0)).strip()


def local_whisper(source: str | None = None) -> str | None:
    """A local folder holding Whisper weights: ``source`` if it is a folder, else the first of
    ``source`` (a repo id) or WHISPER_CANDIDATES found complete in the hub cache; None if none."""
    if source and Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download

    for repo in [source] if source else WHISPER_CANDIDATES:
        try:  # local_files_only: a cache lookup, never a request
            return snapshot_download(repo, local_files_only=True)
        except Exception:  # LocalEntryNotFoundError and friends: not here
            continue
    return None


def whisper(folder: str, device: str | None = None) -> Transcriber:
    import torch
    from transformers import pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    asr = pipeline("automatic-speech-recognition", model=folder, device=device)

    # English transcription (not translation); English-only checkpoints (*.en) take no language
    multilingual = getattr(asr.model.generation_config, "is_multilingual", True)
    language = {"language": "en", "task": "transcribe"} if multilingual else {}

    def run(audio: np.ndarray) -> str:
        # over 30 s (Whisper's window) transformers transcribes long-form, which needs timestamps
        out = asr({"raw": audio, "sampling_rate": RATE}, generate_kwargs=language,
                  return_timestamps=audio.size > 30 * RATE)
        return out["text"]

    return Transcriber(f"whisper ({folder}) via transformers {version('transformers')}", run)


def pocketsphinx() -> Transcriber:
    try:
        from pocketsphinx import Decoder
    except ImportError as e:
        raise AsrUnavailable("pocketsphinx is not installed (pip install -e .[quality])") from e
    decoder = Decoder(samprate=RATE, loglevel="FATAL")  # the en-us model inside the wheel

    def run(audio: np.ndarray) -> str:
        decoder.start_utt()
        decoder.process_raw((audio * 32767).astype(np.int16).tobytes(), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp else ""

    return Transcriber(f"pocketsphinx {version('pocketsphinx')} (en-us model shipped in the wheel)", run)


def load_asr(kind: str = "auto", whisper_source: str | None = None, device: str | None = None) -> Transcriber:
    """``kind``: "whisper" (its local weights, or AsrUnavailable), "pocketsphinx", or "auto"
    (Whisper when its weights are here, else pocketsphinx)."""
    if kind in ("auto", "whisper"):
        folder = local_whisper(whisper_source)
        if folder:
            return whisper(folder, device)
        if kind == "whisper":
            raise AsrUnavailable(f"no local Whisper weights ({whisper_source or 'none of ' + ', '.join(WHISPER_CANDIDATES)} "
                                 "in the Hugging Face cache); pass --whisper DIR or use --asr pocketsphinx")
    if kind not in ("auto", "whisper", "pocketsphinx"):
        raise ValueError(f"unknown ASR {kind!r}: auto, whisper or pocketsphinx")
    return pocketsphinx()
