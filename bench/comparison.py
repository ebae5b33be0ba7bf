"""What every side-by-side comparison in bench/compare.py shares: the description of a reference
(``Comparison``), the check that its checkout and dependencies are there, timing of a stream and
of the calls of one method, and the table."""
from __future__ import annotations

import contextlib
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from duplex import step_times
from latency import sync  # bench/ is the scripts' own folder


class MissingReference(SystemExit):
    pass


@dataclass(frozen=True)
class Comparison:
    """One model's reference: ``markers``, files every checkout of it has; ``dependencies``, the
    modules its code imports (checked before anything loads, named in ``install``'s hint);
    ``run(args, device)`` -> the table's rows, the reference's first; ``dtypes``, the precisions
    both sides can run in (``--dtype``)."""

    markers: tuple[str, ...]
    dependencies: tuple[str, ...]
    install: str
    run: Callable
    dtypes: tuple[str, ...] = ("float32",)


def check_reference(model: str, comparison: Comparison, path: Path) -> None:
    """A clear error, before any model loads, for a wrong checkout or a missing dependency."""
    absent = [marker for marker in comparison.markers if not (path / marker).is_file()]
    if absent:
        raise MissingReference(f"--reference {path}: no {', '.join(absent)} there; pass a checkout of the "
                               f"{model} reference code")
    missing = []
    for name in comparison.dependencies:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    if missing:
        raise MissingReference(f"the {model} reference needs {', '.join(missing)}: {comparison.install}")


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round(float(np.percentile(values, 50)), 2), round(float(np.percentile(values, 95)), 2)


@contextlib.contextmanager
def timing(owner, name: str, sink: list[float], device: torch.device):
    """Time every call of ``owner.name`` (ms, synchronised) into ``sink`` while inside the block."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        sync(device)
        started = time.perf_counter()
        out = original(*args, **kwargs)
        sync(device)
        sink.append((time.perf_counter() - started) * 1000)
        return out

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def stream_stats(chunks, rate: int, device: torch.device) -> tuple[float, float]:
    """(TTFA ms, steady RTF) of a stream of audio arrays."""
    started = time.perf_counter()
    first, audio_after = None, 0
    for audio in chunks:
        sync(device)
        if audio.size and first is None:
            first = time.perf_counter()
        elif first is not None:
            audio_after += audio.size
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the reply had no audio")
    return (first - started) * 1000, ((end - first) / (audio_after / rate)) if audio_after else float("nan")


def measure(name, run, owner, method, rate, device, args) -> dict:
    steps_ms, ttfa, rtf = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with contextlib.redirect_stdout(sys.stderr):  # the reference prints its progress
        stream_stats(run(), rate, device)  # warm-up
        with timing(owner, method, steps_ms, device):
            for _ in range(args.repeats):
                t, r = stream_stats(run(), rate, device)
                ttfa.append(t)
                rtf.append(r)
    (ttfa50, ttfa95), (step50, step95) = percentiles(ttfa), percentiles(steps_ms)
    return {"implementation": name, "ttfa_ms_p50": ttfa50, "ttfa_ms_p95": ttfa95, "step_ms_p50": step50,
            "step_ms_p95": step95, "rtf_median": round(statistics.median(rtf), 3),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def agreeing_prefix(first, second) -> int:
    """How many outputs, from the first, two sides' sequences agree on (the shorter's length when all do)."""
    return next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


def median_ms(call: Callable[[], object], count: int, device: torch.device, warmup: int = 2) -> float:
    """The median ms of ``count`` synchronised calls of ``call``, after ``warmup`` uncounted ones
    (a new batch size's graph capture, first allocations)."""
    times = []
    for i in range(warmup + count):
        sync(device)
        started = time.perf_counter()
        call()
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def sessions_at_real_time(counts, step_ms: Callable[[int], float], budget_ms: float) -> tuple[int, list[dict]]:
    """Ours: the largest of ``counts`` (ascending) whose batched step, ``step_ms(count)``, stays
    within ``budget_ms`` (one token's or one frame's duration), and the sweep up to the first count
    that does not."""
    best, sweep = 0, []
    for count in counts:
        step = step_ms(count)
        sweep.append({"sessions": count, "step_ms": round(step, 2)})
        if step > budget_ms:
            break
        best = count
    return best, sweep


def duplex_step_ms(model, args, device: torch.device, count: int) -> float:
    """Ours, full duplex: the median batched step of ``count`` sessions (bench/duplex.py's
    ``step_times``, ``args.sweep_steps`` of them), the frame sizes from the card."""
    card = model.card
    out_samples = card.frame_samples * card.output_sample_rate // card.input_sample_rate
    return step_times(model.duplex_stepper(count), count, args.sweep_steps, device, out_samples)[0]


def table(model: str, rows: list[dict], meta: dict) -> str:
    lines = [f"### {model} ({meta['size']} random weights, {meta['device']}, {meta['dtype']}, {meta['date']})", "",
             "| implementation | TTFA p50 / p95 ms | step p50 / p95 ms | RTF | sessions at real time | peak GPU GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['implementation']} | {r['ttfa_ms_p50']} / {r['ttfa_ms_p95']} | {r['step_ms_p50']} / "
                     f"{r['step_ms_p95']} | {r['rtf_median']} | {r['sessions_at_real_time']} | "
                     f"{r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '-'} |")
    return "\n".join(lines) + "\n"
