"""How long one long question stalls the sessions already speaking (#14 item 6, chunked prefill).

    python bench/prefill_stall.py --model mini-omni --size tiny --bounds 0 64
    python bench/prefill_stall.py --model glm-4-voice --size full --device cuda --dtype bfloat16 --bounds 0 512 2048

``--running`` sessions are decoding on the model's batched stepper (zoo.core.scheduler.Scheduler,
as server.py drives it) when a question of ``--long-seconds`` (default: the card's longest)
arrives. For each prefill bound (``--bounds``; 0: no bound, the whole prompt at once, as before
chunked prefill) it reports: the running sessions' decode step interval before the arrival
(median, and the longest over as many steps before) and the longest interval while the long
question is prefilled (the stall they feel),
and the long question's own time to its first output. The steps are timed where the scheduler
calls them. Random weights: the audio is noise; the compute is the real one at size "full".
Writes bench/results/<date>_prefill_stall_<model>_<size>_<device>_<dtype>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import threading
import time
from datetime import date
from pathlib import Path

import torch
from host import RESULTS, machine
from latency import question, sync
from tqdm import tqdm

import zoo
from zoo.core.scheduler import Scheduler
from zoo.core.types import ChunkedStarter


def run(model, device: torch.device, bound: int | None, running: int, long_seconds: float, warm_steps: int,
        timeout: float) -> dict:
    """One arrival of the long question while ``running`` sessions decode, under ``bound``."""
    stepper = model.stepper(running + 1)
    steps: list[float] = []  # when each batched step began
    step = stepper.step

    def timed_step(jobs):
        sync(device)
        steps.append(time.perf_counter())
        step(jobs)
    stepper.step = timed_step
    scheduler = Scheduler(stepper, running + 1, prefill_positions=bound)
    first_output = threading.Event()
    try:
        short_audio, rate = question(3.0)
        # as long as the model lets a reply run (its options cap the number): a session that ended
        # before the long question was answered would make its silence look like a stall
        keep_talking = {"max_new_tokens": 10**9, "temperature": 0}
        failures: list[Exception] = []
        ended: list[float] = []

        def keep(item):
            if isinstance(item, Exception):
                failures.append(item)
            elif item is None:
                ended.append(time.perf_counter())
        for _ in range(running):
            scheduler.submit(stepper.prepare(short_audio, rate, keep_talking), keep)
        deadline = time.perf_counter() + timeout
        while len(steps) < warm_steps and time.perf_counter() < deadline and not failures:
            time.sleep(0.005)
        if failures:
            raise RuntimeError(f"a running session failed: {failures[0]!r}")
        if len(steps) < warm_steps:
            raise RuntimeError(f"the running sessions made {len(steps)} steps in {timeout:.0f} s")
        long_audio, rate = question(long_seconds)
        job = stepper.prepare(long_audio, rate, {"max_new_tokens": 4, "temperature": 0})
        length = stepper.prompt_length(job) if isinstance(stepper, ChunkedStarter) else None
        before = list(steps)
        sync(device)
        arrived = time.perf_counter()
        answer: list = []

        def first(item):
            if not answer:
                answer.append(item)
                first_output.set()
        scheduler.submit(job, first)
        if not first_output.wait(timeout):
            raise RuntimeError(f"the long question had no output in {timeout:.0f} s")
        answered = time.perf_counter()
        if isinstance(answer[0], Exception):
            raise RuntimeError(f"the long question failed: {answer[0]!r}")
        if ended and min(ended) <= answered:
            raise RuntimeError("a running session ended before the long question's first output, so the "
                               "interval measures its end, not a stall (the model's stop rules ended its reply)")
        # its last part ran just before the first step after its answer: that interval counts too
        while not any(t > answered for t in steps) and time.perf_counter() < answered + timeout:
            time.sleep(0.005)
        during = [t for t in steps if t >= arrived]
        end = next((i for i, t in enumerate(during) if t > answered), len(during) - 1)
        during = during[: end + 1]
        gaps = [b - a for a, b in zip(before[-1:] + during, during)]
        if not gaps:
            raise RuntimeError("no running session stepped while the long question was prefilled: "
                               "they ended (raise --timeout or check the model's stop rules)")
    finally:
        scheduler.stop()
    usual = [b - a for a, b in zip(before, before[1:])][-len(gaps) - 8:]  # as many steps before, and a few
    return {
        "bound": bound, "prompt_positions": length,
        "step_ms_before_p50": round(statistics.median(usual) * 1000, 1),
        "step_ms_before_max": round(max(usual) * 1000, 1),  # audio windows are decoded every few steps
        "stall_ms_max": round(max(gaps) * 1000, 1),
        "steps_while_prefilling": sum(t <= answered for t in during),
        "long_question_first_output_ms": round((answered - arrived) * 1000, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini-omni", choices=zoo.names())
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--bounds", type=int, nargs="+", default=[0, 512],
                   help="prompt positions prefilled at most between two steps (0: no bound)")
    p.add_argument("--running", type=int, default=4, help="sessions decoding when the long question arrives")
    p.add_argument("--long-seconds", type=float, help="the long question (default: the card's max_input_seconds)")
    p.add_argument("--repeats", type=int, default=2, help="runs per bound (the first warms up; the last is kept)")
    p.add_argument("--warm-steps", type=int, default=24, help="decode steps the running sessions make first")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = zoo.load(args.model, random_weights=args.size, device=device, dtype=args.dtype)
    long_seconds = args.long_seconds or model.card.max_input_seconds
    rows = []
    for bound in tqdm(args.bounds, desc="bounds", unit="bound"):
        for _ in range(args.repeats):
            row = run(model, device, bound or None, args.running, long_seconds, args.warm_steps, args.timeout)
            # each run's stepper (its KV caches: gigabytes at full size) is held in a reference cycle
            # by its timed step: free it before the next run builds its own
            gc.collect()
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "date": date.today().isoformat(), "model": args.model, "size": args.size, "device": str(device),
        "dtype": args.dtype, "machine": machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "running_sessions": args.running, "long_question_seconds": long_seconds, "runs": rows,
        "note": "random weights: the replies are noise; the compute is the real one at size full",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}_prefill_stall_{args.model}_{args.size}_{device.type}_{args.dtype}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
