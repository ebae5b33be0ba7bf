"""The flow-matching velocity estimator (the reference's ``ConditionalDecoder``, from Matcha-TTS
and diffusers 0.27 building blocks): a 1-D U-Net over mel frames. Two down levels (the second at
half the frame rate), the middle blocks at half rate, two up levels with skip connections; each
level is a ResNet block (conv, GroupNorm, Mish, plus the time embedding) followed by transformer
blocks (self-attention over all frames and a GELU FFN). Attribute names are the published tensor
names under ``decoder.estimator.``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """t (N,) or () -> (N, dim): [sin, cos] of scale*t*freqs. The frequencies are float32 as in the
    reference (even in float64 runs); the product takes t's dtype."""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angles = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class Block1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = Block1D(dim, dim_out, groups)
        self.block2 = Block1D(dim_out, dim_out, groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.mlp(time).unsqueeze(-1)
        return self.block2(h) + self.res_conv(x)


class Attention(nn.Module):
    """diffusers ``Attention`` as configured here: q/k/v without bias, ``to_out.0`` with bias.

    The reference passes a float 0/1 matrix (mask^T mask) that SDPA *adds* to the scores: with
    no padding it adds the same 1.0 to every score, which softmax ignores, so we pass none (it
    would also cost a T x T x heads tensor and rule out the fused kernels)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](y.transpose(1, 2).reshape(B, T, -1))


class GELUProjection(nn.Module):
    """diffusers ``GELU``: Linear, then exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # net.1 is a dropout in the reference (no weights): Identity keeps the indices.
        self.net = nn.ModuleList([GELUProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Matcha's block: x += attn1(norm1(x)); x += ff(norm3(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        return x + self.ff(self.norm3(x))


class Downsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _transformers(dim: int, heads: int, head_dim: int, count: int) -> nn.ModuleList:
    return nn.ModuleList(BasicTransformerBlock(dim, heads, head_dim) for _ in range(count))


def _run_transformers(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    # (B, C, T) -> (B, T, C) once per level, contiguous so LayerNorm and the linears do not copy
    x = x.transpose(1, 2).contiguous()
    for block in blocks:
        x = block(x)
    return x.transpose(1, 2).contiguous()


class ConditionalDecoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...], heads: int, head_dim: int,
                 n_blocks: int, num_mid_blocks: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        time_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(in_channels, time_dim)
        self.down_blocks = nn.ModuleList()
        output = in_channels
        for i, width in enumerate(channels):
            last = i == len(channels) - 1
            down = nn.Conv1d(width, width, 3, padding=1) if last else Downsample1D(width)
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(output, width, time_dim),
                                                   _transformers(width, heads, head_dim, n_blocks), down]))
            output = width
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(channels[-1], channels[-1], time_dim),
                           _transformers(channels[-1], heads, head_dim, n_blocks)])
            for _ in range(num_mid_blocks))
        up_widths = tuple(reversed(channels)) + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_widths) - 1):
            width, last = up_widths[i + 1], i == len(up_widths) - 2
            up = nn.Conv1d(width, width, 3, padding=1) if last else Upsample1D(width)
            self.up_blocks.append(nn.ModuleList([ResnetBlock1D(up_widths[i] * 2, width, time_dim),
                                                 _transformers(width, heads, head_dim, n_blocks), up]))
        self.final_block = Block1D(up_widths[-1], up_widths[-1])
        self.final_proj = nn.Conv1d(up_widths[-1], out_channels, 1)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Flow time t (scalar or (N,)) -> (N, 4*channels[0]). Depends on t only, so a solver can
        compute all steps' embeddings before its loop."""
        return self.time_mlp(sinusoidal_time_embedding(t, self.in_channels).to(self.final_proj.weight.dtype))

    def forward(self, x: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                time: torch.Tensor) -> torch.Tensor:
        """x, mu, cond (B, 80, T); spks (B, 80); time: ``time_embedding(t)`` (1 or B rows)
        -> velocity (B, 80, T). No padding: every row has all T frames, so the reference's frame
        masks (all ones) are left out."""
        x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.size(-1)), cond], dim=1)
        skips = []
        for resnet, transformers, down in self.down_blocks:
            x = _run_transformers(transformers, resnet(x, time))
            skips.append(x)
            x = down(x)
        for resnet, transformers in self.mid_blocks:
            x = _run_transformers(transformers, resnet(x, time))
        for resnet, transformers, up in self.up_blocks:
            skip = skips.pop()
            # an odd length comes back one frame longer from the transposed convolution: crop
            x = torch.cat([x[:, :, : skip.size(-1)], skip], dim=1)
            x = up(_run_transformers(transformers, resnet(x, time)))
        return self.final_proj(self.final_block(x))
