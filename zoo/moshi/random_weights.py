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

from ..core.tiny import cached_folder
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


def tiny_checkpoint(seed: int = 0, root=None) -> Path:
    """The tiny checkpoint folder for ``seed``, written once into a cache directory
    (``ZOO_TINY_DIR``, else the system temp dir) and reused."""
    return cached_folder(f"moshi-v{TINY_FORMAT}-seed{seed}", lambda folder: write_tiny_checkpoint(folder, seed=seed),
                         root)


def build(size: str, *, device=None, dtype=None, seed: int = 0, checkpoint=None):
    """``tiny``: the tiny folder through the real loader (``checkpoint`` replaces it); ``full``:
    the published 7B sizes in memory with seeded random weights (for benchmarks)."""
    from .model import Moshi

    if size == "tiny":
        return Moshi.load(device=device, dtype=dtype, checkpoint=checkpoint or tiny_checkpoint(seed))
    if size != "full":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    return _build_full(device=device, dtype=dtype, seed=seed)


def _build_full(*, device, dtype, seed: int):
    import sentencepiece

    from ..core.devices import pick_device, pick_dtype
    from .lm import LMConfig, MoshiLM
    from .mimi import MimiConfig
    from .model import Moshi

    device = pick_device(device)
    dtype = pick_dtype(dtype, default=torch.bfloat16 if device.type == "cuda" else torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        mimi, lm = Mimi(MimiConfig()), MoshiLM(LMConfig())
    for module, kind in ((mimi, torch.float32 if dtype != torch.float64 else dtype), (lm, dtype)):
        state = {k: random_tensor(k, v.shape, generator).to(device, kind) for k, v in module.state_dict().items()}
        module.load_state_dict(state, assign=True)
    folder = tiny_checkpoint(seed)  # a tokenizer for the pieces (ids beyond it give "")
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / TOKENIZER_FILE))
    return Moshi(mimi.eval(), lm.eval(), tokenizer, source="random full")
