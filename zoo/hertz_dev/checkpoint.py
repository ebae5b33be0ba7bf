"""Loading the published files of si-pbc/hertz-dev unchanged.

The files are flat state dicts (``torch.save`` of an OrderedDict) with no config: every size is
read from tensor shapes; head counts are the published ones (main 32, resynthesizer 16) at any
width. Loading is strict where the reference's is not (it uses ``strict=False`` and prints the
result): every missing key, unexpected key and shape mismatch of a file is reported in one
``CheckpointMismatch``. The one tolerance: unexpected keys in the codec file are a warning, since
the published codec file is ~1.7 MB larger than its module's tensors and its real key list has
not been seen (see tests/data/keys/hertz-dev.json); missing codec keys are still an error.

Key map: module keys equal the published names, except that the codec's weight-normed layers
(every conv of encoder and decoder, ``compressor.proj_in`` / ``proj_out``) are stored as
``<layer>.parametrizations.weight.original0`` (g) / ``original1`` (v), or in the legacy form
``<layer>.weight_g`` / ``weight_v``; both are accepted and folded into ``<layer>.weight``
= g * v / ||v|| (norm over every dim but 0, ``torch._weight_norm``) at load time.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.checkpoints import mismatch_problems, resolve_files
from ..core.errors import CheckpointMismatch
from ..core.quantize import quantize_linears
from .codec import STRIDES, CodecConfig, WaveCodec
from .quantizer import LatentQuantizer, QuantizerConfig
from .transformer import HertzLM, MainConfig, ResynthConfig, Resynthesizer

CODEC_FILE = "inference_apatosaurus_95000.pt"
QUANTIZER_FILE = "inference_volcano_3.pt"
# network set -> (main model file, resynthesizer file)
VARIANT_FILES = {
    "mono": ("inference_caraway_112000.pt", "inference_whip_72000.pt"),
    "split": ("inference_scion_54000.pt", "inference_care_50000.pt"),
    "ablation": ("inference_syrup_110000.pt", "inference_whip_72000.pt"),  # pure-audio mono, optional
}
PUBLISHED_FILES = (CODEC_FILE, QUANTIZER_FILE, *VARIANT_FILES["mono"], *VARIANT_FILES["split"])

_G = (".parametrizations.weight.original0", ".weight_g")
_V = (".parametrizations.weight.original1", ".weight_v")


# -- reading --------------------------------------------------------------------------------
def resolve(source: str | os.PathLike, files: tuple[str, ...]) -> Path:
    """The folder holding ``files`` (a local folder, or downloaded from the hub repo)."""
    return resolve_files(source, files, component="checkpoint")


# -- sizes from shapes ------------------------------------------------------------------------
def _weight_shape(state: Mapping[str, torch.Tensor], layer: str) -> torch.Size | None:
    for suffix in (".weight", *_V):
        if layer + suffix in state:
            return state[layer + suffix].shape
    return None


def _need(state, layer: str, file: str) -> torch.Size:
    shape = _weight_shape(state, layer)
    if shape is None:
        raise CheckpointMismatch(f"{file}: no weight for {layer!r}; is this the right file?")
    return shape


def codec_config(state: Mapping[str, torch.Tensor], file: str = CODEC_FILE) -> CodecConfig:
    first = _need(state, "encoder.res_stack.0.conv", file)
    base, kernel = first[0], first[-1]
    ratios = []
    for i, stride in enumerate(STRIDES, start=1):
        cin = _need(state, f"encoder.res_stack.{i}.res_block.0.conv1.conv", file)[0]
        down = _weight_shape(state, f"encoder.res_stack.{i}.res_block.3.conv")
        if down is not None and down[-1] != 2 * stride:
            raise CheckpointMismatch(f"{file}: encoder block {i} kernel {down[-1]} is not 2 x stride {stride}")
        cout = down[0] if down is not None else cin
        if cout % base:
            raise CheckpointMismatch(f"{file}: encoder block {i} width {cout} is not a multiple of {base}")
        ratios.append(cout // base)
    middle = base * ratios[-1]
    proj = _weight_shape(state, "decoder.multiplier_proj")
    multiplier = proj[0] // middle if proj is not None else 1
    latent = _need(state, "compressor.proj_out", file)[1]
    return CodecConfig(encode_channels=base, channel_ratios=tuple(ratios), decode_multiplier=multiplier,
                       kernel_size=kernel, latent_dim=latent)


def quantizer_config(state, file: str = QUANTIZER_FILE) -> QuantizerConfig:
    dim, input_dim = _need(state, "input", file)
    return QuantizerConfig(dim=dim, ff_dim=_need(state, "ffnn.down_proj", file)[1], input_dim=input_dim)


def main_config(state, file: str) -> MainConfig:
    dim, latent = _need(state, "input", file)
    layers = _count_layers(state, "layers.")
    return MainConfig(dim=dim, layers=layers, ff_dim=_need(state, "layers.0.ffnn.ffnn.down_proj", file)[1],
                      vocab=_need(state, "output.output", file)[0], latent_dim=latent, split="input2.weight" in state)


def resynth_config(state, file: str) -> ResynthConfig:
    dim, latent = _need(state, "io.input_projection", file)
    return ResynthConfig(dim=dim, layers=_count_layers(state, "stack.layers."),
                         ff_dim=_need(state, "stack.layers.0.ffnn.ffnn.down_proj", file)[1],
                         components=_need(state, "io.fc_weight", file)[0], latent_dim=latent,
                         plex_dim=_need(state, "plex_projection", file)[1],
                         split="io2.input_projection.weight" in state)


def _count_layers(state, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if not ids or ids != set(range(len(ids))):
        raise CheckpointMismatch(f"layers under {prefix!r} are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


# -- key map ----------------------------------------------------------------------------------
def weight_normed(module: nn.Module) -> set[str]:
    """Layers stored with weight norm: for the codec every Conv1d / ConvTranspose1d / Linear
    (the reference applies it to all encoder and decoder convs and to the compressor)."""
    if not isinstance(module, WaveCodec):
        return set()
    return {name for name, m in module.named_modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear))}


def file_keys(module: nn.Module, legacy: bool = False) -> dict[str, list[int]]:
    """The published file's tensor names and shapes for ``module`` (which may be on ``meta``):
    its state dict with weight-normed layers renamed (``legacy``: weight_g / weight_v)."""
    normed = weight_normed(module)
    g, v = (_G[1], _V[1]) if legacy else (_G[0], _V[0])
    keys: dict[str, list[int]] = {}
    for name, tensor in module.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and layer in normed:
            keys[layer + g] = [tensor.shape[0]] + [1] * (tensor.dim() - 1)
            keys[layer + v] = list(tensor.shape)
        else:
            keys[name] = list(tensor.shape)
    return keys


def load_module(module: nn.Module, state: Mapping[str, torch.Tensor], file: str, *, dtype: torch.dtype,
                device, tolerate_unexpected: bool = False) -> nn.Module:
    """Fill ``module`` (built on any device, e.g. ``meta``) from the published ``state``
    strictly, converting each tensor straight to ``device`` / ``dtype``."""
    normed = weight_normed(module)
    wanted = module.state_dict()
    used: set[str] = set()
    missing, shapes, values = [], [], {}
    for name, target in wanted.items():
        layer = name.rsplit(".", 1)[0]
        found = None
        if name in state:
            found = state[name]
            used.add(name)
        elif name.endswith(".weight") and layer in normed:
            for g_suffix, v_suffix in zip(_G, _V):
                if layer + g_suffix in state and layer + v_suffix in state:
                    g, v = state[layer + g_suffix], state[layer + v_suffix]
                    used.update((layer + g_suffix, layer + v_suffix))
                    if v.shape != target.shape or g.numel() != target.shape[0]:
                        shapes.append(f"{layer + v_suffix}: file {list(v.shape)}, g {list(g.shape)}, "
                                      f"module {list(target.shape)}")
                        found = False
                        break
                    # folded on the CPU: CUDA's fused weight-norm kernel differs by ~1e-7 even in
                    # float64, the CPU path is the reference's own computation
                    compute = torch.promote_types(dtype, torch.float32)
                    found = torch._weight_norm(v.to("cpu", compute), g.to("cpu", compute), 0)
                    break
        if found is None:
            missing.append(_missing_name(state, name, layer, layer in normed and name.endswith(".weight")))
            continue
        if found is False:
            continue
        if found.shape != target.shape:
            shapes.append(f"{name}: file {list(found.shape)}, module {list(target.shape)}")
            continue
        values[name] = found.to(device=device, dtype=dtype if found.is_floating_point() else found.dtype)
    unexpected = sorted(set(state) - used)
    problems = mismatch_problems(missing, [] if tolerate_unexpected else unexpected, shapes)
    if problems:
        raise CheckpointMismatch(
            f"{file} does not match the {type(module).__name__} it is loaded into ({problems}). "
            "Check that the folder holds the files of si-pbc/hertz-dev as published."
        )
    if unexpected:
        warnings.warn(f"{file}: ignoring {len(unexpected)} tensor(s) the codec does not use: {unexpected}",
                      stacklevel=2)
    module.load_state_dict(values, strict=True, assign=True)
    return module.to(device)


def _missing_name(state, name: str, layer: str, normed: bool) -> str:
    """How to name a missing tensor: for a weight-normed layer the missing half of a pair that is
    partly there, else both halves of both namings."""
    if not normed:
        return name
    for g, v in zip(_G, _V):
        if layer + g in state or layer + v in state:
            return layer + (g if layer + g not in state else v)
    return f"{layer}{_G[0]} + {layer}{_V[0]} (or {layer}{_G[1]} + {layer}{_V[1]})"


# -- building each network from its file ---------------------------------------------------------
def build_codec(state, *, dtype, device, file: str = CODEC_FILE) -> WaveCodec:
    with torch.device("meta"):
        codec = WaveCodec(codec_config(state, file))
    return load_module(codec, state, file, dtype=dtype, device=device, tolerate_unexpected=True).eval()


def build_quantizer(state, *, dtype, device, file: str = QUANTIZER_FILE) -> LatentQuantizer:
    with torch.device("meta"):
        quantizer = LatentQuantizer(quantizer_config(state, file))
    return load_module(quantizer, state, file, dtype=dtype, device=device).eval()


def build_main(state, *, dtype, device, file: str, quantized: str | None = None) -> HertzLM:
    with torch.device("meta"):
        model = HertzLM(main_config(state, file))
    return _placed(model, model.layers, state, file, dtype, device, quantized)


def build_resynth(state, *, dtype, device, file: str, quantized: str | None = None) -> Resynthesizer:
    with torch.device("meta"):
        model = Resynthesizer(resynth_config(state, file))
    return _placed(model, model.stack.layers, state, file, dtype, device, quantized)


def _placed(model: nn.Module, blocks: nn.Module, state, file: str, dtype, device, quantized: str | None):
    """``model`` loaded from ``state`` onto ``device``. ``quantized`` ("int8", "int4"): the
    transformer blocks' Linears packed (zoo.core.quantize) on the host first, one at a time, so the
    device never holds them in full precision; the input, output and mixture projections stay in
    ``dtype``, as GLM-4-Voice keeps its output layer. A quantised load empties ``state``: its
    tensors may be the module's own, and each must go as soon as its packed copy exists."""
    if not quantized:
        return load_module(model, state, file, dtype=dtype, device=device).eval()
    load_module(model, state, file, dtype=dtype, device="cpu")
    state.clear()
    quantize_linears(blocks, quantized, dtype, device)
    return model.to(device).eval()

