"""hertz-codec: the causal convolutional VAE that turns 16 kHz audio into one 32-dim Gaussian
latent per 2000 samples (8 Hz) and back.

Module and attribute names are the published tensor names of ``inference_apatosaurus_95000.pt``
(``encoder.res_stack.N...``, ``decoder.multiplier_proj``, ``compressor.proj_in`` ...), with the
weight norm folded into plain weights at load time (see checkpoint.py).

Every layer is causal, so the codec streams exactly: a ``StreamState`` holds, per batch row, the
last input samples each causal convolution needs (and the last input of each transposed
convolution). Feeding audio frame by frame (multiples of 2000 samples) or latents one by one
through a state gives the same numbers as one pass over the whole sequence, at a bounded cost per
frame. One pass is simply a fresh state.

Both halves speak zoo.core.streaming, batched over session rows: ``codec.streaming_encoder``
(audio (B, 1, 2000 k) -> posterior mean and log-variance (B, k, 32)) and
``codec.streaming_decoder`` (latents (B, k, 32) -> audio (B, 1, 2000 k)):

    state = codec.streaming_decoder.new_state(slots)                # one row per session slot
    audio = codec.streaming_decoder.step(state, latents, rows=ids)  # those sessions' next audio
    codec.streaming_decoder.reset(state, rows=ids)                  # slots handed to new sessions

Nothing is ever held back (every layer is causal), so ``finish`` only decodes its last piece.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.streaming import BufferState, CausalStreamingModule

SAMPLE_RATE = 16000
STRIDES = (2, 2, 4, 5, 5, 5)  # encoder order; the decoder runs them reversed
FRAME = math.prod(STRIDES)  # 2000 samples per latent
DILATIONS = (1, 3, 9)
NORM_STDDEV = 0.05  # encode(x) = encoder(x / 0.05); decode(l) = decoder(l) * 0.05
FRESH = "fresh"  # the state's per-row flag (no convolution is named so: theirs are module paths)


@dataclass(frozen=True)
class CodecConfig:
    """The published codec: encode_channels 16, ratios (4, 8, 16, 16, 16, 16), decoder channel
    multiplier 4, kernel 7, latent 32. The strides are fixed (they make 2000 samples per latent);
    everything else is read from tensor shapes."""

    encode_channels: int = 16
    channel_ratios: tuple[int, ...] = (4, 8, 16, 16, 16, 16)
    decode_multiplier: int = 4
    kernel_size: int = 7
    latent_dim: int = 32

    @property
    def middle(self) -> int:
        return self.encode_channels * self.channel_ratios[-1]

    def encoder_channels(self) -> list[int]:
        return [self.encode_channels * r for r in (1, *self.channel_ratios)]

    def decoder_channels(self) -> list[int]:
        return [c * self.decode_multiplier for c in reversed(self.encoder_channels())]


class StreamState(BufferState):
    """Streaming state of one codec half for a batch of rows (zoo.core.streaming.BufferState): for
    every causal convolution the last ``(kernel - 1) * dilation`` input samples, for every
    transposed convolution its last input sample, and which rows are fresh (no audio yet: a
    transposed convolution then repeats its first input, as the one-pass ReplicationPad1d does)."""

    @classmethod
    def zeros(cls, half: nn.Module, rows: int, dtype: torch.dtype, device) -> StreamState:
        buffers = {}
        for name, module in half.named_modules():
            if isinstance(module, (CausalConv, CausalDeconv)):
                buffers[name] = torch.zeros(rows, module.in_channels, module.context, dtype=dtype, device=device)
        buffers[FRESH] = torch.ones(rows, dtype=torch.bool, device=device)
        return cls(buffers, {FRESH: True})

    @property
    def fresh(self) -> torch.Tensor:
        """(rows,) bool: the rows that have had no audio yet."""
        return self.buffers[FRESH]


class CausalConv(nn.Module):
    """``conv`` (key ``<name>.conv.*``) with (k - 1) * dilation zeros (or the stream's past
    input) on the left: output i sees inputs up to i * stride."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
                 bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride, dilation=dilation, bias=bias)
        self.in_channels = cin
        self.context = (kernel - 1) * dilation
        self.key = ""

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        if state is None:
            x = F.pad(x, (self.context, 0))
        else:
            x = torch.cat([state.buffers[self.key], x], dim=-1)
            state.buffers[self.key] = x[..., x.size(-1) - self.context:]
        return self.conv(x)


class CausalDeconv(nn.Module):
    """``deconv`` (ConvTranspose1d, kernel 2 * stride) after repeating the previous input sample
    (the first one at the start of a stream), cropped by ``stride`` on both sides: output j sees
    inputs j // stride - 1 and j // stride. ``pad_buffer`` is a published persistent buffer
    that only the reference's dead streaming code used; it is loaded and not used."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride)
        self.register_buffer("pad_buffer", torch.zeros(1, cin, 1))
        self.stride = stride
        self.in_channels = cin
        self.context = 1
        self.key = ""

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        first = x[..., :1]
        if state is None:
            previous = first
        else:
            previous = torch.where(state.fresh[:, None, None], first, state.buffers[self.key])
            state.buffers[self.key] = x[..., -1:]
        y = self.deconv(torch.cat([previous, x], dim=-1))
        return y[..., self.stride : y.size(-1) - self.stride]


class ResUnit(nn.Module):
    """x + conv2(elu(conv1(elu(x)))), conv1 causal (kernel 7, dilation 1/3/9), conv2 1x1."""

    def __init__(self, channels: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = CausalConv(channels, channels, kernel, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        y = self.conv1(F.elu(x), state)
        return x + self.conv2(F.elu(y))


class Upsample(nn.Module):
    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.factor, dim=-1)  # nn.Upsample(mode="nearest")


class Block(nn.Module):
    """``res_block``: encoder = 3 res units then a strided causal conv (channels change) or an
    average pool + identity; decoder = a transposed conv (channels change) or nearest upsampling
    + identity, then 3 res units."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, mode: str) -> None:
        super().__init__()
        if mode == "encoder":
            units = [ResUnit(cin, kernel, d) for d in DILATIONS]
            tail = [CausalConv(cin, cout, 2 * stride, stride=stride, bias=True)] if cin != cout else \
                [nn.AvgPool1d(stride, stride), nn.Identity()]
            self.res_block = nn.ModuleList([*units, *tail])
        else:
            head = [CausalDeconv(cin, cout, stride)] if cin != cout else [Upsample(stride), nn.Identity()]
            self.res_block = nn.ModuleList([*head, *(ResUnit(cout, kernel, d) for d in DILATIONS)])

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        for unit in self.res_block:
            x = unit(x, state) if isinstance(unit, (ResUnit, CausalConv, CausalDeconv)) else unit(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: CodecConfig) -> None:
        super().__init__()
        ch = c.encoder_channels()
        self.res_stack = nn.ModuleList(
            [CausalConv(1, ch[0], c.kernel_size)]
            + [Block(ch[i], ch[i + 1], s, c.kernel_size, "encoder") for i, s in enumerate(STRIDES)]
        )

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        for block in self.res_stack:
            x = block(x, state)
        return x


class Decoder(nn.Module):
    def __init__(self, c: CodecConfig) -> None:
        super().__init__()
        ch = c.decoder_channels()
        if c.decode_multiplier != 1:
            self.multiplier_proj = nn.Conv1d(c.middle, c.middle * c.decode_multiplier, 1)
        else:
            self.multiplier_proj = None
        strides = tuple(reversed(STRIDES))
        self.res_stack = nn.ModuleList(
            [Block(ch[i], ch[i + 1], s, c.kernel_size, "decoder") for i, s in enumerate(strides)]
            + [CausalConv(ch[-1], 1, c.kernel_size)]
        )

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        if self.multiplier_proj is not None:
            x = self.multiplier_proj(x)
        for block in self.res_stack:
            x = block(x, state)
        return x


class GaussianZ(nn.Module):
    def __init__(self, dim: int, latent_dim: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * latent_dim)
        self.proj_out = nn.Linear(latent_dim, dim)


class WaveCodec(nn.Module):
    def __init__(self, config: CodecConfig = CodecConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.compressor = GaussianZ(config.middle, config.latent_dim)
        self.decoder = Decoder(config)
        for half in (self.encoder, self.decoder):
            for name, module in half.named_modules():
                if isinstance(module, (CausalConv, CausalDeconv)):
                    module.key = name

    # -- the two halves ------------------------------------------------------------------------
    def posterior(self, audio: torch.Tensor, state: StreamState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (B, 1, T) -> mean and log-variance (B, T', latent) of q(z | audio), T' = T / 2000
        for whole frames. With a state, ``audio`` continues the stream (whole frames only)."""
        if state is not None and audio.size(-1) % FRAME:
            raise ValueError(f"streamed audio must be whole frames of {FRAME} samples, got {audio.size(-1)}")
        x = self.encoder(audio / NORM_STDDEV, state)
        if state is not None:
            state.fresh[:] = False
        mu, logvar = self.compressor.proj_in(x.transpose(1, 2)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, latents: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        """latents (B, T', latent) -> audio (B, 1, T' * 2000). With a state, continues the stream."""
        x = self.compressor.proj_out(latents).transpose(1, 2)
        audio = self.decoder(x, state) * NORM_STDDEV
        if state is not None:
            state.fresh[:] = False
        return audio

    @property
    def streaming_encoder(self) -> StreamingEncoder:
        return StreamingEncoder(self)

    @property
    def streaming_decoder(self) -> StreamingDecoder:
        return StreamingDecoder(self)

    def encoder_state(self, rows: int, dtype=None, device=None) -> StreamState:
        weight = self.compressor.proj_in.weight
        return StreamState.zeros(self.encoder, rows, dtype or weight.dtype, device or weight.device)

    def decoder_state(self, rows: int, dtype=None, device=None) -> StreamState:
        weight = self.compressor.proj_in.weight
        return StreamState.zeros(self.decoder, rows, dtype or weight.dtype, device or weight.device)

    def decoder_context(self) -> int:
        """Latents of left context that can affect a decoded frame (the decoder's receptive
        field, rounded up): decoding the last ``decoder_context()`` latents of a sequence from a
        fresh state leaves the same state as decoding the whole sequence."""
        return _decoder_receptive_latents(self.config)


class _StreamingHalf(CausalStreamingModule[StreamState, torch.Tensor, object]):
    """One codec half as a batched streaming module (the module docstring): a call on ``rows``
    takes those rows' state out, runs them as one batch and puts it back."""

    def __init__(self, codec: WaveCodec) -> None:
        self.codec = codec

    def step(self, state: StreamState, piece: torch.Tensor, *, rows: torch.Tensor | None = None):
        if rows is None:
            return self._run(piece, state)
        part = state.take(rows)
        out = self._run(piece, part)
        state.put(rows, part)
        return out

    def _run(self, piece: torch.Tensor, state: StreamState):
        raise NotImplementedError

    def _like(self, *shape: int) -> torch.Tensor:
        weight = self.codec.compressor.proj_in.weight
        return weight.new_zeros(shape)


class StreamingEncoder(_StreamingHalf):
    """audio (B, 1, 2000 k) -> (mean, log-variance), each (B, k, latent)."""

    def new_state(self, batch: int = 1, dtype=None, device=None) -> StreamState:
        return self.codec.encoder_state(batch, dtype, device)

    def _run(self, piece: torch.Tensor, state: StreamState):
        return self.codec.posterior(piece, state)

    def empty(self, state: StreamState, rows: torch.Tensor | None):
        batch, latent = self.batch(state, rows), self.codec.config.latent_dim
        return self._like(batch, 0, latent), self._like(batch, 0, latent)


class StreamingDecoder(_StreamingHalf):
    """latents (B, k, latent) -> audio (B, 1, 2000 k)."""

    def new_state(self, batch: int = 1, dtype=None, device=None) -> StreamState:
        return self.codec.decoder_state(batch, dtype, device)

    def _run(self, piece: torch.Tensor, state: StreamState):
        return self.codec.decode(piece, state)

    def empty(self, state: StreamState, rows: torch.Tensor | None):
        return self._like(self.batch(state, rows), 1, 0)


def sample_posterior(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps (the reference's GaussianZ.reparam), eps from ``generator``."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(logvar / 2)


def _decoder_receptive_latents(c: CodecConfig) -> int:
    """Sum over the decoder's layers of (left context in samples at that layer's rate) / (samples
    per latent at that rate), plus one latent for alignment within a frame, rounded up."""
    reach = (c.kernel_size - 1) * sum(DILATIONS)  # three res units
    total = 0.0
    per_latent = 1  # samples per latent at each layer's input
    for s in reversed(STRIDES):
        total += 1 / per_latent  # a transposed conv's previous input (upsampling has none)
        per_latent *= s
        total += reach / per_latent
    total += (c.kernel_size - 1) / per_latent
    return math.ceil(total) + 1
