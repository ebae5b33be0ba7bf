"""Server-side voice activity detection for live sessions: Silero VAD (its model ships inside the
silero-vad package, so it runs offline), one stateful detector per session."""
from __future__ import annotations

import copy
import functools

import numpy as np
import torch

VAD_RATE = 16000
WINDOW = 512  # samples per Silero step at 16 kHz (32 ms)


@functools.lru_cache(maxsize=1)
def _silero():
    from silero_vad import load_silero_vad

    return load_silero_vad()


class SpeechDetector:
    """Feed 16 kHz audio; get "start" and "stop" events. A stop is reported after
    ``silence_ms`` without speech (OpenAI's silence_duration_ms)."""

    def __init__(self, threshold: float = 0.5, silence_ms: int = 500, prefix_padding_ms: int = 300) -> None:
        from silero_vad import VADIterator

        self.iterator = VADIterator(copy.deepcopy(_silero()), threshold=threshold, sampling_rate=VAD_RATE,
                                    min_silence_duration_ms=silence_ms, speech_pad_ms=prefix_padding_ms)
        self.pending = np.zeros(0, np.float32)
        self.speaking = False

    def feed(self, audio: np.ndarray) -> list[str]:
        events = []
        self.pending = np.concatenate([self.pending, audio.astype(np.float32, copy=False)])
        usable = self.pending.size // WINDOW * WINDOW
        with torch.inference_mode():
            for start in range(0, usable, WINDOW):
                result = self.iterator(torch.from_numpy(self.pending[start : start + WINDOW]))
                if result and "start" in result and not self.speaking:
                    self.speaking = True
                    events.append("start")
                elif result and "end" in result and self.speaking:
                    self.speaking = False
                    events.append("stop")
        self.pending = self.pending[usable:]
        return events

    def reset(self) -> None:
        self.iterator.reset_states()
        self.pending = np.zeros(0, np.float32)
        self.speaking = False
