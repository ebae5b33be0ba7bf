"""Hertz-dev full-duplex sessions per GPU, full size with seeded random weights.

    python bench/hertz_duplex.py --device cuda --dtype bfloat16 --sessions 1 2 4 8

For each number of concurrent sessions: the median time of one batched 125 ms step (codec
encode of both channels, main model, resynthesizer, codec decode, for every session at once) and
whether it keeps real time (a step under 125 ms). Writes
bench/results/<date>_hertz-dev_duplex_<size>_<device>_<dtype>.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import zoo
from bench.latency import machine, sync

RESULTS = Path(__file__).resolve().parent / "results"
FRAME_MS = 125.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = zoo.load("hertz-dev", random_weights=args.size, device=device, dtype=args.dtype)
    stepper = model.duplex_stepper(max(args.sessions))
    frame_samples = model.card.frame_samples
    rng = np.random.default_rng(0)
    rows = []
    for count in tqdm(args.sessions, desc="sessions", unit="batch"):
        handles = [stepper.open({"seed": i}) for i in range(count)]
        times = []
        for step in range(args.steps + 3):
            frames = [(0.1 * rng.standard_normal(frame_samples)).astype(np.float32) for _ in handles]
            sync(device)
            start = time.perf_counter()
            outputs = stepper.step(handles, frames)
            sync(device)
            if step >= 3:  # warm-up steps excluded
                times.append((time.perf_counter() - start) * 1000)
        assert all(o.shape == (frame_samples,) for o in outputs)
        for handle in handles:
            stepper.close(handle)
        median = statistics.median(times)
        rows.append({"sessions": count, "step_ms": round(median, 2),
                     "p90_ms": round(float(np.percentile(times, 90)), 2), "real_time": median < FRAME_MS})
    result = {
        "model": "hertz-dev", "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
        "dtype": args.dtype, "torch": torch.__version__, "date": date.today().isoformat(),
        "frame_ms": FRAME_MS, "rows": rows,
        "max_real_time_sessions": max([r["sessions"] for r in rows if r["real_time"]], default=0),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "note": "random weights; each step is one batched 125 ms frame for every session",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{result['date']}_hertz-dev_duplex_{args.size}_{device.type}_{args.dtype}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
