"""GLM-4-Voice-9B decode throughput over session slots, full size with seeded random weights.

    python bench/glm4_engine.py --device cuda --dtype bfloat16 --batches 1 4 8 16
    python bench/glm4_engine.py --device cuda --dtype int4 --agreement-steps 64 --memory-limit-gib 11.5

For each batch size: the median time of one decode step for that many sessions at a given
context length, with CUDA graphs (the engine's default on a GPU) and without, whether the two give
the same tokens, and how many sessions keep real time (GLM-4-Voice needs 18.75 tokens/s per
session while it interleaves 13 text : 26 audio tokens). Also the bytes of the LLM's weights, its
memory on a GPU and the peak of the whole run, building included (``--memory-limit-gib``: as if
the card had that much).

Quantised (``--dtype int8/int4``) with ``--agreement-steps N``: the quality cost against the same
seeded network unquantised (bf16 on a GPU), built, run and freed first: it decodes N greedy tokens
after the prompt; the quantised network is teacher-forced along them and its choice compared at
every step (token agreement), with the relative error of its logits. Random weights: the margins
between the top tokens are not the published model's, so this measures the packing's error, not
speech quality. Writes bench/results/<date>_glm-4-voice_engine_<size>_<device>_<dtype>.json and
prints it.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from host import RESULTS, machine  # bench/ is the script's own folder: python bench/glm4_engine.py
from latency import cap_device_memory, sync
from tqdm import tqdm

from zoo.core.devices import pick_device
from zoo.core.quantize import CPU_KERNELS, QUANTIZED, bitsandbytes_linear
from zoo.glm4_voice.engine import SlotEngine
from zoo.glm4_voice.model import precision
from zoo.glm4_voice.random_weights import random_llm

REAL_TIME_TOKENS_PER_S = (13 + 26) / (26 / 12.5)  # 18.75


def step_times(engine: SlotEngine, batch: int, context: int, steps: int) -> tuple[list[float], list[int]]:
    """Fill ``batch`` slots with ``context`` tokens, then time greedy steps; returns times (ms)
    and the first slot's tokens."""
    slots = [engine.acquire() for _ in range(batch)]
    for slot in slots:
        logits = engine.prefill(slot, prompt(context))
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


def prompt(context: int) -> list[int]:
    return [151331, 151333] + [1000 + (i % 5000) for i in range(context - 2)]


@torch.inference_mode()
def greedy_run(llm, context: int, steps: int, forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """One session: the prompt, then ``steps`` tokens, each the argmax (or, teacher-forced, the
    next of ``forced``) -> (the argmax at every step, the logits (steps + 1, vocab) in float32)."""
    engine = SlotEngine(llm, slots=1, max_len=context + steps + 8, graphs=False)
    slot = engine.acquire()
    logits = [engine.prefill(slot, prompt(context)).float()]
    for i in range(steps):
        token = logits[-1].argmax() if forced is None else torch.tensor(forced[i])
        logits.append(engine.step([slot], token.view(1))[0].float())
    logits = torch.stack(logits)
    return logits.argmax(dim=-1).tolist(), logits.cpu()


def agreement(reference: tuple[list[int], torch.Tensor], llm, context: int) -> dict:
    """The quantised network teacher-forced along the reference's greedy tokens."""
    tokens, expected = reference
    chosen, logits = greedy_run(llm, context, len(tokens) - 1, forced=tokens[:-1])
    same = [a == b for a, b in zip(chosen, tokens)]
    errors = ((logits - expected).norm(dim=-1) / expected.norm(dim=-1)).tolist()
    return {"steps": len(same), "token_agreement": round(sum(same) / len(same), 4),
            "first_disagreement": same.index(False) if not all(same) else None,
            "logits_relative_error_median": round(statistics.median(errors), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float32, int8 or int4")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--context", type=int, default=300, help="tokens already in each session")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--no-eager", action="store_true", help="skip the run without CUDA graphs")
    p.add_argument("--agreement-steps", type=int, default=0,
                   help="int8/int4: greedy steps compared with the same network unquantised (see above)")
    p.add_argument("--bitsandbytes", action="store_true",
                   help="CPU: pack int8/int4 with bitsandbytes (what a GPU runs) instead of torch's CPU kernels")
    p.add_argument("--memory-limit-gib", type=float,
                   help="CUDA: refuse allocations beyond this many GiB while the measured network is built and run")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    llm_dtype, quantized, _ = precision(args.dtype, pick_device(device))
    bitsandbytes_on_cpu = args.bitsandbytes and device.type == "cpu"
    if bitsandbytes_on_cpu:  # this process only: the zoo picks its CPU kernels
        for kind in QUANTIZED:
            CPU_KERNELS[kind] = functools.partial(bitsandbytes_linear, kind=kind)
    if args.agreement_steps and not quantized:
        p.error("--agreement-steps compares a quantised network (--dtype int8 or int4) with the unquantised one")
    if args.agreement_steps:  # before the cap: the unquantised network may not fit under it
        reference = random_llm(args.size, device=device, dtype=llm_dtype)
        expected = greedy_run(reference, args.context, args.agreement_steps)
        del reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cap_device_memory(device, args.memory_limit_gib)
    t0 = time.perf_counter()
    llm = random_llm(args.size, device=device, dtype=llm_dtype, quantized=quantized)
    load_s = time.perf_counter() - t0
    llm_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    quality = agreement(expected, llm, args.context) if args.agreement_steps else None
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
    packed_by = None if not quantized else "torch CPU kernels" if device.type == "cpu" and not bitsandbytes_on_cpu \
        else "bitsandbytes"
    result = {
        "model": "glm-4-voice", "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
        "dtype": args.dtype, "packed_by": packed_by, "torch": torch.__version__, "date": date.today().isoformat(),
        "context_tokens": args.context, "load_s": round(load_s, 1),
        "llm_memory_gib": round(llm_gib, 2) if llm_gib is not None else None,
        "llm_weights_gib": round(sum(t.numel() * t.element_size() for t in (*llm.parameters(), *llm.buffers())) / 2**30, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "memory_limit_gib": args.memory_limit_gib,
        "agreement_with_unquantized": quality,
        "rows": rows, "note": "random weights; greedy steps; time includes the per-step host read of the tokens",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    packer = "_bitsandbytes" if bitsandbytes_on_cpu else ""
    name = f"{result['date']}_glm-4-voice_engine_{args.size}_{device.type}_{args.dtype}{packer}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
