"""The LLM's configuration, read from the published litgpt ``model_config.yaml``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..core.errors import WeightsNotFound


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 24
    n_head: int = 14
    n_query_groups: int = 2
    head_size: int = 64
    n_embd: int = 896
    intermediate_size: int = 4864
    padded_vocab_size: int = 181120
    text_vocab_size: int = 152000
    audio_vocab_size: int = 4160
    whisper_adapter_dim: int = 768
    norm_eps: float = 1e-6
    rope_base: int = 1_000_000
    rotary_percentage: float = 1.0
    block_size: int = 2048
    add_qkv_bias: bool = True
    bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)

    @classmethod
    def from_yaml(cls, path: str | Path) -> GPTConfig:
        """Read litgpt's yaml. Keys we do not use are ignored (the reference's strict Config would
        reject unknown keys); values that would need code we do not have are refused clearly."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        required = {
            "mlp_class_name": "LLaMAMLP",
            "norm_class_name": "RMSNorm",
            "parallel_residual": False,
            "asr_adapter": "llamamlp",
            "scale_embeddings": False,
        }
        for key, wanted in required.items():
            if key in raw and raw[key] != wanted:
                raise WeightsNotFound(f"{path}: {key}={raw[key]!r} is not supported (Mini-Omni uses {wanted!r})")
        if "Gemma" in str(raw.get("name", "")):
            raise WeightsNotFound(f"{path}: Gemma-style RMSNorm is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields and v is not None}
        if "head_size" not in values and "n_embd" in values and "n_head" in values:
            values["head_size"] = values["n_embd"] // values["n_head"]
        if "n_query_groups" not in values and "n_head" in values:
            values["n_query_groups"] = values["n_head"]
        return cls(**values)

    def to_yaml_dict(self) -> dict:
        return dataclasses.asdict(self)
