"""Hertz-dev's generation options (the reference server's sampling temperatures)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..core.errors import OptionsError
from ..core.types import Options
from .transformer import MAIN_CONTEXT


@dataclass
class HertzOptions(Options):
    """Defaults are the reference server's temperatures ``TEMPS = (0.8, (0.4, 0.1))``;
    ``max_new_tokens`` counts 125 ms frames (160 = the notebook's 20 s). No top-k / top-p in the
    reference (they apply to the token draw when set)."""

    # 2048 frames (256 s): the reference generates at most one main context (2048 latents, prompt
    # included); replies beyond it would run on slid contexts the model never saw in training, and
    # the cap bounds how long one request holds a session slot.
    MAX_NEW_TOKENS: ClassVar[int] = MAIN_CONTEXT

    temperature: float = 0.8  # token temperature; 0 = deterministic everywhere
    top_k: int | None = None
    top_p: float = 1.0
    max_new_tokens: int = 160
    seed: int = 0
    categorical_temp: float = 0.4  # mixture component choice (0: the most probable)
    gaussian_temp: float = 0.1  # component noise (0: its mean)
    pure_audio_ablation: bool = False  # respond(): the optional no-text-init main model (syrup)

    def validate(self) -> HertzOptions:
        super().validate()
        for name in ("categorical_temp", "gaussian_temp"):
            if not 0.0 <= getattr(self, name) <= 10.0:
                raise OptionsError(f"{name} must be in [0, 10], got {getattr(self, name)}")
        return self
