"""GLM-4-Voice-9B decode throughput over session slots, full size with seeded random weights.

    python bench/glm4_engine.py --device cuda --dtype bfloat16 --batches 1 4 8 16

For each batch size: the median time of one decode step for that many sessions at a given
context length, with CUDA graphs (the engine's default on a GPU) and without, whether the two give
the same tokens, and how many sessions keep real time (GLM-4-Voice needs 18.75 tokens/s per
session while it interleaves 13 text : 26 audio tokens). Also the LLM's memory. Writes
bench/results/<date>_glm-4-voice_engine_<device>_<dtype>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from bench.latency import machine, sync
from zoo.core.devices import pick_device
from zoo.glm4_voice.engine import SlotEngine
from zoo.glm4_voice.model import precision
from zoo.glm4_voice.random_weights import random_llm

RESULTS = Path(__file__).resolve().parent / "results"
REAL_TIME_TOKENS_PER_S = (13 + 26) / (26 / 12.5)  # 18.75


def step_times(engine: SlotEngine, batch: int, context: int, steps: int) -> tuple[list[float], list[int]]:
    """Fill ``batch`` slots with ``context`` tokens, then time greedy steps; returns times (ms)
    and the first slot's tokens."""
    slots = [engine.acquire() for _ in range(batch)]
    for slot in slots:
        logits = engine.prefill(slot, [151331, 151333] + [1000 + (i % 5000) for i in range(context - 2)])
    tokens = logits.argmax().repeat(batch)
    times, first = [], []
    for _ in range(steps):
        sync(engine.device)
        start = time.perf_counter()
        tokens = engine.step(slots, tokens).argmax(dim=-1)
        first.append(int(tokens[0]))  # the host read every step, as a real reply does
        times.append((time.perf_counter() - start) * 1000)
    for slot in slots:
        engine.release(slot)
    return times[3:], first


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float32, int8 or int4")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--context", type=int, default=300, help="tokens already in each session")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--no-eager", action="store_true", help="skip the run without CUDA graphs")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    llm_dtype, quantized, _ = precision(args.dtype, pick_device(device))
    llm = random_llm(args.size, device=device, dtype=llm_dtype, quantized=quantized)
    load_s = time.perf_counter() - t0
    llm_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    rows = []
    engine = SlotEngine(llm, slots=max(args.batches), max_len=args.context + args.steps + 8)
    graphs_available = engine.graphs.enabled
    for batch in tqdm(args.batches, desc="batch sizes", unit="batch"):
        row = {"batch": batch}
        times, tokens = step_times(engine, batch, args.context, args.steps)
        row["step_ms"] = round(statistics.median(times), 2)
        row["graphs"] = engine.graphs.enabled  # False after a failed capture
        if graphs_available and not args.no_eager:
            with engine.graphs.eager():
                eager, eager_tokens = step_times(engine, batch, args.context, args.steps)
            row["eager_step_ms"] = round(statistics.median(eager), 2)
            row["graph_tokens_equal_eager"] = tokens == eager_tokens
        row["tokens_per_s_per_session"] = round(1000 / row["step_ms"], 1)
        row["real_time"] = row["tokens_per_s_per_session"] >= REAL_TIME_TOKENS_PER_S
        rows.append(row)
    result = {
        "model": "glm-4-voice", "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
        "dtype": args.dtype, "torch": torch.__version__, "date": date.today().isoformat(),
        "context_tokens": args.context, "load_s": round(load_s, 1),
        "llm_memory_gib": round(llm_gib, 2) if llm_gib is not None else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "rows": rows, "note": "random weights; greedy steps; time includes the per-step host read of the tokens",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{result['date']}_glm-4-voice_engine_{args.size}_{device.type}_{args.dtype}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
