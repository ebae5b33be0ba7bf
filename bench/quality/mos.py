"""Non-intrusive audio quality: DNSMOS P.835 (Reddy et al., ICASSP 2022) through Microsoft's
``speechmos`` package, whose wheel ships the DNSMOS ONNX models (dnsmos_models/sig_bak_ovr.onnx
and model_v8.onnx), run by onnxruntime. It predicts, with no reference recording, the 1-5 opinion
scores listeners would give for the speech signal (SIG), the background (BAK), overall (OVRL) and
ITU-T P.808 overall. It was trained on noisy and noise-suppressed human speech: it scores how
clean a voice sounds, not whether the words make sense, and it rates synthetic or non-speech
audio unreliably. If the package or onnxruntime cannot be imported, ``Mos.available`` is False
and ``reason`` says why: the report prints that line instead of scores (never a silent skip)."""
from __future__ import annotations

from importlib.metadata import version

import numpy as np
import soxr

RATE = 16000  # DNSMOS reads 16 kHz


class Mos:
    def __init__(self) -> None:
        try:
            from speechmos import dnsmos
        except Exception as e:  # ImportError, or one of its own imports (librosa, onnxruntime)
            self.available, self.reason, self.name, self._dnsmos = False, f"DNSMOS skipped: {e}", None, None
            return
        self.available, self.reason, self._dnsmos = True, None, dnsmos
        self.name = f"DNSMOS P.835 (speechmos {version('speechmos')}, onnxruntime {version('onnxruntime')})"

    def score(self, audio: np.ndarray, rate: int) -> dict[str, float] | None:
        """{"ovrl", "sig", "bak", "p808"} for one reply; None when unavailable or under 0.5 s
        (DNSMOS tiles short clips to its 9 s window: too short a clip is mostly repetition)."""
        if not self.available or audio.size < rate // 2:
            return None
        audio = np.asarray(audio, np.float32)
        if rate != RATE:
            audio = soxr.resample(audio, rate, RATE).astype(np.float32)
        out = self._dnsmos.run(np.clip(audio, -1.0, 1.0), RATE)
        return {k: round(float(out[f"{k}_mos"]), 3) for k in ("ovrl", "sig", "bak", "p808")}
