"""Moshi's int8 checkpoints on a device: does the loaded model hold the file's own int8 rows, and
does it answer like the same file on the CPU?

    python bench/moshi_q8.py --device cuda

Writes the tiny q8 folder (zoo.moshi.random_weights.write_tiny_q8_checkpoint: the reference
export's layout, random weights), loads it on ``--device`` (bitsandbytes on a GPU, torch's
kernels on a CPU) and reports: how many packed layers hold exactly the file's int8 rows and
scales (``rows_exact`` of ``layers``; on a GPU this checks that bitsandbytes, packing the rows
read back to float16, gives back the file's own), and the greedy duplex tokens' agreement with
the CPU's int8 model over ``--steps`` frames of seeded noise (the kernels differ: bitsandbytes
also rounds the activations to int8, so they part after a while on random weights). Writes
bench/results/<date>_moshi_q8_<device>.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
from host import RESULTS, machine  # bench/ is the script's own folder: python bench/moshi_q8.py
from safetensors.torch import load_file

import zoo
from zoo.core.quantize import Int8Linear
from zoo.moshi.checkpoint import MOSHI_Q8_FILE
from zoo.moshi.lm import lm_names
from zoo.moshi.random_weights import write_tiny_q8_checkpoint
from zoo.moshi.transformer import SCALES


def packed_rows(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 rows, float32 row maxima) a packed layer holds, whichever packer made it."""
    if isinstance(layer, Int8Linear):
        return layer.weight[:, : layer.in_features].cpu(), (layer.scale.float() * 127).cpu()
    scb = getattr(layer.weight, "SCB", None)  # bitsandbytes' Int8Params
    return None if scb is None else (layer.weight.data.cpu(), scb.float().cpu())


def greedy_tokens(model, steps: int) -> torch.Tensor:
    stepper = model.duplex_stepper(1)
    handle = stepper.open(zoo.Options(temperature=0.0))
    rng = np.random.default_rng(0)
    tokens = []
    for _ in range(steps):
        out = stepper.step([handle], [(0.1 * rng.standard_normal(model.card.frame_samples)).astype(np.float32)])[0]
        if isinstance(out, Exception):
            raise SystemExit(f"the session failed: {out}")
        if handle.tokens is not None:
            tokens.append(handle.tokens.cpu().clone())
    return torch.stack(tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_q8_checkpoint(Path(tmp) / "q8")
        model = zoo.load("moshi", checkpoint=str(folder), device=device)
        here = zoo.load("moshi", checkpoint=str(folder), device="cpu")
        file = lm_names(load_file(str(folder / MOSHI_Q8_FILE)), model.lm.config)
    modules = dict(model.lm.named_modules())
    names = [k.removesuffix(".weight" + SCALES) for k in file if k.endswith(SCALES)]
    exact = 0
    for name in names:
        held = packed_rows(modules[name])
        rows, scales = file[name + ".weight"], file[name + ".weight" + SCALES]
        # Int8Linear keeps its scales in bfloat16 (the kernel's input), bitsandbytes in float32
        tolerance = 2 ** -8 if isinstance(modules[name], Int8Linear) else 0
        exact += held is not None and torch.equal(held[0], rows) and \
            bool(((held[1] - scales).abs() <= tolerance * scales).all())
    ours, cpu = greedy_tokens(model, args.steps), greedy_tokens(here, args.steps)
    differ = (ours != cpu).any(dim=1).nonzero()
    result = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
        "torch": torch.__version__, "date": date.today().isoformat(),
        "packer": type(modules[names[0]]).__module__ + "." + type(modules[names[0]]).__name__,
        "layers": len(names), "rows_exact": int(exact),
        "token_agreement_with_cpu": round(float((ours == cpu).float().mean()), 3),
        "steps_equal_before_first_difference": int(differ[0, 0]) if len(differ) else len(ours),
        "note": "tiny random weights in the reference q8 export's layout; greedy duplex on seeded noise",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{result['date']}_moshi_q8_{device.type}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if exact == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
