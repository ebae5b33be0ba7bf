"""A reply's waveform as a small SVG (min/max envelope per column): light enough to keep one per
turn in the conversation, with no plotting library."""
from __future__ import annotations

import numpy as np


def waveform_svg(audio: np.ndarray, width: int = 600, height: int = 48, color: str = "#8a8fa3") -> str:
    """``audio`` float samples in [-1, 1]; an empty reply is a flat line."""
    audio = np.asarray(audio, np.float32).ravel()
    columns = max(1, min(width, audio.size))
    middle = height / 2
    if audio.size:
        blocks = np.array_split(audio, columns)
        top = np.array([block.max() for block in blocks])
        bottom = np.array([block.min() for block in blocks])
    else:
        top = bottom = np.zeros(1, np.float32)
    x = np.linspace(0, width, top.size)
    upper = [f"{xi:.1f},{middle - yi * middle:.1f}" for xi, yi in zip(x, np.clip(top, -1, 1))]
    lower = [f"{xi:.1f},{middle - yi * middle:.1f}" for xi, yi in zip(x[::-1], np.clip(bottom, -1, 1)[::-1])]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><polygon points="{" ".join(upper + lower)}" fill="{color}" '
            f'stroke="{color}" stroke-width="0.5"/></svg>')
