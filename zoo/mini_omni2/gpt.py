"""Mini-Omni2's LLM: Mini-Omni's (zoo.mini_omni.gpt) plus ``vision_adapter``, the gated MLP that
maps CLIP features into the embedding space. Its yaml adds ``vision_adapter_dim``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mini_omni.config import GPTConfig
from ..mini_omni.gpt import GPT, GatedMLP

IMAGE_START = 1  # image features replace the audio streams at positions 1..50, after ``_image``


@dataclass(frozen=True)
class VisionGPTConfig(GPTConfig):
    vision_adapter_dim: int = 512


class VisionGPT(GPT):
    def __init__(self, config: VisionGPTConfig) -> None:
        super().__init__(config)
        # registered after lm_head and before transformer, as the reference's GPT: wte is still
        # loaded last, so with tied embeddings its values win (see GPT.__init__)
        transformer = self._modules.pop("transformer")
        self.vision_adapter = GatedMLP(config.vision_adapter_dim, config.intermediate_size, config.n_embd, config.bias)
        self.transformer = transformer

    def embed(self, tokens: torch.Tensor, audio_features: torch.Tensor | None = None, audio_start: int = 1,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """As GPT.embed, and ``image_features`` (B, n, vision_dim) replace the audio streams at
        positions 1..n (the reference's concat_feat for its ImageQA tasks)."""
        emb = self.stream_embeddings(tokens, audio_features, audio_start)
        if image_features is not None:
            self.place(emb, self.vision_adapter(image_features.to(emb.dtype)), IMAGE_START)
        return self.mean_of_streams(emb)
