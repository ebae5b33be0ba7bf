"""Mini-Omni's decode step through zoo.core.graphs: captured CUDA graphs (bucketed) against exact
eager steps, at several batch sizes: step time, whether the greedy tokens are identical, and the
host synchronisations per step (torch.cuda sync-debug mode counts every implicit sync).

    python bench/decode_graphs.py --device cuda --size full --batches 1 8 32
    python bench/decode_graphs.py --device cpu --size tiny      # bucketed eager vs exact, no sync count

On CPU the "graphs" column is the bucketed path run eagerly (what the tests check). Writes
bench/results/<date>_decode_graphs_<size>_<device>_<dtype>.json.
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

import torch

import zoo
from zoo.mini_omni.engine import Engine, Session
from zoo.mini_omni.prompts import TASKS, audio_question

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import RESULTS, machine  # noqa: E402
from latency import HostSyncs, sync  # noqa: E402


def run(model, engine: Engine, batch: int, steps: int, device) -> tuple[list[float], list, int]:
    """(step ms after two warm-up steps, every session's outputs, host syncs per timed step)."""
    generator = torch.Generator().manual_seed(0)
    task, dim = TASKS["A1A2+A1T2"], model.gpt.config.whisper_adapter_dim
    sessions = []
    for i in range(batch):
        n = 40 + 7 * i  # questions of different lengths: rows at different positions
        features = torch.randn(1, n, dim, generator=generator).to(device, engine.dtype)
        sessions.append(Session(task, audio_question(task, n), features, model.options({"top_k": 1}),
                                max_outputs=steps + 4))
    engine.start_many(sessions)
    times, syncs = [], HostSyncs(device)
    for i in range(steps):
        sync(device)
        started = time.perf_counter()
        with syncs if i >= 2 else contextlib.nullcontext():  # after the captures
            engine.step(sessions)
        sync(device)
        if i >= 2:
            times.append((time.perf_counter() - started) * 1000)
    outputs = [s.outputs for s in sessions]
    for s in sessions:
        engine.release(s)
    return times, outputs, round(syncs.count / max(1, steps - 2), 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = zoo.load("mini-omni", random_weights=args.size, device=str(device), dtype=args.dtype)
    rows = []
    for batch in args.batches:
        bucketed = Engine(model.gpt, max_rows=2 * batch, buckets=True)  # graphs too on CUDA (the default)
        exact = Engine(model.gpt, max_rows=2 * batch, graphs=False, buckets=False)
        g_times, g_out, g_syncs = run(model, bucketed, batch, args.steps, device)
        e_times, e_out, e_syncs = run(model, exact, batch, args.steps, device)
        rows.append({"batch": batch, "graphs": bucketed.graphs.enabled,
                     "step_ms": round(statistics.median(g_times), 2),
                     "eager_step_ms": round(statistics.median(e_times), 2),
                     "tokens_identical": g_out == e_out,
                     "host_syncs_per_step": g_syncs if device.type == "cuda" else None,
                     "eager_host_syncs_per_step": e_syncs if device.type == "cuda" else None})
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": "mini-omni", "size": args.size, "device": str(device), "dtype": args.dtype,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
              "torch": torch.__version__, "date": date.today().isoformat(), "rows": rows,
              "note": "random weights, greedy; a step includes sampling (one host read of the tokens, by design)"}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{result['date']}_decode_graphs_{args.size}_{device.type}_{args.dtype}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
