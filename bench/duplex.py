"""Full-duplex sessions per device for any model whose card says duplex, with seeded random
weights (full size by default: the real compute cost).

    python bench/duplex.py --model hertz-dev --device cuda --dtype bfloat16 --sessions 1 2 4 8
    python bench/duplex.py --model moshi --size tiny --device cpu --dtype float32 --sessions 1 8 32

For each number of concurrent sessions: the median (and p90) time of one batched step of every
session at once through the model's ``duplex_stepper`` (one ``card.frame_samples`` frame each:
125 ms for Hertz-dev, 80 ms for Moshi; the whole step: codec encode, transformers, sampling,
codec decode), whether it keeps real time (a step under the frame's duration) and, on CUDA, the
host synchronisations per step (each stalls the host until the GPU has caught up). The frame and
everything else come from the card. Writes
bench/results/<date>_<model>_duplex_<size>_<device>_<dtype>.json and prints it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from host import RESULTS, machine  # bench/ is the script's own folder: python bench/duplex.py
from latency import HostSyncs, sync
from tqdm import tqdm

import zoo


def step_times(stepper, count: int, steps: int, device: torch.device,
               out_samples: int) -> tuple[float, float, float | None, np.ndarray]:
    """Median and p90 ms of ``steps`` batched steps of ``count`` sessions (3 warm-up steps first:
    captures, allocations), each step a fresh frame of noise per session, the host
    synchronisations per step (CUDA only; each one stalls the host until the GPU catches up) and
    the last step's audio (count, samples)."""
    frame_samples = stepper.frame_samples
    rng = np.random.default_rng(0)
    handles = [stepper.open({"seed": i}) for i in range(count)]
    times, syncs = [], HostSyncs(device)
    for step in range(steps + 3):
        frames = [(0.1 * rng.standard_normal(frame_samples)).astype(np.float32) for _ in handles]
        sync(device)
        start = time.perf_counter()
        with syncs if step >= 3 else contextlib.nullcontext():
            outputs = stepper.step(handles, frames)
        sync(device)
        if step >= 3:
            times.append((time.perf_counter() - start) * 1000)
    assert all(isinstance(o, np.ndarray) and o.shape == (out_samples,) for o in outputs), outputs
    for handle in handles:
        stepper.close(handle)
    per_step = round(syncs.count / steps, 1) if syncs.measured else None
    return statistics.median(times), float(np.percentile(times, 90)), per_step, np.stack(outputs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hertz-dev", choices=[n for n in zoo.names() if zoo.card(n).duplex])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--eager-too", action="store_true",
                   help="also time exact eager steps (graphs=False) at each count: eager_step_ms beside step_ms, "
                        "and the largest difference of the last step's audio (max_abs_vs_eager)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = zoo.load(args.model, random_weights=args.size, device=device, dtype=args.dtype)
    frame_samples = model.card.frame_samples
    frame_ms = 1000 * frame_samples / model.card.input_sample_rate
    out_samples = frame_samples * model.card.output_sample_rate // model.card.input_sample_rate
    rows = []
    for count in tqdm(args.sessions, desc="sessions", unit="batch"):
        # the same frames for both runs (seeded); each stepper holds only this count's caches (32 sessions of
        # Moshi at full size take ~50 GB: two steppers of the largest count would not fit)
        median, p90, syncs, audio = step_times(model.duplex_stepper(count), count, args.steps, device, out_samples)
        row = {"sessions": count, "step_ms": round(median, 2), "p90_ms": round(p90, 2), "real_time": median < frame_ms,
               "host_syncs_per_step": syncs}
        if args.eager_too:  # the same seeds and frames: the same audio, unless a graph computes otherwise
            eager_ms, _, _, eager_audio = step_times(model.duplex_stepper(count, graphs=False), count, args.steps,
                                                     device, out_samples)
            row["eager_step_ms"] = round(eager_ms, 2)
            row["max_abs_vs_eager"] = float(np.abs(audio - eager_audio).max())
        rows.append(row)
    result = {
        "model": args.model, "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
        "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": date.today().isoformat(), "frame_ms": frame_ms, "rows": rows,
        "max_real_time_sessions": max([r["sessions"] for r in rows if r["real_time"]], default=0),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "note": f"random weights; each step is one batched {frame_ms:g} ms frame for every session",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{result['date']}_{args.model}_duplex_{args.size}_{device.type}_{args.dtype}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
