"""The Whisper-small audio encoder Mini-Omni listens with, loading openai-whisper's ``small.pt``
(encoder tensors only), and Whisper's 80-bin log-mel front end."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper always encodes a 30 s window
FRAMES_PER_SECOND = 50  # encoder output rate


@dataclass(frozen=True)
class EncoderDims:
    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 768
    n_audio_head: int = 12
    n_audio_layer: int = 12

    @classmethod
    def from_checkpoint(cls, dims: dict) -> EncoderDims:
        return cls(**{k: int(dims[k]) for k in cls.__dataclass_fields__})


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """Slaney-style mel filterbank, the one openai-whisper ships (made with librosa)."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(bank.T.astype(np.float32))


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """16 kHz mono -> (n_mels, 3000) log-mel of the audio padded or trimmed to 30 s (float32)."""
    wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[:WINDOW_SAMPLES]
    wav = F.pad(wav, (0, WINDOW_SAMPLES - wav.numel()))
    stft = torch.stft(wav, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(mel_filters(n_mels) @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def feature_frames(num_samples: int) -> int:
    """How many encoder frames the reference keeps: int(duration_ms / 20) + 1, at most 1500."""
    duration_ms = num_samples / SAMPLE_RATE * 1000
    return min(int(duration_ms / 20) + 1, WINDOW_SAMPLES // SAMPLE_RATE * FRAMES_PER_SECOND)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Whisper normalises half-precision inputs in float32; float64 stays float64.
        compute = torch.promote_types(x.dtype, torch.float32)
        y = F.layer_norm(x.to(compute), self.normalized_shape, self.weight.to(compute), self.bias.to(compute), self.eps)
        return y.to(x.dtype)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """openai-whisper's AudioEncoder; state-dict keys are those of ``small.pt`` minus ``encoder.``."""

    def __init__(self, dims: EncoderDims) -> None:
        super().__init__()
        self.dims = dims
        n = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, n, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n, n, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.zeros(dims.n_audio_ctx, n))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(n, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        self.ln_post = LayerNorm(n)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, 3000) -> (B, 1500, n_state)."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)
