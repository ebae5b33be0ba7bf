"""Moshi's generation options: the reference's LMGen defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..core.errors import OptionsError
from ..core.types import Options


@dataclass
class MoshiOptions(Options):
    """Defaults are ``LMGen``'s (moshi/models/lm.py, what the reference server uses): audio
    codebooks temperature 0.8 and top-k 250, text temperature 0.7 and top-k 25. A ``temperature``
    of 0 is greedy for the text and every codebook (the reference's ``use_sampling=False``);
    ``text_temperature`` 0 alone makes only the text greedy. ``max_new_tokens`` counts 80 ms steps
    of a respond() reply."""

    # 3000 steps (240 s): one temporal context; a duplex session itself runs on past it (ring cache)
    MAX_NEW_TOKENS: ClassVar[int] = 3000

    temperature: float = 0.8
    top_k: int | None = 250
    top_p: float = 1.0
    max_new_tokens: int = 125
    seed: int = 0
    text_temperature: float = 0.7
    text_top_k: int | None = 25

    def validate(self) -> MoshiOptions:
        super().validate()
        if not 0.0 <= self.text_temperature <= 10.0:
            raise OptionsError(f"text_temperature must be in [0, 10], got {self.text_temperature}")
        if self.text_top_k is not None and self.text_top_k < 1:
            raise OptionsError(f"text_top_k must be >= 1 or None, got {self.text_top_k}")
        return self
