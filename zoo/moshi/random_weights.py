"""Tiny Moshi checkpoints in the published layout, for tests and smoke runs (Mimi part).

``write_tiny_mimi`` writes ``tokenizer-e351c8d8-checkpoint125.safetensors`` with the published
tensor names and ``mimi_config.json`` (tiny_config.TINY_MIMI, the reference's config format).
Weights are seeded random, scaled so that latents, codes and audio are spread out rather than
degenerate (codebook centroids from random EMA sums and usages): everything is noise.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .mimi import Mimi, MimiConfig
from .tiny_config import TINY_MIMI

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
MIMI_CONFIG_FILE = "mimi_config.json"


def random_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A seeded value for a published tensor, by its role (read from its name)."""
    last = name.rsplit(".", 1)[-1]
    if last == "_initialized":
        return torch.ones(shape)
    if last == "cluster_usage":
        return 0.5 + torch.rand(shape, generator=generator)
    if last in ("alpha", "scale") or (last == "weight" and len(shape) == 1):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator) if last != "scale" else \
            0.2 + 0.05 * torch.randn(shape, generator=generator)
    if last == "bias":
        return 0.1 * torch.randn(shape, generator=generator)
    if last == "embedding_sum":
        return torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def random_state(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: random_tensor(k, v.shape, generator).contiguous() for k, v in module.state_dict().items()}


def write_tiny_mimi(folder: Path, *, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mimi = Mimi(MimiConfig.from_dict(TINY_MIMI))
    generator = torch.Generator().manual_seed(seed)
    save_file(random_state(mimi, generator), str(folder / MIMI_FILE))
    (folder / MIMI_CONFIG_FILE).write_text(json.dumps(TINY_MIMI, indent=1))
    return folder
