"""What a page shows with each reply, the same on every page: its text (or, for a model whose
card has no text stream, that it answers in audio only), the turn's numbers (time to first audio,
seconds of audio) and a small waveform picture of the reply."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

AUDIO_ONLY = "(audio only)"  # the card says the model speaks without a text stream
NO_TEXT = "(no text)"  # a text model that finished without text
WAITING = "…"


def reply_text(text: str, text_output: bool, finished: bool = False) -> str:
    """The reply's text as people should read it; never a bare "…" once nothing more can come."""
    if text.strip():
        return text.strip()
    if not text_output:
        return AUDIO_ONLY
    return NO_TEXT if finished else WAITING


def turn_stats(ttfa_ms: float | None, audio_samples: int, sample_rate: int) -> str:
    """One line per turn: how long the first audio took and how long the reply is."""
    first = f"first audio after {ttfa_ms:.0f} ms" if ttfa_ms is not None else "no audio"
    return f"{first} · {audio_samples / sample_rate:.1f} s of audio"


def error_text(message: str) -> str:
    """A failed reply, as the assistant's message in the conversation (one line)."""
    return "⚠ reply failed: " + " ".join(str(message).split())


def waveform_png(audio: np.ndarray, width: int = 480, height: int = 64) -> bytes:
    """The reply's waveform as a small PNG: one vertical min-max line per pixel column, which
    reads well for speech and noise alike and costs no plotting library."""
    audio = np.asarray(audio, np.float32).reshape(-1)
    image = Image.new("RGB", (width, height), (248, 249, 251))
    draw = ImageDraw.Draw(image)
    middle = (height - 1) / 2
    draw.line([(0, middle), (width - 1, middle)], fill=(209, 213, 219))
    if audio.size:
        columns = np.array_split(audio, min(width, audio.size))
        # scale to the loudest sample so quiet replies are still visible; clipped at full scale
        scale = max(float(np.abs(audio).max()), 1e-6)
        for x, column in enumerate(columns):
            low, high = float(column.min()) / scale, float(column.max()) / scale
            draw.line([(x, middle - high * middle), (x, middle - low * middle)], fill=(234, 88, 12))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
