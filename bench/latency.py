"""Latency of one model, stage by stage and end to end, with seeded random weights.

    python bench/latency.py --model mini-omni --size full --device cpu
    python bench/latency.py --size full --device cuda --dtype bfloat16
    python bench/latency.py --model mini-omni2 --size full --device cpu --image demos/images/red_circle.png

``--image FILE`` (models whose card says image_input): the replies are measured without and with
the image in the same process, alternating reply by reply (TTFA, steady RTF, TTFA part by part and
the decode step through the serving contract), into ``with_image`` beside the plain numbers.

Stages (medians after warm-up): the four every model has (zoo.Stage: encode, prefill, one decode
step, first audio) and any a model adds; then
TTFA (audio in hand -> first audio chunk out), steady-state RTF (compute time / audio time after
the first chunk), peak memory, and TTFA part by part through the serving contract
(``ttfa_breakdown_ms``: prepare, start, the decode steps to the first audio, poll, the rest). Writes bench/results/<date>_<model>_<size>_<device>_<dtype>.json
and appends a row to bench/results/latency.md. Random weights: the audio is noise; the compute
cost is the real one at size "full". ``--memory-limit-gib N`` (CUDA) runs it all, loading
included, as if the card had N GiB: it finishes only if the model fits one.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from host import RESULTS, machine
from tqdm import tqdm

import zoo
from zoo.core.image import load_image
from zoo.core.types import Stage, prepare_job

QUESTION = Path(__file__).resolve().parents[1] / "demos" / "samples" / "01.wav"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class HostSyncs:
    """Counts the host synchronisations of the code run inside ``with counter:`` (CUDA's sync
    debug mode: every blocking read, pageable copy or stream wait warns); nothing on CPU, where
    ``count`` stays 0 and ``measured`` False."""

    def __init__(self, device: torch.device) -> None:
        self.measured, self.count = device.type == "cuda", 0

    def __enter__(self) -> HostSyncs:
        if self.measured:
            self._caught = warnings.catch_warnings(record=True)
            self._seen = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.measured:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(*exc)
            self.count += sum("synchroniz" in str(w.message) for w in self._seen)


def cap_device_memory(device: torch.device, gib: float | None) -> None:
    """Make a big GPU behave like a card with ``gib`` GiB: torch's allocator refuses anything
    beyond it (an out-of-memory error), so a run that finishes under the cap fits such a card.
    The CUDA context (~0.5 GiB) is outside the cap: pass a card's size less that."""
    if gib is None:
        return
    if device.type != "cuda":
        raise SystemExit("--memory-limit-gib needs a CUDA device")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)


def timed(fn, device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def question(seconds: float) -> tuple[np.ndarray, int]:
    """The first demo question, padded with silence or cut to ``seconds``."""
    audio, rate = sf.read(QUESTION, dtype="float32")
    n = int(seconds * rate)
    return np.pad(audio[:n], (0, max(0, n - audio.size))), rate


def reply_timeline(model, audio, rate, options, device, image=None) -> list[tuple[float, int]]:
    sync(device)
    start = time.perf_counter()
    events = []
    for chunk in model.respond(audio, rate, options, image=image):
        if chunk.audio.size:
            sync(device)
            events.append((time.perf_counter() - start, chunk.audio.size))
    return events


def ttfa_breakdown(model, audio, rate, options, device, image=None) -> dict:
    """Where a reply's time to first audio goes, through the serving contract on a one-session
    stepper: ``prepare`` (input decoding and encoding), ``start`` (prefill), the decode steps
    until a chunk carries audio (the last of them decodes the first audio in the models that
    decode inside ``step``) and the ``poll`` calls (the others decode there)."""
    stepper = model.stepper(1)
    parts = {"prepare": 0.0, "start": 0.0, "steps": 0.0, "last_step": 0.0, "poll": 0.0}
    count = 0

    def clock(name, fn, *args):
        sync(device)
        started = time.perf_counter()
        out = fn(*args)
        sync(device)
        parts[name] += (time.perf_counter() - started) * 1000
        return out

    begun = time.perf_counter()
    job = clock("prepare", prepare_job, stepper, model.card, audio, rate, options, None, image)
    try:
        clock("start", stepper.start, job)
        while True:
            chunk = clock("poll", job.poll)
            if (chunk is not None and chunk.audio.size) or job.done:
                break
            parts["steps"] += parts["last_step"]
            parts["last_step"] = 0.0
            clock("last_step", stepper.step, [job])
            count += 1
    finally:
        stepper.release(job)
    total = (time.perf_counter() - begun) * 1000
    out = {name: round(ms, 2) for name, ms in parts.items()}
    out.update(steps_to_first_audio=count, total=round(total, 2),
               unaccounted=round(total - sum(parts.values()), 2))
    return out


def reply_steps_ms(model, audio, rate, options, device, image=None) -> list[float]:
    """Each decode step of one reply through the serving contract (``stepper.step`` on a
    one-session stepper, its ``poll`` not included), until the reply ends: the per-step time of a
    real question, with its own prompt (an image question's prompt is longer)."""
    stepper = model.stepper(1)
    job = prepare_job(stepper, model.card, audio, rate, options, None, image)
    times = []
    try:
        stepper.start(job)
        while not job.done:
            while job.poll() is not None:
                pass
            if job.done:
                break
            sync(device)
            started = time.perf_counter()
            stepper.step([job])
            sync(device)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        stepper.release(job)
    return times


def replies(model, audio, rate, options, device, repeats: int, images: list) -> list[dict]:
    """Per case of ``images`` (None: no image): TTFA, steady RTF, TTFA part by part and the decode
    step of ``repeats`` replies after one warm-up each. The cases alternate reply by reply, so a
    machine whose load changes during the run weighs on every case alike."""
    ttfa, rtf, breakdowns, steps = ([[] for _ in images] for _ in range(4))
    for image in images:
        reply_timeline(model, audio, rate, options, device, image)  # warm-up
    for _ in tqdm(range(repeats), desc="replies", unit="round"):
        for case, image in enumerate(images):
            events = reply_timeline(model, audio, rate, options, device, image)
            ttfa[case].append(events[0][0] * 1000)
            if len(events) > 1:
                later_audio = sum(n for _, n in events[1:]) / model.card.output_sample_rate
                rtf[case].append((events[-1][0] - events[0][0]) / later_audio)
            breakdowns[case].append(ttfa_breakdown(model, audio, rate, options, device, image))
            steps[case] += reply_steps_ms(model, audio, rate, options, device, image)
    return [{
        "ttfa_ms": {"median": round(statistics.median(ttfa[case]), 1), "all": [round(t, 1) for t in ttfa[case]]},
        "rtf_steady": round(statistics.median(rtf[case]), 3) if rtf[case] else None,
        # medians of each part over the repeats: TTFA through the serving contract, part by part
        "ttfa_breakdown_ms": {k: round(statistics.median(b[k] for b in breakdowns[case]), 2)
                              for k in breakdowns[case][0]},
        # every decode step of the replies through stepper.step (prompt included in the context)
        "reply_step_ms": {"median": round(statistics.median(steps[case]), 2),
                          "p90": round(float(np.percentile(steps[case], 90)), 2), "n": len(steps[case])},
    } for case in range(len(images))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini-omni", choices=zoo.names())
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--question-seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reply-steps", type=int, default=47, help="decode steps in the RTF run")
    p.add_argument("--image", type=Path,
                   help="an image file (models whose card says image_input): replies are also measured "
                        "with it, in the same run (results: 'with_image')")
    p.add_argument("--memory-limit-gib", type=float,
                   help="CUDA: refuse allocations beyond this many GiB from the start (loading included), "
                        "to show the model runs on a smaller card")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--reference-json", type=Path,
                   help="the reference implementation's numbers, measured by a harness outside this "
                        "repository in the same run; copied into the result for a side-by-side record")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.image is not None and not zoo.card(args.model).image_input:
        p.error(f"--image: {args.model} does not take images (its card says image_input=False)")
    image = load_image(args.image) if args.image is not None else None

    cap_device_memory(device, args.memory_limit_gib)
    t0 = time.perf_counter()
    model = zoo.load(args.model, random_weights=args.size, device=device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    audio, rate = question(args.question_seconds)
    if device.type == "cuda":
        load_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    stages = {}
    runs = model.benchmark_stages(audio, rate)
    for stage, fn in tqdm(runs.items(), desc="stages", unit="stage"):
        name = str(stage)
        repeats = args.repeats if name != Stage.DECODE_STEP else max(args.repeats, 20)
        times = timed(fn, device, repeats, warmup=2 if name == Stage.DECODE_STEP else 1)
        stages[name] = {"median_ms": round(statistics.median(times), 2),
                        "p90_ms": round(float(np.percentile(times, 90)), 2), "n": len(times)}

    options = model.options({"max_new_tokens": 1 + args.reply_steps})
    plain, *seen = replies(model, audio, rate, options, device, args.repeats,
                           [None] if image is None else [None, image])
    seen = seen[0] if seen else None

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        peak_kind = "cuda max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_kind = "process max RSS"
    result = {
        "model": args.model, "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
        "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": date.today().isoformat(), "question_s": args.question_seconds,
        "load_s": round(load_s, 2), "stages": stages,
        "reply_steps": args.reply_steps,
        **plain,
        "peak_memory_gib": round(peak, 2), "peak_memory_kind": peak_kind,
        "load_peak_memory_gib": round(load_peak, 2) if device.type == "cuda" else None,
        "memory_limit_gib": args.memory_limit_gib,
        "weights": "seeded random (output is noise)",
    }
    if seen is not None:
        result["with_image"] = {"image": str(args.image), "image_size": list(image.size), **seen}
    if args.reference_json:
        result["reference"] = json.loads(args.reference_json.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['date']}_{args.model}_{args.size}_{device.type}_{args.dtype}" + ("_image" if seen else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    append_row(args.out / "latency.md", result)
    if seen is not None:
        append_row(args.out / "latency.md", {**result, **seen, "model": f"{args.model} + image"})
    print(json.dumps(result, indent=2))
    return 0


HEADER = ("| date | model | size | device | dtype | encode ms | prefill ms | decode step ms (p50/p90) "
          "| first audio ms | TTFA ms | RTF | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def append_row(path: Path, r: dict) -> None:
    s = r["stages"]
    step = s[Stage.DECODE_STEP]
    row = (f"| {r['date']} | {r['model']} | {r['size']} | {r['device_name']} ({r['device']}) | {r['dtype']} "
           f"| {s[Stage.ENCODE]['median_ms']} | {s[Stage.PREFILL]['median_ms']} "
           f"| {step['median_ms']} / {step['p90_ms']} | {s[Stage.FIRST_AUDIO]['median_ms']} "
           f"| {r['ttfa_ms']['median']} | {r['rtf_steady']} | {r['peak_memory_gib']} |\n")
    if not path.exists():
        path.write_text("# Latency results (bench/latency.py; seeded random weights)\n\n" + HEADER)
    with path.open("a") as f:
        f.write(row)


if __name__ == "__main__":
    sys.exit(main())
