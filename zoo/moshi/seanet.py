"""Mimi's SEANet encoder and decoder: causal convolutions that stream exactly.

Module names are the published tensor names of ``tokenizer-e351c8d8-checkpoint125.safetensors``
(``encoder.model.N.conv.conv.weight``, ``decoder.model.N.convtr.convtr.weight``,
``encoder.model.N.block.1.conv.conv.weight`` ...): the reference nests each convolution in a
streaming wrapper and a norm wrapper, and its ``nn.Sequential`` numbering counts the ELUs.

Streaming state (zoo.core.streaming.BufferState, one row per session): each convolution keeps its
last ``(kernel - 1) * dilation + 1 - stride`` input samples (zeros at the start: the reference's
``pad_mode="constant"``), each transposed convolution the ``kernel - stride`` output samples that
its next input still adds to. With such state the reference computes one-pass and streaming
outputs the same way, so a fresh state is also the one-pass computation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.streaming import BufferState


@dataclass(frozen=True)
class SEANetConfig:
    """The reference's ``_seanet_kwargs`` (loaders.py); only these fields vary between Mimi
    configs, the rest (causal, ELU, no norm, constant padding, true skip) is fixed there."""

    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)


class _Holder(nn.Module):
    """The reference's norm wrapper (``NormConv1d``): one level of naming, nothing else."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__()
        self.add_module(name, layer)


class StreamingConv1d(nn.Module):
    """A causal Conv1d (key ``<name>.conv.conv.*``). ``replicate``: at a stream's first call the
    left context is the first input sample repeated instead of zeros (the reference's
    ``pad_mode="replicate"``, used by Mimi's downsampling convolution)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                 bias: bool = True, replicate: bool = False) -> None:
        super().__init__()
        self.conv = _Holder("conv", nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, groups=groups, bias=bias))
        self.stride = stride
        self.context = (kernel - 1) * dilation + 1 - stride
        self.in_channels = cin
        self.replicate = replicate
        self.key = ""

    def buffers_for(self, rows: int, dtype, device) -> dict[str, torch.Tensor]:
        out = {self.key: torch.zeros(rows, self.in_channels, self.context, dtype=dtype, device=device)}
        if self.replicate:
            out[self.key + ".first"] = torch.ones(rows, dtype=torch.bool, device=device)
        return out

    def forward(self, x: torch.Tensor, state: BufferState) -> torch.Tensor:
        if x.size(-1) % self.stride:
            raise ValueError(f"streaming convolution needs a multiple of its stride {self.stride}, got {x.size(-1)}")
        if self.context:
            previous = state.buffers[self.key]
            if self.replicate:
                first = state.buffers[self.key + ".first"]
                previous = torch.where(first[:, None, None], x[..., :1].expand_as(previous), previous)
                state.buffers[self.key + ".first"] = torch.zeros_like(first)
            x = torch.cat([previous, x], dim=-1)
            state.buffers[self.key] = x[..., x.size(-1) - self.context:]
        return self.conv.conv(x)


class StreamingConvTranspose1d(nn.Module):
    """A causal ConvTranspose1d (key ``<name>.convtr.convtr.*``): the last ``kernel - stride``
    outputs of a call are held back and added to the next call's first outputs (without the bias,
    which the next call adds itself)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.convtr = _Holder("convtr", nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias))
        self.overlap = kernel - stride
        self.out_channels = cout
        self.key = ""

    def buffers_for(self, rows: int, dtype, device) -> dict[str, torch.Tensor]:
        return {self.key: torch.zeros(rows, self.out_channels, self.overlap, dtype=dtype, device=device)}

    def forward(self, x: torch.Tensor, state: BufferState) -> torch.Tensor:
        layer = self.convtr.convtr
        y = layer(x)
        if not self.overlap:
            return y
        n = self.overlap
        head = y[..., :n] + state.buffers[self.key]
        tail = y[..., y.size(-1) - n:]
        if layer.bias is not None:
            tail = tail - layer.bias[:, None]
        state.buffers[self.key] = tail
        return torch.cat([head, y[..., n: y.size(-1) - n]], dim=-1)


class ResnetBlock(nn.Module):
    """x + conv(ELU(conv(ELU(x)))) with the hidden width dim / compress (``block.1``, ``block.3``;
    the shortcut is the identity: ``true_skip``)."""

    def __init__(self, dim: int, kernel: int, dilation: int, compress: int) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList([nn.ELU(), StreamingConv1d(dim, hidden, kernel, dilation=dilation),
                                    nn.ELU(), StreamingConv1d(hidden, dim, 1)])

    def forward(self, x: torch.Tensor, state: BufferState) -> torch.Tensor:
        return x + _run(self.block, x, state)


def _run(layers: nn.ModuleList, x: torch.Tensor, state: BufferState) -> torch.Tensor:
    for layer in layers:
        x = layer(x) if isinstance(layer, nn.ELU) else layer(x, state)
    return x


class SEANetEncoder(nn.Module):
    """Audio (B, 1, hop k) -> latents (B, dimension, k); the ratios run reversed (4, 5, 6, 8)."""

    def __init__(self, c: SEANetConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [StreamingConv1d(c.channels, c.n_filters, c.kernel_size)]
        mult = 1
        for ratio in reversed(c.ratios):
            width = mult * c.n_filters
            layers += [ResnetBlock(width, c.residual_kernel_size, c.dilation_base ** j, c.compress)
                       for j in range(c.n_residual_layers)]
            layers += [nn.ELU(), StreamingConv1d(width, width * 2, ratio * 2, stride=ratio)]
            mult *= 2
        layers += [nn.ELU(), StreamingConv1d(mult * c.n_filters, c.dimension, c.last_kernel_size)]
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, state: BufferState) -> torch.Tensor:
        return _run(self.model, x, state)


class SEANetDecoder(nn.Module):
    """Latents (B, dimension, k) -> audio (B, 1, hop k)."""

    def __init__(self, c: SEANetConfig) -> None:
        super().__init__()
        mult = 2 ** len(c.ratios)
        layers: list[nn.Module] = [StreamingConv1d(c.dimension, mult * c.n_filters, c.kernel_size)]
        for ratio in c.ratios:
            width = mult * c.n_filters
            layers += [nn.ELU(), StreamingConvTranspose1d(width, width // 2, ratio * 2, ratio)]
            layers += [ResnetBlock(width // 2, c.residual_kernel_size, c.dilation_base ** j, c.compress)
                       for j in range(c.n_residual_layers)]
            mult //= 2
        layers += [nn.ELU(), StreamingConv1d(c.n_filters, c.channels, c.last_kernel_size)]
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, state: BufferState) -> torch.Tensor:
        return _run(self.model, x, state)


def stream_buffers(module: nn.Module, rows: int, dtype, device) -> dict[str, torch.Tensor]:
    """Name every streaming convolution in ``module`` (its state key) and make its buffers."""
    out: dict[str, torch.Tensor] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, (StreamingConv1d, StreamingConvTranspose1d)):
            sub.key = name
            out.update(sub.buffers_for(rows, dtype, device))
    return out
