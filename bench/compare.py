"""Side by side in ONE process: a model's reference implementation and omni-zoo, on the same seeded
random weights and the same input, one table per model (#14 item 7).

    python bench/compare.py --model mini-omni --reference /path/to/mini-omni --size full --device cuda

``--reference``: a checkout of the model's upstream code, never vendored and never imported by the
package: the model's module here (bench/compare_<model>.py, found by its name) puts it on sys.path, builds its
networks and loads the zoo's random weights into them (the references' own loaders download
published weights), then drives the reference's own generation loop. The reference's
dependencies must be importable; a missing one is reported by name before anything loads.

Columns: TTFA p50/p95 (the input in hand -> the first audio out), step p50/p95 (the unit of
generation: a turn-based model's LLM decode step, e.g. Mini-Omni's ``next_token_batch`` against our
``Engine.step``; a duplex model's whole frame, e.g. Moshi's 80 ms or Hertz-dev's 125 ms: encode,
the transformers, decode), RTF (compute time / audio time), sessions at real time (the references
serve one session at a time, so 1 or 0; ours: the largest swept batch whose step keeps every
session at real time) and peak GPU memory. Each model's module says exactly what it times. The
Moshi, Hertz-dev and GLM-4-Voice rows also check that both sides ran the same weights (agreeing
greedy outputs; each network's largest difference); Mini-Omni's token parity with its reference is
tests/test_mini_omni_parity.py's.
Writes bench/results/<date>_compare_<model>_<size>_<device>_<dtype>.json and .md.

    python bench/compare.py --model moshi --reference /path/to/moshi --size tiny --device cpu
    python bench/compare.py --model hertz-dev --reference /path/to/hertz-dev --size tiny --device cpu
    python bench/compare.py --model glm-4-voice --reference /path/to/GLM-4-Voice --size tiny --device cpu
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from comparison import check_reference, table  # noqa: E402
from host import RESULTS, machine  # noqa: E402

# one module per model beside this script: bench/compare_<model>.py defines its COMPARISON
COMPARISONS = {path.stem.removeprefix("compare_").replace("_", "-"): importlib.import_module(path.stem).COMPARISON
               for path in sorted(HERE.glob("compare_*.py"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(COMPARISONS), default="mini-omni")
    p.add_argument("--reference", type=Path, required=True, help="a checkout of the reference implementation")
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32",
                   help="both implementations' precision: one of the model's module's Comparison.dtypes")
    p.add_argument("--repeats", type=int, default=3, help="replies per implementation after one warm-up")
    p.add_argument("--steps", type=int, default=40, help="generation steps per reply")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                   help="our batch sizes for 'sessions at real time'")
    p.add_argument("--sweep-steps", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads on CPU")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.reference = args.reference.resolve()
    comparison = COMPARISONS[args.model]
    if args.dtype not in comparison.dtypes:
        p.error(f"--dtype: the {args.model} comparison runs in {' or '.join(comparison.dtypes)}")
    check_reference(args.model, comparison, args.reference)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = comparison.run(args, device)
    meta = {"model": args.model, "size": args.size, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
            "dtype": args.dtype,
            "torch": torch.__version__, "date": date.today().isoformat(), "steps": args.steps,
            "repeats": args.repeats, "threads": torch.get_num_threads()}
    result = {**meta, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}_compare_{args.model}_{args.size}_{device.type}_{args.dtype}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    text = table(args.model, rows, meta)
    (args.out / f"{stem}.md").write_text(text + f"\nMachine: {meta['device_name']}; torch {meta['torch']}.\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
