"""Mimi, Kyutai's streaming speech codec: 24 kHz audio <-> 12.5 Hz frames of codes (one semantic
and acoustic codebooks; Moshi uses 8), 1920 samples per frame.

    audio --SEANet encoder--> 25 Hz latents --encoder transformer--> --downsample conv (x2)-->
    12.5 Hz --split RVQ--> codes --decode--> --upsample convtr--> --decoder transformer-->
    --SEANet decoder--> audio

Everything is causal and streams frame by frame: ``MimiStream`` holds per session row the
convolution buffers and the two transformers' ring KV caches (context 250 latents = 10 s). The
encoder and decoder halves are separate streaming modules (zoo.core.streaming, batched over
session rows, as the Hertz-dev codec's), since the reference server resets the encoder's state
alone after the first frame:

    encoding = mimi.streaming_encoder
    enc = encoding.new_state(8)                      # a MimiStream of 8 session rows
    codes = encoding.step(enc, frames, rows=ids)     # (B, 1, 1920 k) -> (B, n_q, k)
    encoding.reset(enc, rows=ids)                    # those rows start a new stream
    decoding = mimi.streaming_decoder
    dec = decoding.new_state(8)
    audio = decoding.step(dec, codes, rows=ids)      # (B, K, k) -> (B, 1, 1920 k)

Nothing is held back: a transposed convolution's overlap beyond the last frame belongs to samples
after the stream's end, which the reference's one-pass decode trims too, so ``finish`` is the last
step.

Module names are the published tensor names (``encoder.model.N``, ``encoder_transformer.
transformer.layers.N``, ``downsample.conv``, ``upsample.convtr``, ``quantizer.rvq_first`` ...),
but for the attention projections, which are the reference's per-step modules (``mimi_names``).
transformers' MimiModel is not used: its decode keeps no transposed-convolution state, so frame by
frame decoding would not be the reference's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.devices import to_device
from ..core.kv_cache import KVCache
from ..core.streaming import BufferState, CausalStreamingModule, StreamingState
from .quantizer import SplitResidualVQ, legacy_codebook_names
from .seanet import (
    SEANetConfig,
    SEANetDecoder,
    SEANetEncoder,
    StreamingConv1d,
    StreamingConvTranspose1d,
    stream_buffers,
)
from .transformer import StreamingTransformer, TransformerConfig, per_step_names

SAMPLE_RATE = 24000
FRAME_RATE = 12.5
FRAME_SAMPLES = 1920


@dataclass(frozen=True)
class MimiConfig:
    """The reference's ``_mimi_config`` (loaders.py) with its three parts; ``from_dict`` reads the
    same dict (a ``mimi_config.json`` named by a checkpoint's config.json)."""

    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        d_model=512, num_heads=8, num_layers=8, dim_feedforward=2048, context=250, layer_scale=0.01))
    quantizer_dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    sample_rate: int = SAMPLE_RATE
    frame_rate: float = FRAME_RATE

    @property
    def frame_samples(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def downsample_stride(self) -> int:
        stride = (self.sample_rate / self.seanet.hop_length) / self.frame_rate
        if stride != int(stride):
            raise ValueError(f"Mimi needs an integer encoder/frame rate ratio, got {stride}")
        return int(stride)

    @classmethod
    def from_dict(cls, raw: dict) -> MimiConfig:
        s, t, q = raw["seanet"], raw["transformer"], raw["quantizer"]
        fixed = {"causal": True, "activation": "ELU", "norm": "none", "pad_mode": "constant", "true_skip": True,
                 "disable_norm_outer_blocks": 0}
        for key, value in fixed.items():
            if key in s and s[key] != value:
                raise ValueError(f"Mimi config: seanet {key}={s[key]!r} is not supported (only {value!r})")
        seanet = SEANetConfig(
            channels=s.get("channels", 1), dimension=s["dimension"], n_filters=s["n_filters"],
            n_residual_layers=s["n_residual_layers"], ratios=tuple(s["ratios"]), kernel_size=s["kernel_size"],
            residual_kernel_size=s["residual_kernel_size"], last_kernel_size=s["last_kernel_size"],
            dilation_base=s["dilation_base"], compress=s["compress"])
        if t.get("d_model") != seanet.dimension or t.get("input_dimension", seanet.dimension) != seanet.dimension:
            raise ValueError("Mimi config: the transformers must work at the SEANet dimension (no projections)")
        transformer = TransformerConfig(
            d_model=t["d_model"], num_heads=t["num_heads"], num_layers=t["num_layers"],
            dim_feedforward=t["dim_feedforward"], context=t["context"], max_period=t.get("max_period", 10000),
            norm=t.get("norm", "layer_norm"), gating=t.get("gating", "none"), layer_scale=t.get("layer_scale"))
        return cls(seanet, transformer, q["dimension"], q["n_q"], q["bins"], raw.get("sample_rate", SAMPLE_RATE),
                   raw.get("frame_rate", FRAME_RATE))


class ProjectedTransformer(nn.Module):
    """``transformer.layers.N`` on (B, C, T) latents (the reference's conv layout; Mimi has no
    input or output projections: d_model is the SEANet dimension)."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.transformer = StreamingTransformer(c)

    def forward(self, x: torch.Tensor, cache: KVCache, rows: list[int]) -> torch.Tensor:
        net = self.transformer
        ring = net.rows(cache, rows, x.size(-1))
        y = net(x.transpose(1, 2), cache, ring)
        cache.advance(rows, x.size(-1))
        return y.transpose(1, 2)


class MimiStream(StreamingState):
    """One half's streaming state for ``rows`` session rows: convolution buffers and the
    transformer's ring KV cache (rows of which are never released: a row is a session slot)."""

    def __init__(self, buffers: BufferState, cache: KVCache) -> None:
        self.buffers, self.cache = buffers, cache

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """``rows``: a host tensor of session rows (None: all)."""
        if rows is None:
            self.buffers.reset()
            ids = range(len(self.cache.lengths))
        else:
            self.buffers.reset(to_device(rows, self.cache.device))
            ids = rows.tolist()
        for r in ids:  # stale keys are masked by position; only the lengths restart
            self.cache.lengths[r] = 0

    @property
    def rows(self) -> int:
        return self.buffers.rows

    def nbytes(self) -> int:
        return self.buffers.nbytes() + self.cache.nbytes()


def mimi_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any spelling of a Mimi file the reference loader accepts -> this module's names (older
    codebook buffer names; fused attention projections, one step each)."""
    return per_step_names(legacy_codebook_names(state), lambda key: 1)


class Mimi(nn.Module):
    def __init__(self, c: MimiConfig = MimiConfig(), num_codebooks: int = 8) -> None:
        super().__init__()
        self.config, self.num_codebooks = c, num_codebooks
        d, stride = c.seanet.dimension, c.downsample_stride
        self.encoder = SEANetEncoder(c.seanet)
        self.decoder = SEANetDecoder(c.seanet)
        self.encoder_transformer = ProjectedTransformer(c.transformer)
        self.decoder_transformer = ProjectedTransformer(c.transformer)
        self.quantizer = SplitResidualVQ(c.quantizer_dimension, d, c.bins, c.n_q)
        # the reference's learnt resampling: a full conv down (replicate padding at the start), a
        # channel-wise transposed conv up (its upsample_channel_wise_bug=True), neither with a bias
        self.downsample = _ConvHolder(StreamingConv1d(d, d, 2 * stride, stride, bias=False, replicate=True))
        self.upsample = _ConvTrHolder(StreamingConvTranspose1d(d, d, 2 * stride, stride, groups=d, bias=False))
        self._names = False

    @property
    def frame_samples(self) -> int:
        return self.config.frame_samples

    @property
    def dtype(self) -> torch.dtype:
        """Mimi's precision: float32 beside a bfloat16 LM, as the reference loads it (its input
        frames are cast to this, never to the LM's)."""
        return next(self.parameters()).dtype

    def _stream(self, parts: list[nn.Module], rows: int) -> MimiStream:
        param = next(self.parameters())
        if not self._names:
            stream_buffers(self, 1, param.dtype, param.device)  # names every conv's state key once
            self._names = True
        buffers: dict[str, torch.Tensor] = {}
        fill: dict[str, bool] = {}
        for part in parts:
            for sub in part.modules():
                if isinstance(sub, (StreamingConv1d, StreamingConvTranspose1d)):
                    made = sub.buffers_for(rows, param.dtype, param.device)
                    buffers.update(made)
                    fill.update({k: True for k in made if k.endswith(".first")})
        t = self.config.transformer
        cache = KVCache(t.num_layers, rows, t.num_heads, t.context, t.head_dim, param.dtype, param.device)
        return MimiStream(BufferState(buffers, fill), cache)

    def encoder_stream(self, rows: int = 1) -> MimiStream:
        return self._stream([self.encoder, self.downsample], rows)

    def decoder_stream(self, rows: int = 1) -> MimiStream:
        return self._stream([self.decoder, self.upsample], rows)

    @property
    def streaming_encoder(self) -> MimiEncoder:
        return MimiEncoder(self)

    @property
    def streaming_decoder(self) -> MimiDecoder:
        return MimiDecoder(self)

    def encode_step(self, state: MimiStream, audio: torch.Tensor, *, rows: torch.Tensor | None = None) -> torch.Tensor:
        """audio (B, 1, 1920 k) -> codes (B, num_codebooks, k)."""
        if audio.size(-1) == 0 or audio.size(-1) % self.frame_samples:
            raise ValueError(f"Mimi streams whole frames of {self.frame_samples} samples, got {audio.size(-1)}")
        index, ids = _rows(rows, audio.size(0), audio.device)
        part = state.buffers.take(index)
        latent = self.encoder(audio, part)
        latent = self.encoder_transformer(latent, state.cache, ids)
        latent = self.downsample.conv(latent, part)
        state.buffers.put(index, part)
        return self.quantizer.encode(latent, self.num_codebooks)

    def decode_step(self, state: MimiStream, codes: torch.Tensor, *, rows: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, K, k) -> audio (B, 1, 1920 k)."""
        index, ids = _rows(rows, codes.size(0), codes.device)
        part = state.buffers.take(index)
        latent = self.upsample.convtr(self.quantizer.decode(codes), part)
        latent = self.decoder_transformer(latent, state.cache, ids)
        audio = self.decoder(latent, part)
        state.buffers.put(index, part)
        return audio


class _MimiHalf(CausalStreamingModule[MimiStream, torch.Tensor, torch.Tensor]):
    """One half of ``mimi`` as a streaming module batched over session rows (the module docstring)."""

    def __init__(self, mimi: Mimi) -> None:
        self.mimi = mimi

    def _zeros(self, state: MimiStream, rows: torch.Tensor | None, size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self.batch(state, rows), size, 0, dtype=dtype, device=state.cache.device)


class MimiEncoder(_MimiHalf):
    """audio (B, 1, 1920 k) -> codes (B, num_codebooks, k)."""

    def new_state(self, rows: int = 1) -> MimiStream:
        return self.mimi.encoder_stream(rows)

    def step(self, state: MimiStream, piece: torch.Tensor, *, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.mimi.encode_step(state, piece, rows=rows)

    def empty(self, state: MimiStream, rows: torch.Tensor | None) -> torch.Tensor:
        return self._zeros(state, rows, self.mimi.num_codebooks, torch.long)


class MimiDecoder(_MimiHalf):
    """codes (B, K, k) -> audio (B, 1, 1920 k)."""

    def new_state(self, rows: int = 1) -> MimiStream:
        return self.mimi.decoder_stream(rows)

    def step(self, state: MimiStream, piece: torch.Tensor, *, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.mimi.decode_step(state, piece, rows=rows)

    def empty(self, state: MimiStream, rows: torch.Tensor | None) -> torch.Tensor:
        return self._zeros(state, rows, 1, self.mimi.dtype)


class _ConvHolder(nn.Module):
    """``downsample.conv.conv.conv.weight``: the reference's ConvDownsample1d level of naming."""

    def __init__(self, conv: StreamingConv1d) -> None:
        super().__init__()
        self.conv = conv


class _ConvTrHolder(nn.Module):
    """``upsample.convtr.convtr.convtr.weight`` (ConvTrUpsample1d)."""

    def __init__(self, convtr: StreamingConvTranspose1d) -> None:
        super().__init__()
        self.convtr = convtr


def _rows(rows: torch.Tensor | None, batch: int, device) -> tuple[torch.Tensor, list[int]]:
    """``rows`` (a host tensor; None: 0..batch-1) -> (the index into the state's buffers on their
    device, in one pinned upload: a host index would be copied up, the host waiting for the device,
    at each of the dozens of buffers it indexes; the rows as host ints, for the KV cache's books)."""
    rows = torch.arange(batch) if rows is None else rows.cpu()
    if rows.numel() != batch:
        raise ValueError(f"{rows.numel()} rows for a batch of {batch}")
    return to_device(rows, device), rows.tolist()
