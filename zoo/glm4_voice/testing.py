"""Tiny GLM-4-Voice checkpoints in the published layouts, for tests (random weights: noise).
So far: the speech tokenizer folder (config.json, preprocessor_config.json, model.safetensors)."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .speech_tokenizer import SpeechTokenizerEncoder, TokenizerConfig

TINY_TOKENIZER = replace(TokenizerConfig(), d_model=64, encoder_attention_heads=4, encoder_ffn_dim=128,
                         quantize_position=2, pooling_position=2)
# whisper-large-v3's feature extractor settings, as glm-4-voice-tokenizer publishes them
PREPROCESSOR = dict(chunk_length=30, feature_extractor_type="WhisperFeatureExtractor", feature_size=128,
                    hop_length=160, n_fft=400, n_samples=480000, nb_max_frames=3000, padding_side="right",
                    padding_value=0.0, processor_class="WhisperProcessor", return_attention_mask=False,
                    sampling_rate=16000)


def write_tiny_tokenizer(folder: Path, seed: int = 0, config: TokenizerConfig = TINY_TOKENIZER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = SpeechTokenizerEncoder(config).state_dict()
    state = {}
    for name, tensor in names.items():
        if name == "ema_count":
            state[name] = torch.ones(tensor.shape)
        elif name.endswith("layer_norm.weight"):
            state[name] = 1 + 0.05 * torch.randn(tensor.shape, generator=generator)
        elif name.endswith(".bias"):
            state[name] = 0.02 * torch.randn(tensor.shape, generator=generator)
        elif name in ("codebook.weight", "ema_weight"):  # codes as large as the hidden states
            state[name] = torch.randn(tensor.shape, generator=generator)
        else:
            fan_in = tensor.shape[1] * (tensor.shape[2] if tensor.dim() == 3 else 1) if tensor.dim() > 1 else 1
            state[name] = torch.randn(tensor.shape, generator=generator) / (fan_in**0.5)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})  # as save_pretrained writes it
    published = {**asdict(config), "architectures": ["WhisperVQEncoder"], "model_type": "whisper",
                 "encoder_layers": 32, "num_hidden_layers": 32, "vocab_size": 51866, "torch_dtype": "float32",
                 "quantize_ema_decay": 0.99, "quantize_restart_interval": 100, "quantize_loss_scale": 10.0,
                 "quantize_commit_coefficient": 0.25, "skip_language_detection": True}
    (folder / "config.json").write_text(json.dumps(published, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return folder
