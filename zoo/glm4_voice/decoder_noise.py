"""Where the GLM-4-Voice decoder's random numbers come from.

Randomness never touches torch's global RNG: each decode uses local ``torch.Generator``s, seeded
with the decoder's ``seed`` (42 by default, the reference's ``torch.manual_seed(42)`` on every
call).

* ``ReferenceRandomness`` yields the reference's numbers in its order: the flow noise
  ``randn_like(mu)`` (network dtype), then the vocoder's initial harmonic phases (``rand``, CPU
  generator) and its source noise (``randn``); the reference's last draw (a noise branch whose
  value is never used) is skipped.
* ``StreamRandomness`` indexes the noise by frame / sample (drawn in fixed chunks), so a frame
  gets the same noise whichever block of a seamless stream produces it. (The reference's noise,
  ``randn(1, 80, frames)`` after ``torch.manual_seed(42)``, depends on the total length, which a
  stream does not know.)
"""
from __future__ import annotations

import numpy as np
import torch


def _uniform_phases(generator: torch.Generator, harmonics: int, dtype: torch.dtype) -> torch.Tensor:
    """``Uniform(-pi, pi).sample((1, H, 1))`` with the fundamental's phase set to 0 (SineGen)."""
    low, high = torch.tensor(-np.pi, dtype=dtype), torch.tensor(np.pi, dtype=dtype)
    rand = torch.rand((1, harmonics, 1), generator=generator, dtype=dtype, device=generator.device)
    phases = low.to(rand.device) + rand * (high - low).to(rand.device)
    phases[:, 0] = 0
    return phases


class ReferenceRandomness:
    """The numbers one reference decoder call draws after ``torch.manual_seed(seed)``, in order."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device).manual_seed(seed)
        # manual_seed seeds the CPU and the CUDA generators; the phases come from the CPU one
        self.cpu = self.generator if device.type == "cpu" else torch.Generator().manual_seed(seed)

    def flow_noise(self, channels: int, frames: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn((1, channels, frames), generator=self.generator, device=self.device, dtype=dtype)

    def phases(self, harmonics: int, dtype: torch.dtype) -> torch.Tensor:
        return _uniform_phases(self.cpu, harmonics, dtype).to(self.device)

    def source_noise(self, harmonics: int, samples: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn((1, harmonics, samples), generator=self.generator, device=self.device, dtype=dtype)


class ChunkedNoise:
    """An endless standard-normal sequence laid out as (rows, per_frame) per frame, drawn
    ``chunk`` frames at a time: the values of a frame do not depend on how callers slice."""

    def __init__(self, generator: torch.Generator, rows: int, per_frame: int, dtype: torch.dtype, chunk: int = 64) -> None:
        self.generator, self.rows, self.per_frame, self.dtype, self.chunk = generator, rows, per_frame, dtype, chunk
        self.first = 0  # frame index of cache[:, 0]
        self.cache = torch.empty(rows, 0, device=generator.device, dtype=dtype)

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """(1, rows, (stop - start) * per_frame)."""
        if start < self.first:
            raise RuntimeError(f"noise for frame {start} was already released (kept from frame {self.first})")
        while self.first + self.cache.size(1) // self.per_frame < stop:
            block = torch.randn((self.chunk, self.rows, self.per_frame), generator=self.generator,
                                device=self.generator.device, dtype=self.dtype)
            self.cache = torch.cat([self.cache, block.permute(1, 0, 2).reshape(self.rows, -1)], dim=1)
        a, b = (start - self.first) * self.per_frame, (stop - self.first) * self.per_frame
        return self.cache[None, :, a:b]

    def release(self, before: int) -> None:
        """Forget the frames before ``before`` (streams call this to keep memory bounded)."""
        drop = max(0, min(before - self.first, self.cache.size(1) // self.per_frame))
        self.cache = self.cache[:, drop * self.per_frame :]
        self.first += drop


class StreamRandomness:
    """Frame-indexed noise for streaming: flow noise per mel frame, source noise per sample and
    one set of initial harmonic phases, from two generators seeded ``seed`` and ``seed + 1``."""

    def __init__(self, seed: int, device: torch.device, channels: int, harmonics: int, samples_per_frame: int,
                 state_dtype: torch.dtype) -> None:
        flow_generator = torch.Generator(device).manual_seed(seed)
        source_generator = torch.Generator(device).manual_seed(seed + 1)
        self.phases = _uniform_phases(source_generator, harmonics, state_dtype)
        self.flow = ChunkedNoise(flow_generator, channels, 1, state_dtype)
        self.source = ChunkedNoise(source_generator, harmonics, samples_per_frame, state_dtype)
