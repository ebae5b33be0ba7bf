"""Loading Moshi's published files unchanged: ``model.safetensors`` (the LM),
``tokenizer-e351c8d8-checkpoint125.safetensors`` (Mimi) and ``tokenizer_spm_32k_3.model`` (the
SentencePiece text tokenizer), from a folder or a hub repo (kyutai/moshiko-pytorch-bf16,
kyutai/moshika-pytorch-bf16 ...).

A ``config.json`` next to them is read as the reference's checkpoint info (loaders.py
``CheckpointInfo.from_hf_repo``): the LM settings plus ``moshi_name``, ``mimi_name``,
``tokenizer_name``, ``mimi_config_name`` (a Mimi config file in the same folder), ``model_type``
and ``lm_gen_config`` (sampling defaults). Without one, the published 7B settings apply, as the
reference does for the published repos (which carry none). Loading is strict: every missing,
unexpected or mis-shaped tensor is named in one CheckpointMismatch. Both key spellings the
reference accepts load: attention projections stacked over the depformer's steps
(``in_proj_weight``, as published) or per step (``in_projs.K.weight``), and the older codebook
buffer names of Mimi.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.checkpoints import load_strict, resolve_files
from ..core.errors import CheckpointMismatch
from .lm import LMConfig, MoshiLM, published_lm_names
from .mimi import Mimi, MimiConfig
from .quantizer import legacy_codebook_names

MOSHI_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
CONFIG_FILE = "config.json"
DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"
# checkpoint-info keys that are not LM settings (loaders.py pops them before building the LM)
INFO_KEYS = ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lora_name", "model_type",
             "lm_gen_config", "tts_config", "stt_config", "model_id")


@dataclass
class CheckpointInfo:
    folder: Path
    lm: LMConfig
    mimi: MimiConfig
    moshi_name: str = MOSHI_FILE
    mimi_name: str = MIMI_FILE
    tokenizer_name: str = TOKENIZER_FILE
    lm_gen_config: dict = field(default_factory=dict)

    @classmethod
    def read(cls, source) -> CheckpointInfo:
        """``source``: a folder or hub repo id holding the published files (and maybe config.json)."""
        folder = resolve_files(source, [], component="checkpoint", optional=[CONFIG_FILE])
        path = folder / CONFIG_FILE
        if not path.is_file():
            folder = resolve_files(source, [MOSHI_FILE, MIMI_FILE, TOKENIZER_FILE], component="checkpoint")
            return cls(folder, LMConfig(), MimiConfig())
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
        folder = resolve_files(source, names + extra, component="checkpoint")
        try:
            lm = LMConfig.from_dict(raw)
            mimi = MimiConfig.from_dict(json.loads((folder / extra[0]).read_text())) if extra else MimiConfig()
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointMismatch(f"{path}: {err}") from None
        return cls(folder, lm, mimi, *names, lm_gen_config=dict(info.get("lm_gen_config") or {}))


def _converted(dtype: torch.dtype, rename):
    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in rename(state).items()}
    return convert


def load_mimi(info: CheckpointInfo, device, dtype: torch.dtype) -> Mimi:
    """Mimi with as many codebooks as the LM's streams use (the reference's get_mimi call)."""
    with torch.device("meta"):
        mimi = Mimi(info.mimi, num_codebooks=max(info.lm.dep_q, info.lm.n_q - info.lm.dep_q))
    load_strict(mimi, info.folder / info.mimi_name, "Mimi (published tokenizer-e351c8d8 layout)",
                rename=_converted(dtype, legacy_codebook_names))
    return mimi.to(device).eval()


def load_lm(info: CheckpointInfo, device, dtype: torch.dtype) -> MoshiLM:
    with torch.device("meta"):
        lm = MoshiLM(info.lm)
    load_strict(lm, info.folder / info.moshi_name, "the Moshi LM (published model.safetensors layout)",
                rename=_converted(dtype, lambda s: published_lm_names(s, info.lm)))
    return lm.to(device).eval()
