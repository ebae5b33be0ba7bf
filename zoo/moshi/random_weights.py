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
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.tiny import cached_folder
from .checkpoint import CONFIG_FILE, DEFAULT_REPO, HUB, MIMI_FILE, MOSHI_FILE, MOSHI_Q8_FILE, TOKENIZER_FILE
from .lm import LMConfig
from .mimi import Mimi, MimiConfig
from .tiny_config import TINY_LM, TINY_MIMI
from .transformer import SCALES, stacked_names

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


def random_state(module: torch.nn.Module, generator: torch.Generator, dtype=None, device=None) -> dict[str, torch.Tensor]:
    """Seeded values for ``module``'s tensors under their published names, in the published
    order, each converted as it is drawn (a full-size LM never exists in float32)."""
    return {k: random_tensor(k, v.shape, generator).to(device, dtype).contiguous()
            for k, v in stacked_names(module.state_dict()).items()}


def write_tiny_mimi(folder: Path, *, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mimi = Mimi(MimiConfig.from_dict(TINY_MIMI))
    generator = torch.Generator().manual_seed(seed)
    save_file(random_state(mimi, generator), str(folder / MIMI_FILE))
    (folder / MIMI_CONFIG_FILE).write_text(json.dumps(TINY_MIMI, indent=1))
    return folder


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
    from .lm import MoshiLM

    folder = write_tiny_mimi(folder, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.device("meta"):
        lm = MoshiLM(LMConfig.from_dict(TINY_LM))
    save_file(random_state(lm, generator, torch.bfloat16), str(folder / MOSHI_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({**TINY_LM, "mimi_config_name": MIMI_CONFIG_FILE}, indent=1))
    write_tiny_tokenizer(folder / TOKENIZER_FILE, TINY_LM["text_card"])
    return folder


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's int8 packing of a weight (moshi.utils.quantize: bitsandbytes'
    ``int8_vectorwise_quant`` of the float16 weight): int8 rows, and each row's largest magnitude
    in float32 (``_scb``)."""
    half = weight.to(torch.float16)
    scale = half.abs().amax(dim=1).float()
    return torch.round(half * (127.0 / scale[:, None])).to(torch.int8), scale


def write_tiny_q8_checkpoint(folder: Path, *, seed: int = 0) -> Path:
    """The tiny checkpoint of ``seed`` as the reference's ``scripts/export_quantized.py`` turns
    kyutai/moshiko-pytorch-bf16 into kyutai/moshiko-pytorch-q8: ``model.q8.safetensors`` with every
    Linear weight of the LM in int8 beside its ``_scb`` scales (the published spellings: stacked
    ``in_proj_weight`` and ``in_proj_weight_scb``), and a config.json with ``quantize`` set, this
    file as ``moshi_name`` and Mimi and the tokenizer named in the bf16 repo (``hf://``). Those two
    files are copied here as well, so the folder works offline."""
    from .lm import MoshiLM

    source = tiny_checkpoint(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / CONFIG_FILE).read_text())
    with torch.device("meta"):
        lm = MoshiLM(LMConfig.from_dict({k: v for k, v in config.items() if k != "mimi_config_name"}))
    linears = stacked_names({f"{name}.weight": module.weight for name, module in lm.named_modules()
                             if isinstance(module, torch.nn.Linear)})
    state = {}
    for key, value in load_file(str(source / MOSHI_FILE)).items():
        if key in linears:
            state[key], state[key + SCALES] = int8_rows(value)
        else:
            state[key] = value
    save_file(state, str(folder / MOSHI_Q8_FILE))
    for name in (MIMI_FILE, MIMI_CONFIG_FILE, TOKENIZER_FILE):
        shutil.copy(source / name, folder / name)
    (folder / CONFIG_FILE).write_text(json.dumps({
        **config, "moshi_name": MOSHI_Q8_FILE, "quantize": True,
        "mimi_name": f"{HUB}{DEFAULT_REPO}/{MIMI_FILE}", "tokenizer_name": f"{HUB}{DEFAULT_REPO}/{TOKENIZER_FILE}"}, indent=1))
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

    from ..core.devices import pick_device
    from .checkpoint import place_lm
    from .lm import MoshiLM, lm_names
    from .mimi import MimiConfig, mimi_names
    from .model import Moshi, precision

    device = pick_device(device)
    dtype, quantized = precision(dtype, device)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        mimi, lm = Mimi(MimiConfig()), MoshiLM(LMConfig())
    mimi_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mimi.load_state_dict(mimi_names(random_state(mimi, generator, mimi_dtype, device)), assign=True)
    # drawn in the compute dtype on the host (the packer reads it back to float32 one layer at a time)
    state = lm_names(random_state(lm, generator, dtype, "cpu" if quantized else device), lm.config)
    place_lm(lm, state, device, dtype, quantized)
    folder = tiny_checkpoint(seed)  # a tokenizer for the pieces (ids beyond it give "")
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / TOKENIZER_FILE))
    return Moshi(mimi.eval(), lm, tokenizer, source="random full")
