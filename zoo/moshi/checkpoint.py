"""Loading Moshi's published files unchanged: ``model.safetensors`` (the LM),
``tokenizer-e351c8d8-checkpoint125.safetensors`` (Mimi) and ``tokenizer_spm_32k_3.model`` (the
SentencePiece text tokenizer), from a folder or a hub repo (kyutai/moshiko-pytorch-bf16,
kyutai/moshika-pytorch-bf16 ...), and the int8 repos (kyutai/moshiko-pytorch-q8 ...).

A ``config.json`` next to them is read as the reference's checkpoint info (loaders.py
``CheckpointInfo.from_hf_repo``): the LM settings plus ``moshi_name``, ``mimi_name``,
``tokenizer_name``, ``mimi_config_name`` (a Mimi config file in the same folder), ``model_type``,
``lm_gen_config`` (sampling defaults) and ``quantize`` (the LM file is int8). A name may point
into another hub repo as ``hf://owner/repo/file``: the q8 repos name the bf16 repo's Mimi and
tokenizer that way. Without a config.json, the published 7B settings apply, as the reference does
for repos that carry none. Loading is strict: every missing, unexpected or mis-shaped tensor is
named in one CheckpointMismatch. Every key spelling the reference accepts loads: attention
projections stacked over the depformer's steps (``in_proj_weight``, as published), per step
(``in_projs.K.weight``) or as ``in_proj.weight``, and the older codebook buffer names of Mimi.

The int8 files are what the reference's ``scripts/export_quantized.py`` writes (moshi.utils.quantize,
bitsandbytes' row-wise int8): every Linear weight of the LM (and the attention projections) as
int8 rows ``W`` with ``W_scb``, each row's largest magnitude (float32), the row read back as
``W * W_scb / 127``; embeddings and norms stay bfloat16.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from ..core.checkpoints import load_strict, read_state_dict, resolve_files, strict_problems
from ..core.errors import CheckpointMismatch
from ..core.quantize import place
from .lm import Depformer, LMConfig, MoshiLM, lm_names
from .mimi import Mimi, MimiConfig, mimi_names
from .transformer import SCALES, StreamingTransformer

MOSHI_FILE = "model.safetensors"
MOSHI_Q8_FILE = "model.q8.safetensors"  # the -q8 repos' LM (config.json names it)
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
CONFIG_FILE = "config.json"
DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"
HUB = "hf://"
# checkpoint-info keys that are not LM settings (loaders.py pops them before building the LM)
INFO_KEYS = ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lora_name", "model_type",
             "lm_gen_config", "tts_config", "stt_config", "model_id", "quantize")


@dataclass
class CheckpointInfo:
    folder: Path
    lm: LMConfig
    mimi: MimiConfig
    moshi_path: Path
    mimi_path: Path
    tokenizer_path: Path
    quantized: bool = False  # config.json's "quantize": the LM file holds int8 weights
    lm_gen_config: dict = field(default_factory=dict)

    @classmethod
    def read(cls, source) -> CheckpointInfo:
        """``source``: a folder or hub repo id holding the published files (and maybe config.json)."""
        folder = resolve_files(source, [], component="checkpoint", optional=[CONFIG_FILE])
        path = folder / CONFIG_FILE
        if not path.is_file():
            paths = _files(source, folder, [MOSHI_FILE, MIMI_FILE, TOKENIZER_FILE], path)
            return cls(folder, LMConfig(), MimiConfig(), *paths)
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise CheckpointMismatch(f"{path}: expected a JSON object")
        info = {k: raw.pop(k) for k in INFO_KEYS if k in raw}
        if info.get("model_type", "moshi") != "moshi":
            raise CheckpointMismatch(f"{path}: model_type {info['model_type']!r} is not Moshi")
        if info.get("lora_name") or info.get("tts_config") or info.get("stt_config"):
            raise CheckpointMismatch(f"{path}: LoRA, TTS and STT checkpoints are not supported")
        names = [info.get("moshi_name", MOSHI_FILE), info.get("mimi_name", MIMI_FILE),
                 info.get("tokenizer_name", TOKENIZER_FILE)]
        extra = [info["mimi_config_name"]] if "mimi_config_name" in info else []
        paths = _files(source, folder, names + extra, path)
        try:
            lm = LMConfig.from_dict(raw)
            mimi = MimiConfig.from_dict(json.loads(paths[3].read_text())) if extra else MimiConfig()
            sampling = dict(info.get("lm_gen_config") or {})
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointMismatch(f"{path}: {err}") from None
        return cls(folder, lm, mimi, *paths[:3], quantized=bool(info.get("quantize")), lm_gen_config=sampling)


def _files(source, folder: Path, names: list[str], config: Path) -> list[Path]:
    """The files a checkpoint names, in order: a plain name from the checkpoint itself;
    ``hf://owner/repo/file`` from that hub repo, unless the checkpoint's folder holds a file of
    that name (so a folder copied whole works offline). Anything else (an absolute path, "..",
    another scheme) is refused: a config.json from the hub must not point at this machine's files."""
    where: list[tuple[str | None, str]] = []  # (another repo or None, the file's path in it)
    for name in names:
        if not isinstance(name, str):
            raise CheckpointMismatch(f"{config}: {name!r} is not a file name")
        repo, inner = None, name
        if name.startswith(HUB):
            parts = name[len(HUB):].split("/")
            repo, inner = "/".join(parts[:2]), "/".join(parts[2:])
        pure = PurePosixPath(inner)
        if not inner or "://" in inner or "\\" in inner or pure.is_absolute() or ".." in pure.parts \
                or (repo is not None and len(parts) < 3):
            raise CheckpointMismatch(f"{config}: {name!r} is not a file of the checkpoint or an hf://owner/repo/file name")
        if repo is not None and (folder / inner).is_file():
            repo = None
        where.append((repo, inner))
    local = resolve_files(source, [inner for repo, inner in where if repo is None], component="checkpoint")
    return [local / inner if repo is None else resolve_files(repo, [inner], component="checkpoint") / inner
            for repo, inner in where]


def load_mimi(info: CheckpointInfo, device, dtype: torch.dtype) -> Mimi:
    """Mimi with as many codebooks as the LM's streams use (the reference's get_mimi call)."""
    with torch.device("meta"):
        mimi = Mimi(info.mimi, num_codebooks=max(info.lm.dep_q, info.lm.n_q - info.lm.dep_q))
    load_strict(mimi, info.mimi_path, "Mimi (published tokenizer-e351c8d8 layout)",
                rename=lambda state: {k: v.to(dtype) if v.is_floating_point() else v for k, v in mimi_names(state).items()})
    return mimi.to(device).eval()


def load_lm(info: CheckpointInfo, device, dtype: torch.dtype, quantized: str | None = None) -> MoshiLM:
    """The LM from its file, strictly, placed on ``device`` part by part (each layer of the two
    transformers, then each other top-level module), each part's tensors freed from the host as it
    is placed. ``quantized`` ("int8", "int4"): every Linear packed as its part is placed
    (zoo.core.quantize), as the reference's q8 export packs every Linear; ``dtype`` is then the
    compute dtype of everything. An int8 file's rows are read back to float32 (``W * W_scb / 127``)
    and packed again: to int8 that gives back the file's own values and scales (on a CPU and in
    bitsandbytes, which packs from float16, where they are exact), so nothing is rounded twice;
    with a float ``dtype`` an int8 file runs dequantized."""
    path = info.moshi_path
    with torch.device("meta"):
        lm = MoshiLM(info.lm)
    state = lm_names(read_state_dict(path), info.lm)
    scales = {k.removesuffix(SCALES): state.pop(k) for k in [k for k in state if k.endswith(SCALES)]}
    problems = [strict_problems(lm.state_dict(), state)]
    unpaired = sorted(k for k in scales if k not in state or state[k].dtype != torch.int8)
    unscaled = sorted(k for k, v in state.items() if v.dtype == torch.int8 and k not in scales)
    problems += [f"int8 scales without an int8 weight: {', '.join(unpaired[:5])}" if unpaired else "",
                 f"int8 weights without scales: {', '.join(unscaled[:5])}" if unscaled else "",
                 "config.json sets quantize but the file holds no int8 weights" if info.quantized and not scales else ""]
    if any(problems):
        raise CheckpointMismatch(f"{path} does not match the Moshi LM (published model.safetensors layout"
                                 f"{' in int8' if info.quantized else ''}): {'; '.join(p for p in problems if p)}")
    place_lm(lm, state, device, dtype, quantized, scales)
    return lm


def place_lm(lm: MoshiLM, state: dict[str, torch.Tensor], device, dtype: torch.dtype, quantized: str | None = None,
             scales: dict[str, torch.Tensor] | None = None) -> MoshiLM:
    """Load ``state`` (this module's names, checked) into ``lm`` (built on the meta device) part by
    part, each part's tensors taken out of ``state`` as it is placed, so the host never holds the
    network twice. ``scales``: int8 weights' row scales (``_scb``), read back to float32 weights
    first; ``quantized``: every Linear packed as its part is placed."""
    scales = scales or {}
    linears = {f"{name}.weight" for name, module in lm.named_modules() if isinstance(module, nn.Linear)}
    for prefix, part, layer in _parts(lm):
        own = {}
        for key in [k for k in state if k.startswith(prefix + ".")]:
            value = state.pop(key)
            if key in scales:
                value = value.float() * (scales[key].float() / 127)[:, None]
            # weights to pack stay float32 (their int8 rows come back exactly); all else computes in dtype
            own[key[len(prefix) + 1:]] = value.float() if quantized and key in linears else value.to(dtype)
        part.load_state_dict(own, strict=True, assign=True)
        if layer:
            place(part, device, dtype, quantized)
    place(lm, device, dtype, quantized)  # the rest (embeddings, heads): a Linear child is packed from its parent
    return lm.eval()


def _parts(lm: MoshiLM):
    """(state-dict prefix, module, whether it is a layer) for each layer of the two transformers,
    then each other child of the LM."""
    for name, child in lm.named_children():
        if isinstance(child, (StreamingTransformer, Depformer)):
            for i, layer in enumerate(child.layers):
                yield f"{name}.layers.{i}", layer, True
        else:
            yield name, child, False
