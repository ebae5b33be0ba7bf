"""SNAC 24 kHz, the codec Mini-Omni speaks through: loading the published files, the mapping from
the LLM's 7-token frames to SNAC's three codebooks, and seam-free streaming decode.

``Codec`` streams through zoo.core.streaming, one reply per state (an ``AudioStreamer``):

    state = codec.new_state(stride=4, lookahead=3, mode="seamless", seed=0, noise=True)
    audio = codec.step(state, frames)     # np.float32: the chunks these 7-token frames complete
    audio = codec.finish(state)           # the tail ("seamless"); the state is then fresh

Batched serving decodes the due windows of many replies in one call instead
(``AudioStreamer.plan`` + ``Codec.decode_windows``), with the same numbers.
"""
from __future__ import annotations

import contextvars
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from snac import SNAC
from snac.layers import NoiseBlock
from torch import nn

from ..core.streaming import StreamingModule, StreamingState, one_row_only
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
    return prepare_for_inference(model).to(device=device, dtype=dtype).eval()


def prepare_for_inference(model: SNAC) -> SNAC:
    """Seeded positional noise, and weight norm folded into plain weights (the parametrization
    would recompute every weight on every call)."""
    install_seeded_noise(model)
    for module in model.modules():
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            torch.nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


# ---------------------------------------------------------------------------------------------
# Noise: SNAC's decoder adds learned-scale Gaussian noise (NoiseBlock, torch.randn per call). A
# fresh draw per call makes chunked decoding differ from one-pass decoding and touches the global
# RNG. We draw the same distribution from a seeded stream indexed by absolute sample position, so
# any window of frames gets the noise the one-pass decode gives those samples.

# per batch item: (seed, first frame, noise on); and the number of frames every item has
_decode_window: contextvars.ContextVar[tuple[list[tuple[int, int, bool]], int]] = contextvars.ContextVar("snac_window")
_NOISE_PAGE = 8192


@functools.lru_cache(maxsize=256)
def _noise_page(seed: int, block: int, page: int) -> torch.Tensor:
    # reduced to the generator's 64-bit seed range: any option seed (up to 2**63) works, and small
    # seeds (all that worked before) keep their noise
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + block) * 1_000_003 + page) % 2**64)
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
        items, frames = _decode_window.get(([(0, 0, True)] * x.size(0), 1))
        if not any(enabled for _, _, enabled in items):
            return x
        per_frame = x.size(-1) // frames
        noise = torch.stack([
            _positional_noise(seed, self.index, first * per_frame, x.size(-1)) if enabled else torch.zeros(x.size(-1))
            for seed, first, enabled in items
        ])[:, None]
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


@dataclass
class Window:
    """Frames to decode together, and which of the resulting samples belong to the chunk."""

    frames: torch.Tensor  # (N, 7)
    first_frame: int  # absolute index of frames[0] in its reply (places the noise)
    keep: slice  # samples of the chunk within the decoded window
    seed: int = 0
    noise: bool = True


class Codec(StreamingModule["AudioStreamer", Sequence[Sequence[int]], np.ndarray]):
    def __init__(self, snac: SNAC) -> None:
        self.snac = snac
        self.samples_per_frame = int(snac.hop_length) * int(snac.vq_strides[0])
        self.sample_rate = int(snac.sampling_rate)

    def decode(self, frames: torch.Tensor, first_frame: int = 0, seed: int = 0, noise: bool = True) -> np.ndarray:
        """(N, 7) codes -> float32 audio of N * 2048 samples. ``first_frame`` is the absolute index
        of frames[0] in its reply, which places the decoder's noise."""
        if frames.numel() == 0:
            return np.zeros(0, np.float32)
        return self.decode_windows([Window(frames, first_frame, slice(None), seed, noise)])[0]

    @torch.inference_mode()
    def decode_windows(self, windows: list[Window]) -> list[np.ndarray]:
        """Decode many windows (of any sessions); windows of equal length share one batched call."""
        out: list[np.ndarray | None] = [None] * len(windows)
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            by_length.setdefault(w.frames.size(0), []).append(i)
        device = next(self.snac.parameters()).device
        for length, members in by_length.items():
            frames = torch.stack([windows[i].frames for i in members]).to(device=device, dtype=torch.long)
            codes = [torch.cat(parts) for parts in zip(*(frames_to_codes(f) for f in frames))]
            items = [(windows[i].seed, windows[i].first_frame, windows[i].noise) for i in members]
            token = _decode_window.set((items, length))
            try:
                audio = self.snac.decode(codes).float().cpu().numpy()[:, 0]
            finally:
                _decode_window.reset(token)
            for row, i in enumerate(members):
                out[i] = audio[row][windows[i].keep]
        return out

    # -- zoo.core.streaming: 7-token frames -> np.float32 audio ----------------------------------
    def new_state(self, stride: int, lookahead: int, mode: str, seed: int, noise: bool,
                  first_chunk: int | None = None) -> AudioStreamer:
        """A fresh reply's stream (the arguments are AudioStreamer's)."""
        return AudioStreamer(self, stride, lookahead, mode, seed, noise, first_chunk)

    def step(self, state: AudioStreamer, piece: Sequence[Sequence[int]], *, rows=None) -> np.ndarray:
        """Take frames; returns the audio of the chunks they complete (may be empty)."""
        one_row_only(rows, "the SNAC codec")
        for frame in piece:
            state.push(frame)
        return _joined(state.ready())

    def finish(self, state: AudioStreamer, piece: Sequence[Sequence[int]] | None = None, *,
               rows=None) -> np.ndarray:
        """Take the last frames; returns the rest of the audio. The state is then fresh."""
        one_row_only(rows, "the SNAC codec")
        for frame in piece or ():
            state.push(frame)
        audio = _joined(state.finish())
        state.reset()
        return audio


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


class AudioStreamer(StreamingState):
    """The state of one reply's audio stream (``Codec.new_state``): turns a growing list of frames
    into audio chunks: the first of ``first_chunk`` frames (so audio starts as soon as the delay
    pattern allows), then ``stride`` frames each.

    mode "seamless" (default): each chunk is decoded with ``CONTEXT_FRAMES`` of left context and
    ``lookahead`` frames of right context, keeping only its own samples; ``finish`` flushes the
    tail. With lookahead 3 the stream equals the one-pass decode sample for sample.
    mode "reference": the reference server's behaviour: each chunk decoded alone (audible seams)
    and the last (frames mod stride) frames never sent; its first chunk is ``stride`` frames too.

    ``plan`` says which windows are due (so many sessions can be decoded in one batch);
    ``ready``/``finish`` plan and decode in one go, one array per chunk.
    """

    def __init__(self, codec: Codec, stride: int, lookahead: int, mode: str, seed: int, noise: bool,
                 first_chunk: int | None = None) -> None:
        if mode not in ("seamless", "reference"):
            raise ValueError(f"unknown stream mode {mode!r}")
        self.codec, self.stride, self.mode = codec, stride, mode
        self.lookahead = lookahead if mode == "seamless" else 0
        self.first_chunk = first_chunk if (first_chunk and mode == "seamless") else stride
        self.seed, self.noise = seed, noise
        self.reset()

    def reset(self, rows=None) -> None:
        one_row_only(rows, "an AudioStreamer")
        self.frames: list[list[int]] = []
        self.sent = 0  # frames already planned as audio

    def push(self, frame) -> None:
        if is_audio_frame(frame):
            self.frames.append([int(c) for c in frame])

    def plan(self, final: bool = False) -> list[Window]:
        windows = []
        while True:
            size = self.first_chunk if self.sent == 0 else self.stride
            if len(self.frames) - self.lookahead < self.sent + size:
                break
            windows.append(self._window(self.sent, self.sent + size))
        if final and self.mode == "seamless" and self.sent < len(self.frames):
            windows.append(self._window(self.sent, len(self.frames)))
        return windows

    def ready(self) -> list[np.ndarray]:
        return self._decode(self.plan())

    def finish(self) -> list[np.ndarray]:
        return self._decode(self.plan(final=True))

    def _decode(self, windows: list[Window]) -> list[np.ndarray]:
        return self.codec.decode_windows(windows) if windows else []

    def _window(self, start: int, end: int) -> Window:
        if self.mode == "reference":
            lo, hi = start, end
        else:
            lo, hi = max(0, start - CONTEXT_FRAMES), min(len(self.frames), end + self.lookahead)
        spf = self.codec.samples_per_frame
        self.sent = end
        return Window(torch.tensor(self.frames[lo:hi], dtype=torch.long), lo,
                      slice((start - lo) * spf, (end - lo) * spf), self.seed, self.noise)
