"""The flow (the reference's ``MaskedDiffWithXvec``): speech tokens (12.5 Hz) -> 80-bin mel
(22050/256 = 86.13 frames/s), by conditional flow matching.

tokens -> ``input_embedding`` -> ``encoder`` (block-causal conformer) -> ``encoder_proj`` (to 80)
-> ``length_regulator`` (nearest-neighbour stretch to the frame count, then convs) = ``mu``.
``decoder`` (ConditionalCFM) integrates the velocity field of its U-Net ``estimator`` from
Gaussian noise at t=0 to the mel at t=1 in 10 Euler steps on a cosine time grid, with
classifier-free guidance: v = 1.7 v(x | mu, speaker, cond) - 0.7 v(x | nothing). ``cond`` holds
the already known mel of a prompt (zeros elsewhere). The speaker embedding is always zeros(1,
192) in GLM-4-Voice, so the speaker input is ``spk_embed_affine_layer``'s bias.

The noise is an input: the decoder draws it (see ``decoder.py``); nothing here touches an RNG.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conformer import BlockConformerEncoder
from .decoder_config import FlowConfig
from .estimator import ConditionalDecoder

SAMPLE_RATE, HOP = 22050, 256  # the mel the flow was trained on (hard-coded in the reference too)
N_TIMESTEPS = 10


def mel_frames(n_tokens: int, frame_rate: float = 12.5) -> int:
    """Mel frames for ``n_tokens`` tokens: the reference's ``int(n / 12.5 * 22050 / 256)``,
    evaluated like it in float32 tensor arithmetic (it equals floor(441 n / 64) below 3392 tokens,
    and is one less at a few larger multiples of 64)."""
    n = torch.tensor([n_tokens], dtype=torch.int32)
    return int((n / frame_rate * SAMPLE_RATE / HOP).int())


class InterpolateRegulator(nn.Module):
    """Nearest-neighbour stretch of the token features to the frame count, then
    [Conv1d k3, GroupNorm(1), Mish] x layers and a 1x1 Conv1d."""

    def __init__(self, channels: int, layers: int) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for _ in range(layers):
            modules += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(1, channels), nn.Mish()]
        modules.append(nn.Conv1d(channels, channels, 1, 1))
        self.model = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x (B, T, C) -> (B, C, frames)."""
        return self.model(F.interpolate(x.transpose(1, 2), size=frames, mode="nearest"))


def time_grid(n_timesteps: int, device, dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The cosine grid t_k = 1 - cos(pi/2 * k/n), walked as the reference's Euler loop does
    (t += dt; dt = t_{k+1} - t), as two lists of 0-dim tensors (t, dt) per step: no host sync."""
    span = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
    span = 1 - torch.cos(span * 0.5 * torch.pi)
    t, dt = span[0], span[1] - span[0]
    times, steps = [], []
    for step in range(1, n_timesteps + 1):
        times.append(t)
        steps.append(dt)
        t = t + dt
        if step < n_timesteps:
            dt = span[step + 1] - t
    return times, steps


class ConditionalCFM(nn.Module):
    """``decoder``: the Euler solver around ``estimator``."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        if config.t_scheduler != "cosine":
            raise ValueError(f"t_scheduler {config.t_scheduler!r} is not supported (the published config uses 'cosine')")
        self.cfg_rate = config.inference_cfg_rate
        self.estimator = ConditionalDecoder(config.estimator_in_channels, config.output_size, config.estimator_channels,
                                            config.num_heads, config.attention_head_dim, config.n_blocks,
                                            config.num_mid_blocks)

    def forward(self, noise: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                n_timesteps: int = N_TIMESTEPS) -> torch.Tensor:
        """noise, mu, cond (1, 80, T); spks (1, 80) -> mel (1, 80, T).

        The guided and the unguided velocity come from one estimator call on a batch of 2 (the
        reference makes two calls; every row is computed independently, so the values agree).
        The ODE state stays in float32 (float64 in float64 runs) when the network runs in a lower
        precision; the time grid is float32 like the reference's."""
        dtype = self.estimator.final_proj.weight.dtype
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        x = noise.to(state_dtype)
        # row 0 is conditioned, row 1 sees zeros for mu, speaker and cond
        mu2 = torch.cat([mu, torch.zeros_like(mu)]).to(dtype)
        spks2 = torch.cat([spks, torch.zeros_like(spks)]).to(dtype)
        cond2 = torch.cat([cond, torch.zeros_like(cond)]).to(dtype)
        rate = self.cfg_rate
        for t, dt in zip(*time_grid(n_timesteps, x.device, state_dtype)):
            velocity = self.estimator(x.to(dtype).expand(2, -1, -1), mu2, spks2, cond2,
                                      self.estimator.time_embedding(t)).to(state_dtype)
            guided = (1.0 + rate) * velocity[:1] - rate * velocity[1:]
            x = x + dt * guided
        return x


class MaskedDiffWithXvec(nn.Module):
    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.input_embedding = nn.Embedding(c.vocab_size, c.input_size)
        self.spk_embed_affine_layer = nn.Linear(c.spk_embed_dim, c.output_size)
        self.encoder = BlockConformerEncoder(c.input_size, c.encoder_size, c.encoder_heads, c.encoder_linear_units,
                                             c.encoder_blocks, c.encoder_block_size)
        self.encoder_proj = nn.Linear(c.encoder_size, c.output_size)
        self.length_regulator = InterpolateRegulator(c.output_size, c.regulator_layers)
        self.decoder = ConditionalCFM(c)

    def mel_frames(self, n_tokens: int) -> int:
        return mel_frames(n_tokens, self.config.input_frame_rate)

    def speaker(self, batch: int = 1) -> torch.Tensor:
        """The projected speaker embedding: GLM-4-Voice always passes zeros(1, 192), and
        F.normalize(zeros) is zeros, so this is the layer's bias."""
        weight = self.spk_embed_affine_layer.weight
        zeros = torch.zeros(batch, weight.size(1), device=weight.device, dtype=weight.dtype)
        return self.spk_embed_affine_layer(F.normalize(zeros, dim=1))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (1, N) -> mu (1, 80, mel_frames(N)). Block-causal over blocks of 10 tokens
        counted from the first token given."""
        x = self.input_embedding(torch.clamp(tokens, min=0))
        h = self.encoder_proj(self.encoder(x))
        return self.length_regulator(h, self.mel_frames(tokens.size(1)))

    def forward(self, tokens: torch.Tensor, prompt_mel: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """tokens (1, N) (prompt tokens first), prompt_mel (1, 80, P) the known mel of the first
        frames, noise (1, 80, mel_frames(N)) -> mel (1, 80, mel_frames(N)) including the prompt
        frames (the reference's ``inference`` returns ``[..., P:]``)."""
        mu = self.encode(tokens)
        cond = torch.zeros_like(mu)
        cond[:, :, : prompt_mel.size(-1)] = prompt_mel
        return self.decoder(noise, mu, self.speaker(), cond)
