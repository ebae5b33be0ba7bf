"""SNAC 24 kHz, the codec Mini-Omni speaks through: loading the published files, the mapping from
the LLM's 7-token frames to SNAC's three codebooks, and seam-free streaming decode."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import json
from pathlib import Path

import numpy as np
import torch
from snac import SNAC
from snac.layers import NoiseBlock
from torch import nn

from .tokens import AUDIO_LAYERS, AUDIO_VOCAB

CODEC_FILES = ("config.json", "pytorch_model.bin")
# SNAC's decoder sees 3 frames either side of a frame (a structural property of its convolutions):
# decoding a chunk with that much context reproduces the one-pass decode exactly.
CONTEXT_FRAMES = 3


def load_snac(folder: Path, dtype: torch.dtype, device) -> SNAC:
    config = json.loads((folder / "config.json").read_text())
    model = SNAC(**config)
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    # strict: both weight-norm namings load (torch converts weight_g/weight_v on load).
    model.load_state_dict(state, strict=True)
    install_seeded_noise(model)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# Noise: SNAC's decoder adds learned-scale Gaussian noise (NoiseBlock, torch.randn per call). A
# fresh draw per call makes chunked decoding differ from one-pass decoding and touches the global
# RNG. We draw the same distribution from a seeded stream indexed by absolute sample position, so
# any window of frames gets the noise the one-pass decode gives those samples.

_decode_window: contextvars.ContextVar[tuple[int, int, int, bool]] = contextvars.ContextVar("snac_window")
_NOISE_PAGE = 8192


@functools.lru_cache(maxsize=256)
def _noise_page(seed: int, block: int, page: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + block) * 1_000_003 + page)
    return torch.randn(_NOISE_PAGE, generator=generator)


def _positional_noise(seed: int, block: int, start: int, length: int) -> torch.Tensor:
    first, last = start // _NOISE_PAGE, (start + length - 1) // _NOISE_PAGE
    pages = torch.cat([_noise_page(seed, block, p) for p in range(first, last + 1)])
    offset = start - first * _NOISE_PAGE
    return pages[offset : offset + length]


class SeededNoise(nn.Module):
    """Drop-in for snac's NoiseBlock (same ``linear`` submodule, so the same tensor names)."""

    def __init__(self, original: NoiseBlock, index: int) -> None:
        super().__init__()
        self.linear = original.linear
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed, first_frame, frames, enabled = _decode_window.get((0, 0, 1, True))
        if not enabled:
            return x
        per_frame = x.size(-1) // frames
        noise = _positional_noise(seed, self.index, first_frame * per_frame, x.size(-1))
        return x + noise.to(x.device, x.dtype) * self.linear(x)


def install_seeded_noise(model: SNAC) -> None:
    count = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NoiseBlock):
                setattr(module, name, SeededNoise(child, count))
                count += 1


# ---------------------------------------------------------------------------------------------
# Frames: the LLM emits one 7-token frame per step; SNAC 24 kHz wants codebooks at 1, 2 and 4
# codes per frame, laid out depth-first: [c0[t], c1[2t], c2[4t], c2[4t+1], c1[2t+1], c2[4t+2], c2[4t+3]].

_FRAME_TO_C1 = (1, 4)
_FRAME_TO_C2 = (2, 3, 5, 6)


def frames_to_codes(frames: torch.Tensor) -> list[torch.Tensor]:
    """(N, 7) local codes -> [c0 (1, N), c1 (1, 2N), c2 (1, 4N)]."""
    c0 = frames[:, 0]
    c1 = frames[:, list(_FRAME_TO_C1)].reshape(-1)
    c2 = frames[:, list(_FRAME_TO_C2)].reshape(-1)
    return [c0[None], c1[None], c2[None]]


def codes_to_frames(codes: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of frames_to_codes."""
    c0, c1, c2 = (c.reshape(-1) for c in codes)
    n = c0.numel()
    frames = torch.empty(n, AUDIO_LAYERS, dtype=c0.dtype, device=c0.device)
    frames[:, 0] = c0
    frames[:, list(_FRAME_TO_C1)] = c1.view(n, 2)
    frames[:, list(_FRAME_TO_C2)] = c2.view(n, 4)
    return frames


def is_audio_frame(frame) -> bool:
    """A frame can be decoded only if all 7 tokens are codes, not special ids (>= 4096): the
    reference crashes on those (gpt-omni/mini-omni#97); we skip such frames instead."""
    return all(0 <= int(code) < AUDIO_VOCAB for code in frame)


class Codec:
    def __init__(self, snac: SNAC) -> None:
        self.snac = snac
        self.samples_per_frame = int(snac.hop_length) * int(snac.vq_strides[0])
        self.sample_rate = int(snac.sampling_rate)

    @torch.inference_mode()
    def decode(self, frames: torch.Tensor, first_frame: int = 0, seed: int = 0, noise: bool = True) -> np.ndarray:
        """(N, 7) codes -> float32 audio of N * 2048 samples. ``first_frame`` is the absolute index
        of frames[0] in its reply, which places the decoder's noise."""
        if frames.numel() == 0:
            return np.zeros(0, np.float32)
        device = next(self.snac.parameters()).device
        codes = frames_to_codes(frames.to(device=device, dtype=torch.long))
        token = _decode_window.set((seed, first_frame, frames.size(0), noise))
        try:
            audio = self.snac.decode(codes)
        finally:
            _decode_window.reset(token)
        return audio.reshape(-1).float().cpu().numpy()


class AudioStreamer:
    """Turns a growing list of frames into audio chunks: the first of ``first_chunk`` frames (so
    audio starts as soon as the delay pattern allows), then ``stride`` frames each.

    mode "seamless" (default): each chunk is decoded with ``CONTEXT_FRAMES`` of left context and
    ``lookahead`` frames of right context, keeping only its own samples; ``finish()`` flushes the
    tail. With lookahead 3 the stream equals the one-pass decode sample for sample.
    mode "reference": the reference server's behaviour: each chunk decoded alone (audible seams)
    and the last (frames mod stride) frames never sent; its first chunk is ``stride`` frames too.
    """

    def __init__(self, codec: Codec, stride: int, lookahead: int, mode: str, seed: int, noise: bool,
                 first_chunk: int | None = None) -> None:
        if mode not in ("seamless", "reference"):
            raise ValueError(f"unknown stream mode {mode!r}")
        self.codec, self.stride, self.mode = codec, stride, mode
        self.lookahead = lookahead if mode == "seamless" else 0
        self.first_chunk = first_chunk if (first_chunk and mode == "seamless") else stride
        self.seed, self.noise = seed, noise
        self.frames: list[list[int]] = []
        self.sent = 0  # frames already turned into audio

    def push(self, frame) -> None:
        if is_audio_frame(frame):
            self.frames.append([int(c) for c in frame])

    def ready(self) -> list[np.ndarray]:
        chunks = []
        while True:
            size = self.first_chunk if self.sent == 0 else self.stride
            if len(self.frames) - self.lookahead < self.sent + size:
                return chunks
            chunks.append(self._decode(self.sent, self.sent + size))

    def finish(self) -> list[np.ndarray]:
        chunks = self.ready()
        if self.mode == "seamless" and self.sent < len(self.frames):
            chunks.append(self._decode(self.sent, len(self.frames)))
        return chunks

    def _decode(self, start: int, end: int) -> np.ndarray:
        if self.mode == "reference":
            lo, hi = start, end
        else:
            lo, hi = max(0, start - CONTEXT_FRAMES), min(len(self.frames), end + self.lookahead)
        window = torch.tensor(self.frames[lo:hi], dtype=torch.long)
        audio = self.codec.decode(window, first_frame=lo, seed=self.seed, noise=self.noise)
        spf = self.codec.samples_per_frame
        self.sent = end
        return audio[(start - lo) * spf : (end - lo) * spf]
