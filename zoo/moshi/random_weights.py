"""Tiny Moshi checkpoints in the published layout, for tests and smoke runs.

``write_tiny_checkpoint`` writes the files of kyutai/moshiko-pytorch-bf16 under their published
names and tensor names: ``model.safetensors`` (bfloat16, as published),
``tokenizer-e351c8d8-checkpoint125.safetensors`` (Mimi, float32) and ``tokenizer_spm_32k_3.model``
(a SentencePiece model trained here on a few sentences, with the published special ids: 0 unk,
1 bos, 2 eos, 3 pad), plus ``config.json`` in the reference's checkpoint-info format naming a
``mimi_config.json`` (tiny_config: the published structure with tiny widths).
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


MOSHI_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
# Bump when what write_tiny_checkpoint writes changes: cached folders of other versions are not reused.
TINY_FORMAT = 1

_SENTENCES = [
    "hello there how are you doing today", "i am moshi a speech model from kyutai",
    "the weather is nice and the sun is out", "what would you like to talk about",
    "tell me a story about a cat and a dog", "that sounds good to me let us go",
]


def write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A SentencePiece unigram model of ``vocab_size`` pieces, trained on a few sentences."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 20), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=True, character_coverage=1.0,
        minloglevel=2, num_threads=1)
    path.write_bytes(model.getvalue())


def write_tiny_checkpoint(folder: Path, *, seed: int = 0) -> Path:
    from .lm import LMConfig, MoshiLM
    from .tiny_config import TINY_LM

    folder = write_tiny_mimi(folder, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.device("meta"):
        lm = MoshiLM(LMConfig.from_dict(TINY_LM))
    state = {k: v.to(torch.bfloat16) for k, v in random_state(lm, generator).items()}
    save_file(state, str(folder / MOSHI_FILE))
    (folder / "config.json").write_text(json.dumps({**TINY_LM, "mimi_config_name": MIMI_CONFIG_FILE}, indent=1))
    write_tiny_tokenizer(folder / TOKENIZER_FILE, TINY_LM["text_card"])
    return folder
