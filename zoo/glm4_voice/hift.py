"""The vocoder (the reference's ``HiFTGenerator``, CosyVoice's HiFT: a neural source-filter
HiFi-GAN with an iSTFT head): 80-bin mel at 86.13 frames/s -> 22050 Hz audio, 256 samples per
frame.

mel -> f0 predictor (5 convs + ELU, linear, abs) -> f0 per frame -> repeated 256x -> 9 sine
harmonics with random initial phases (the fundamental's phase is 0), voiced where f0 > 10 Hz,
plus Gaussian noise -> linear + tanh = the source signal ``s``. The filter: conv_pre, two
transposed-conv upsamplings (x8, x8), each followed by the STFT of ``s`` brought to that rate
(source_downs + a ResBlock) and the mean of three ResBlocks (Snake activations); conv_post gives
the log-magnitude and phase of a 16-point iSTFT with hop 4.

Randomness is an input here (``phases``, ``noise``): the decoder draws it, so this module never
touches an RNG. The source is computed in float32 (float64 in float64 runs) whatever the network
dtype, as the reference does: a cumulative phase needs the precision.

The published ``hift.pt`` uses the legacy weight-norm names ``weight_g``/``weight_v``; the
modules here use ``torch.nn.utils.parametrizations.weight_norm``, and
:func:`published_to_module_keys` / :func:`module_to_published_keys` map the names (same tensors).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .decoder_config import HiftConfig


def source_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the sine source and the (i)STFT: float64 stays, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def published_to_module_keys(state: dict) -> dict:
    """``x.weight_g``/``x.weight_v`` -> ``x.parametrizations.weight.original0``/``original1``."""
    renamed = {}
    for key, value in state.items():
        if key.endswith(".weight_g"):
            key = key[: -len("weight_g")] + "parametrizations.weight.original0"
        elif key.endswith(".weight_v"):
            key = key[: -len("weight_v")] + "parametrizations.weight.original1"
        renamed[key] = value
    return renamed


def module_to_published_keys(state: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        renamed[key] = value
    return renamed


def hann_window(n_fft: int) -> torch.Tensor:
    """scipy's ``get_window("hann", n_fft, fftbins=True)`` (periodic), stored as float32 like the
    reference's ``stft_window``."""
    angles = np.linspace(-np.pi, np.pi, n_fft + 1)[:-1]
    return torch.from_numpy((0.5 + 0.5 * np.cos(angles)).astype(np.float32))


class Snake(nn.Module):
    """x + 1/alpha * sin^2(alpha x), one alpha per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


def _conv(channels_in: int, channels_out: int, kernel: int, dilation: int = 1, **kwargs) -> nn.Conv1d:
    padding = kwargs.pop("padding", (kernel * dilation - dilation) // 2)
    return weight_norm(nn.Conv1d(channels_in, channels_out, kernel, dilation=dilation, padding=padding, **kwargs))


class ResBlock(nn.Module):
    """For each dilation d: x += conv(snake(conv_d(snake(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(_conv(channels, channels, kernel, d) for d in dilations)
        self.convs2 = nn.ModuleList(_conv(channels, channels, kernel) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class ConvRNNF0Predictor(nn.Module):
    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [_conv(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 80, T) -> f0 (B, T) in Hz."""
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class SourceModule(nn.Module):
    """``m_source``: merges the harmonics into one excitation (linear + tanh)."""

    def __init__(self, harmonics: int) -> None:
        super().__init__()
        self.l_linear = nn.Linear(harmonics, 1)

    def forward(self, harmonics: torch.Tensor) -> torch.Tensor:
        """(B, H, L) -> (B, 1, L)."""
        weight = self.l_linear.weight
        return torch.tanh(self.l_linear(harmonics.transpose(1, 2).to(weight.dtype))).transpose(1, 2)


class HiFTGenerator(nn.Module):
    def __init__(self, config: HiftConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.m_source = SourceModule(c.nb_harmonics + 1)
        self.conv_pre = _conv(c.in_channels, c.base_channels, 7, padding=3)
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(c.base_channels // 2**i, c.base_channels // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)))
        # The source's STFT enters after each upsampling: downsampled by the remaining rate.
        remaining = np.cumprod([1] + list(c.upsample_rates[::-1][:-1]))[::-1]
        spectrum = c.istft_n_fft + 2
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(remaining, c.source_resblock_kernel_sizes, c.source_resblock_dilation_sizes)):
            width = c.base_channels // 2 ** (i + 1)
            u = int(u)
            self.source_downs.append(nn.Conv1d(spectrum, width, 1) if u == 1 else
                                     nn.Conv1d(spectrum, width, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(width, k, tuple(d)))
        self.resblocks = nn.ModuleList(
            ResBlock(c.base_channels // 2 ** (i + 1), k, tuple(d))
            for i in range(len(self.ups)) for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        self.conv_post = _conv(c.base_channels // 2 ** len(self.ups), spectrum, 7, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(c.in_channels, c.f0_cond_channels)
        self.register_buffer("stft_window", hann_window(c.istft_n_fft), persistent=False)

    @property
    def samples_per_frame(self) -> int:
        return self.config.samples_per_frame

    # -- the source ---------------------------------------------------------------------------

    def harmonic_frequencies(self, f0: torch.Tensor) -> torch.Tensor:
        """f0 (B, T) per frame -> (B, H, T*256) cycles per sample of each harmonic, in the source
        dtype (f0 repeated per sample, as the reference's nearest x256 upsampling)."""
        c = self.config
        f0 = f0.to(source_dtype(f0.dtype)).repeat_interleave(self.samples_per_frame, dim=-1)[:, None]
        harmonic = torch.arange(1, c.nb_harmonics + 2, device=f0.device, dtype=f0.dtype)[None, :, None]
        # the reference computes f0 * (i + 1) / sr per harmonic
        return f0 * harmonic / c.sampling_rate

    def source(self, f0: torch.Tensor, cycles: torch.Tensor, phases: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """f0 (B, T); cycles (B, H, L) = the running phase in cycles, in [0, 1) (see
        :meth:`harmonic_frequencies`); phases (B, H, 1) initial phases; noise (B, H, L) standard
        normal -> source (B, 1, L) in the network dtype."""
        c = self.config
        dtype = cycles.dtype
        sines = c.nsf_alpha * torch.sin(2 * np.pi * cycles + phases.to(dtype))
        # voiced/unvoiced and the noise amplitude are float32 in the reference, whatever the dtype
        voiced = (f0.repeat_interleave(self.samples_per_frame, dim=-1)[:, None] > c.nsf_voiced_threshold).float()
        noise_amplitude = voiced * c.nsf_sigma + (1 - voiced) * c.nsf_alpha / 3
        return self.m_source(sines * voiced + noise_amplitude * noise.to(dtype))

    # -- the filter ---------------------------------------------------------------------------

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        spec = torch.stft(x, c.istft_n_fft, c.istft_hop, c.istft_n_fft, window=self.stft_window.to(x.dtype),
                          return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        c = self.config
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, c.istft_n_fft, c.istft_hop, c.istft_n_fft, window=self.stft_window.to(magnitude.dtype))

    def filter(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T), source (B, 1, T*256) -> audio (B, T*256), clamped to +-audio_limit."""
        c = self.config
        dtype = mel.dtype
        spectrum_dtype = source_dtype(dtype)
        s_stft = self._stft(source[:, 0].to(spectrum_dtype)).to(dtype)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # the reference's ReflectionPad1d((1, 0))
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            kernels = len(c.resblock_kernel_sizes)
            blocks = self.resblocks[i * kernels : (i + 1) * kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as in the reference
        bins = c.istft_n_fft // 2 + 1
        x = x.to(spectrum_dtype)
        audio = self._istft(torch.exp(x[:, :bins]), torch.sin(x[:, bins:]))
        return torch.clamp(audio, -c.audio_limit, c.audio_limit)

    def forward(self, mel: torch.Tensor, phases: torch.Tensor, noise: torch.Tensor,
                cache_source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's ``HiFTGenerator.inference``: mel (B, 80, T); phases (B, H, 1) with the
        fundamental's set to 0 by the caller; noise (B, H, T*256); cache_source (B, 1, n) replaces
        the first n source samples -> (audio (B, T*256), source (B, 1, T*256))."""
        f0 = self.f0_predictor(mel)
        cycles = torch.cumsum(self.harmonic_frequencies(f0), dim=-1) % 1
        s = self.source(f0, cycles, phases, noise)
        if cache_source is not None and cache_source.size(-1):
            s = s.clone()
            s[:, :, : cache_source.size(-1)] = cache_source
        return self.filter(mel, s), s


def receptive_field_frames(config: HiftConfig) -> int:
    """Mel frames on either side of a frame that can change its output samples, given the same
    source signal: an upper bound summed over the layers (conv_pre; per upsampling level the
    transposed conv, the longest main and source ResBlocks and the source downsampling; conv_post
    and the STFTs), plus the f0 predictor's reach (five k3 convs) on the source. The streaming
    decoder keeps this much mel around what it emits so that chunked vocoding equals one pass."""
    c = config

    def resblock_reach(kernels, dilations) -> int:  # samples at the level's rate
        return max(sum((k - 1) // 2 * (d + 1) for d in ds) for k, ds in zip(kernels, dilations))

    reach, rate = 3.0 + 5.0, 1
    for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
        rate *= u
        source_kernel = 2 * (c.samples_per_frame // c.istft_hop) // rate if rate * c.istft_hop < c.samples_per_frame else 1
        reach += k / rate + (resblock_reach(c.resblock_kernel_sizes, c.resblock_dilation_sizes)
                             + resblock_reach(c.source_resblock_kernel_sizes[i:i + 1], c.source_resblock_dilation_sizes[i:i + 1])
                             + source_kernel) / rate
    reach += 3 / rate + c.istft_n_fft / c.samples_per_frame
    return int(math.ceil(reach))
