"""Tiny Hertz-dev checkpoints in the published layout, for tests and smoke runs.

``write_tiny_checkpoint`` writes the files of si-pbc/hertz-dev under their published names
(inference_apatosaurus_95000.pt codec, inference_volcano_3.pt quantizer, inference_care_50000.pt /
inference_scion_54000.pt split resynthesizer / main, inference_whip_72000.pt /
inference_caraway_112000.pt mono ones; optionally inference_syrup_110000.pt) with the published
tensor names (codec weight norm as ``parametrizations.weight.original0/1``), the published dtypes
(main models bfloat16, the rest float32), the published head counts, strides, FSQ levels and
vocabulary, and tiny widths. Weights are seeded random, scaled so that the latents, the FSQ
indices, the mixture and the audio are spread out rather than degenerate: everything generated
from them is noise.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..core.devices import pick_device
from ..core.quantize import device_precision
from ..core.tiny import cached_folder
from .checkpoint import (
    CODEC_FILE,
    QUANTIZER_FILE,
    VARIANT_FILES,
    build_codec,
    build_main,
    build_quantizer,
    build_resynth,
    file_keys,
)
from .codec import CodecConfig, WaveCodec
from .quantizer import LatentQuantizer, QuantizerConfig
from .transformer import HertzLM, MainConfig, ResynthConfig, Resynthesizer

TINY_CODEC = CodecConfig(encode_channels=2, decode_multiplier=2)
TINY_QUANTIZER = QuantizerConfig(dim=32, ff_dim=64)
TINY_MAIN = MainConfig(dim=64, layers=2, ff_dim=128)
TINY_RESYNTH = ResynthConfig(dim=64, layers=2, ff_dim=128, plex_dim=TINY_QUANTIZER.dim)
FULL_CODEC, FULL_QUANTIZER = CodecConfig(), QuantizerConfig()
FULL_MAIN, FULL_RESYNTH = MainConfig(), ResynthConfig()

# Bump when what write_tiny_checkpoint writes changes: cached folders of other versions are not reused.
TINY_FORMAT = 1


def tiny_checkpoint(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The tiny checkpoint folder for ``seed``, written once into a cache directory
    (``ZOO_TINY_DIR``, else the system temp dir) and reused."""
    return cached_folder(f"hertz-dev-v{TINY_FORMAT}-seed{seed}", lambda folder: write_tiny_checkpoint(folder, seed=seed),
                         root)


def write_tiny_checkpoint(folder: Path, *, seed: int = 0, ablation: bool = False) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for name, state in random_states("tiny", generator, ablation=ablation).items():
        torch.save(state, folder / name)
    return folder


def random_states(size: str, generator: torch.Generator, *, ablation: bool = False, device="cpu",
                  variants=("mono", "split"), codec: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """file name -> published-form state dict with seeded random weights."""
    c, q, m, r = (TINY_CODEC, TINY_QUANTIZER, TINY_MAIN, TINY_RESYNTH) if size == "tiny" else \
        (FULL_CODEC, FULL_QUANTIZER, FULL_MAIN, FULL_RESYNTH)
    with torch.device("meta"):
        files: dict[str, nn.Module] = {}
        if codec:
            files[CODEC_FILE] = WaveCodec(c)
            files[QUANTIZER_FILE] = LatentQuantizer(q)
        for variant in variants + (("ablation",) if ablation else ()):
            split = variant == "split"
            main_file, resynth_file = VARIANT_FILES[variant]
            files[main_file] = HertzLM(MainConfig(**{**m.__dict__, "split": split}))
            files.setdefault(resynth_file, Resynthesizer(ResynthConfig(**{**r.__dict__, "split": split})))
    out = {}
    for name, module in files.items():
        dtype = torch.bfloat16 if isinstance(module, HertzLM) else torch.float32  # as published
        out[name] = _random(module, generator, device, dtype)
    return out


def _randn(shape, generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _random(module: nn.Module, generator: torch.Generator, device, dtype) -> dict[str, torch.Tensor]:
    """Seeded random tensors for ``module``'s published keys, scaled per kind of tensor."""
    state = {}
    for name, shape in file_keys(module).items():
        if state:  # one float32 tensor at a time (full size: 27 GB of float32 otherwise)
            last = next(reversed(state))
            state[last] = state[last].to(dtype)
        x = _randn(shape, generator, device)
        fan_in = shape[1] * (shape[2] if len(shape) == 3 else 1) if len(shape) > 1 else 1
        if isinstance(module, WaveCodec):
            state[name] = _codec_tensor(name, shape, x)
        elif name.endswith(("norm.weight", "norm_q.weight", "norm_k.weight", "out_norm.weight")):
            # sharp attention (q.k large): a wrong RoPE, scale or mask then changes the indices
            gain = 3.0 if name.endswith(("norm_q.weight", "norm_k.weight")) else 1.0
            state[name] = gain * (1.0 + 0.1 * x)
        elif name.endswith("output.output.weight"):
            state[name] = 3.0 * x / fan_in**0.5  # logits spread over a few units: clear argmax
        elif name.endswith("fc_scale.bias"):
            state[name] = -2.0 + 0.1 * x  # mixture scales around 0.4
        elif name.endswith("fc_weight.weight"):
            state[name] = 3.0 * x / fan_in**0.5
        elif name == "compressor.project_in.weight":  # FSQ pre-codes spread over all 8 levels
            state[name] = 2.5 * x / fan_in**0.5
        elif name.endswith(".bias"):
            state[name] = 0.02 * x
        else:
            state[name] = x / fan_in**0.5
    last = next(reversed(state))
    state[last] = state[last].to(dtype)
    return state


def _codec_tensor(name: str, shape, x: torch.Tensor) -> torch.Tensor:
    """Weight-norm g (``original0``) sets each output filter's norm: ~1 keeps the scale, the 1x1
    conv closing a residual unit is kept small so the 18 residual units don't blow up."""
    if name.endswith("pad_buffer"):
        return torch.zeros(shape)
    if name.endswith("original1"):
        return x
    if name.endswith("original0"):
        if ".conv2." in name:
            gain = 0.3
        elif name.startswith("decoder.res_stack.6"):
            gain = 2.0  # last conv: audio of about 0.1-0.2 rms after the 0.05 output scale
        elif name.startswith("compressor.proj_in"):
            gain = 3.0  # posterior means of about unit size, like the resynthesizer's mixture
        else:
            gain = 1.0
        return gain * (1.0 + 0.1 * x).abs()
    if name == "compressor.proj_in.bias":
        latent = shape[0] // 2
        return torch.cat([0.1 * x[:latent], -4.0 + 0.1 * x[latent:]])  # posterior std ~0.14
    return 0.02 * x


def random_model(size: str = "full", *, device=None, dtype=None, seed: int = 0):
    """A HertzDev with seeded random weights built in memory (no files): ``full`` has the
    published dimensions (the real compute cost), ``tiny`` the test ones. The mono and split
    networks are built when first used, like the loaded model's."""
    from .model import HertzDev

    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    device = pick_device(device)
    dtype, quantized = device_precision(dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    states = random_states(size, generator, device=device, variants=())
    codec = build_codec(states[CODEC_FILE], dtype=dtype, device=device)
    quantizer = build_quantizer(states[QUANTIZER_FILE], dtype=dtype, device=device)
    del states

    def networks(variant: str):
        # a quantised network is drawn on the host, where it is packed before it moves
        drawn_on = torch.device("cpu") if quantized else device
        g = torch.Generator(device=drawn_on).manual_seed(seed + {"mono": 1, "split": 2, "ablation": 3}[variant])
        files = random_states(size, g, device=drawn_on, variants=(variant,) if variant != "ablation" else ("mono",),
                              codec=False)
        main_file, resynth_file = VARIANT_FILES["split" if variant == "split" else "mono"]
        main = build_main(files.pop(main_file), dtype=dtype, device=device, file=main_file, quantized=quantized)
        resynth = build_resynth(files.pop(resynth_file), dtype=dtype, device=device, file=resynth_file,
                                quantized=quantized)
        return main, resynth

    return HertzDev(codec, quantizer, networks, source=f"random {size}")


def build(size: str, *, device=None, dtype=None, seed: int = 0, checkpoint=None):
    """``zoo.load(..., random_weights=size)``: "tiny" writes the tiny folder in the published
    layout (once per seed) and loads it through the real loader (a given ``checkpoint`` folder
    replaces it); "full" builds the published dimensions in memory."""
    from .model import HertzDev

    if size == "full":
        return random_model("full", device=device, dtype=dtype, seed=seed)
    return HertzDev.load(device=device, dtype=dtype, checkpoint=checkpoint or tiny_checkpoint(seed=seed))
