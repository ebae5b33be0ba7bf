"""One transformer layer's Linear products at each precision on this machine: where the time of a
decode step goes when its weights are quantised (weight-only), and what each packing costs in error.

    python bench/quantized_layers.py --model glm-4-voice --batches 1 4
    python bench/quantized_layers.py --model mini-omni --batches 1 2 8

The layer's Linear shapes come from the model's own code at its published size (GLM-4-Voice-9B's
layer as transformers' GlmForCausalLM holds it: q, k, v, o, gate_up, down; Mini-Omni: Qwen2-0.5B's
attn, proj, fc_1, fc_2, proj), with random weights drawn like a trained layer's (normal, std 0.02).
For each batch: the median time of one pass through the layer's Linears in eval mode, as a model
runs them (float32, bfloat16, and int8 / int4 as ``zoo.core.quantize`` packs them on this device,
computing in bfloat16), and, on a CPU, the same through bitsandbytes (what a GPU runs;
``--no-bitsandbytes`` skips it). ``first_pass_ms``: the layer's very first pass, which also pays
for lazy repacking (bitsandbytes' NF4 on a CPU repacks each weight on its first product). The
error column is the packed weights' distance from the originals relative to their norm, measured
on 64 random inputs (int4: ours against NF4). A decode step of a few sessions reads every weight
once and little else, so the time follows the bytes read. Writes
bench/results/<date>_quantized_layers_<model>_<device>.json and prints a line per precision.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from host import RESULTS, machine  # bench/ is the script's own folder: python bench/quantized_layers.py
from latency import sync
from torch import nn

from zoo.core.quantize import CPU_KERNELS, bitsandbytes_linear


def layer_shapes(model: str) -> list[tuple[int, int]]:
    """(in_features, out_features) of every Linear of one decoder layer, at the published size."""
    with torch.device("meta"):
        if model == "glm-4-voice":
            from transformers import GlmForCausalLM

            from zoo.glm4_voice.llm import glm_config
            from zoo.glm4_voice.random_weights import FULL_LLM_CONFIG

            layer = GlmForCausalLM(glm_config(FULL_LLM_CONFIG)).model.layers[0]
        else:
            from zoo.mini_omni.gpt import GPT
            from zoo.mini_omni.random_weights import FULL_GPT

            layer = GPT(FULL_GPT).transformer.h[0]
    return [(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, nn.Linear)]


def variants(linears: list[nn.Linear], device: torch.device, bitsandbytes: bool):
    """(name, activation dtype, the layer's Linears at that precision in eval mode, as a model
    runs them, and their weight error or None)."""
    # copies: the originals stay on the host, where bitsandbytes packs a weight as it moves to a GPU
    yield "float32", torch.float32, [copy.deepcopy(m).to(device) for m in linears], None
    yield "bfloat16", torch.bfloat16, [copy.deepcopy(m).to(device, torch.bfloat16) for m in linears], None
    for kind in ("int8", "int4"):
        if device.type == "cpu":
            packed = [CPU_KERNELS[kind](m, torch.bfloat16).eval() for m in linears]
            yield kind, torch.bfloat16, packed, error([probe_output(m) for m in packed], linears)
        if bitsandbytes or device.type != "cpu":
            packed = [bitsandbytes_linear(m, torch.bfloat16, kind).to(device).eval() for m in linears]
            yield f"{kind} bitsandbytes", torch.bfloat16, packed, error([bitsandbytes_probe_output(m, kind) for m in packed],
                                                                        linears)


def probe_output(module: nn.Module) -> torch.Tensor:
    """The weight a CPU kernel computes with, as far as it acts on inputs: its float32 product
    with a batch of random inputs, which ``error`` compares with the original weight's product
    (an identity input would cost as many rows as the layer has inputs)."""
    return module(probe(module.in_features)) - (module.bias.float() if module.bias is not None else 0)


def probe(features: int) -> torch.Tensor:
    return torch.randn(64, features, generator=torch.Generator().manual_seed(features))


def bitsandbytes_probe_output(module: nn.Module, kind: str) -> torch.Tensor:
    """bitsandbytes' packed weight unpacked by bitsandbytes, applied to the same inputs."""
    import bitsandbytes.functional as F

    weight = module.weight
    if kind == "int4":
        unpacked = F.dequantize_4bit(weight.data, weight.quant_state)
    else:
        unpacked = F.int8_vectorwise_dequant(weight.CB, weight.SCB)
    return probe(module.in_features) @ unpacked.float().cpu().t()


def error(outputs: list[torch.Tensor], linears: list[nn.Linear]) -> float:
    """|(W_packed - W) x| / |W x| over the whole layer, x the probe inputs: for inputs with
    independent components, the packed weights' distance from the originals relative to their norm."""
    difference = total = 0.0
    for out, linear in zip(outputs, linears):
        exact = probe(linear.in_features) @ linear.weight.float().cpu().t()
        difference += (out.float() - exact).square().sum().item()
        total += exact.square().sum().item()
    return round((difference / total) ** 0.5, 4)


@torch.no_grad()
def times_ms(linears: list[nn.Module], dtype: torch.dtype, batch: int, device: torch.device,
             repeats: int) -> tuple[float, float]:
    """(the first pass, the median of the next ``repeats``) through the layer's Linears: the first
    also pays for lazy work (bitsandbytes' NF4 on a CPU repacks each weight on its first product)."""
    inputs = {m.in_features: torch.randn(batch, m.in_features, dtype=dtype, device=device) for m in linears}
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for m in linears:
            m(inputs[m.in_features])
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(times[0], 2), round(statistics.median(times[1:]), 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["glm-4-voice", "mini-omni"], default="glm-4-voice")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-bitsandbytes", action="store_true", help="CPU: skip the bitsandbytes rows")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    linears = []
    for inputs, outputs in layer_shapes(args.model):
        linear = nn.Linear(inputs, outputs, bias=False).requires_grad_(False)
        linear.weight.normal_(0.0, 0.02, generator=generator)
        linears.append(linear)
    rows = []
    for name, dtype, modules, weight_error in variants(linears, device, not args.no_bitsandbytes):
        row = {"precision": name, "weight_error": weight_error}
        for batch in args.batches:
            first, row[f"batch_{batch}_ms"] = times_ms(modules, dtype, batch, device, args.repeats)
            row.setdefault("first_pass_ms", first)
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    result = {"model": args.model, "layer_shapes": layer_shapes(args.model), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "date": date.today().isoformat(),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{result['date']}_quantized_layers_{args.model}_{device.type}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
