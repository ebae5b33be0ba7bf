"""Side by side in ONE process: a model's reference implementation and omni-zoo, on the same seeded
random weights and the same question, one table per model (#14 item 7).

    python bench/compare.py --model mini-omni --reference /path/to/mini-omni --size full --device cuda

``--reference``: a checkout of the upstream code (gpt-omni/mini-omni), never vendored and never
imported by the package: this script puts it on sys.path, builds its networks itself and loads
the zoo's random weights into them (the reference's own loader downloads published weights), then
drives the reference's own generation loop. The reference's dependencies (lightning,
openai-whisper, snac) must be importable; a missing one is reported by name before anything loads.

Columns: TTFA p50/p95 (question audio in hand -> first audio chunk), decode step p50/p95 (the
LLM's step: the reference's ``next_token_batch``, our ``Engine.step``), steady RTF (time / audio
after the first chunk), sessions at real time (the reference serves one session at a time, so 1
or 0; ours: the largest batch whose step keeps every session at real time, from a sweep) and peak
GPU memory. Writes bench/results/<date>_compare_<model>_<size>_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import zoo
from zoo.mini_omni.engine import Engine, Session
from zoo.mini_omni.prompts import TASKS, audio_question
from zoo.mini_omni.random_weights import (
    FULL_SNAC,
    FULL_WHISPER_DIMS,
    TINY_SNAC,
    TINY_WHISPER_DIMS,
    litgpt_yaml,
    random_snac,
    write_tiny_tokenizer,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import QUESTION, RESULTS, machine, sync  # noqa: E402

REFERENCE_DEPENDENCIES = {"mini-omni": ("lightning", "whisper", "snac", "yaml")}


class MissingReference(SystemExit):
    pass


def check_reference(model: str, path: Path) -> None:
    """A clear error, before any model loads, for a wrong checkout or a missing dependency."""
    marker = {"mini-omni": "inference.py"}[model]
    if not (path / marker).is_file():
        raise MissingReference(f"--reference {path}: no {marker} there; pass a checkout of the reference code")
    missing = []
    for name in REFERENCE_DEPENDENCIES[model]:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    if missing:
        raise MissingReference(f"the {model} reference needs {', '.join(missing)}: install its requirements.txt "
                               "(e.g. pip install lightning openai-whisper snac) in this environment")


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


# -- Mini-Omni -------------------------------------------------------------------------------------
def mini_omni_reference(ours, path: Path, size: str, device: torch.device, folder: Path):
    """The reference's OmniInference on our weights: its GPT (litgpt fork) with our LLM state, an
    openai-whisper model whose encoder holds our encoder's state, a SNAC built as ours is."""
    sys.path.insert(0, str(path))
    import lightning as L
    import whisper
    from litgpt.model import GPT, Config

    inference = importlib.import_module("inference")
    config = Config(**{**litgpt_yaml(ours.gpt.config), "post_adapter": False})
    gpt = GPT(config)
    gpt.load_state_dict(ours.gpt.state_dict(), strict=True)
    dims = whisper.model.ModelDimensions(**(FULL_WHISPER_DIMS if size == "full" else TINY_WHISPER_DIMS))
    whisper_model = whisper.model.Whisper(dims)
    whisper_model.encoder.load_state_dict(ours.encoder.state_dict(), strict=True)
    write_tiny_tokenizer(folder / "tokenizer.json")  # decodes the text at the end; not timed
    runner = object.__new__(inference.OmniInference)
    runner.device = str(device)
    runner.fabric = L.Fabric(devices=1, accelerator=device.type, strategy="auto")
    runner.model = runner.fabric.setup(gpt).eval()  # as its load_model: the wrapper has .device
    runner.whispermodel = whisper_model.to(device).eval()
    runner.snacmodel = random_snac(FULL_SNAC if size == "full" else TINY_SNAC, 0).to(device).eval()
    runner.text_tokenizer = importlib.import_module("litgpt").Tokenizer(folder)
    return inference, runner


def compare_mini_omni(args, device: torch.device) -> list[dict]:
    ours = zoo.load("mini-omni", random_weights=args.size, device=str(device), dtype="float32")
    rate = ours.card.output_sample_rate
    steps = args.steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "question.wav"
        audio, sr = sf.read(QUESTION, dtype="float32")
        sf.write(wav, audio, sr)
        inference, runner = mini_omni_reference(ours, args.reference, args.size, device, Path(tmp))
        for name, run in (("reference", lambda: _reference_reply(runner, wav, steps)),
                          ("omni-zoo", lambda: _our_reply(ours, wav, steps))):
            owner, method = (inference, "next_token_batch") if name == "reference" else (Engine, "step")
            rows.append(_measure(name, run, owner, method, rate, device, args))
    step_budget = 1000 / ours.card.reply_tokens_per_second
    rows[0]["sessions_at_real_time"] = int(rows[0]["step_ms_p50"] <= step_budget)  # one session at a time
    rows[1]["sessions_at_real_time"], rows[1]["batch_sweep"] = _our_sessions(ours, step_budget, args, device)
    return rows


def _reference_reply(runner, wav: Path, steps: int):
    T = 3 + int((sf.info(wav).frames / sf.info(wav).samplerate) * 1000 / 20) + 1  # its prompt length
    for pcm in runner.run_AT_batch_stream(str(wav), max_returned_tokens=T + steps, temperature=0.9, top_k=1):
        yield np.frombuffer(pcm, np.int16)  # its chunks are PCM16 bytes


def _our_reply(ours, wav: Path, steps: int):
    for chunk in ours.respond(str(wav), options={"max_new_tokens": steps, "top_k": 1}):
        yield chunk.audio


def _measure(name, run, owner, method, rate, device, args) -> dict:
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


def _our_sessions(ours, budget_ms: float, args, device: torch.device) -> tuple[int, list[dict]]:
    """The largest swept batch whose decode step stays within one step of real-time audio."""
    features = ours.encode_audio(str(QUESTION))
    task = TASKS["A1A2+A1T2"]
    opts = ours.options({"max_new_tokens": 1 << 10, "top_k": 1})
    best, sweep = 0, []
    for batch in args.sessions:
        engine = Engine(ours.gpt, max_rows=2 * batch)
        live = [Session(task, audio_question(task, features.size(1)), features, opts, max_outputs=1 << 10)
                for _ in range(batch)]
        engine.start_many(live)
        times = []
        for i in range(args.sweep_steps + 2):
            sync(device)
            started = time.perf_counter()
            engine.step(live)
            sync(device)
            if i >= 2:
                times.append((time.perf_counter() - started) * 1000)
        step = statistics.median(times)
        sweep.append({"sessions": batch, "step_ms": round(step, 2)})
        if step <= budget_ms:
            best = batch
        else:
            break
    return best, sweep


def table(model: str, rows: list[dict], meta: dict) -> str:
    lines = [f"### {model} ({meta['size']} random weights, {meta['device']}, float32, {meta['date']})", "",
             "| implementation | TTFA p50 / p95 ms | step p50 / p95 ms | RTF | sessions at real time | peak GPU GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['implementation']} | {r['ttfa_ms_p50']} / {r['ttfa_ms_p95']} | {r['step_ms_p50']} / "
                     f"{r['step_ms_p95']} | {r['rtf_median']} | {r['sessions_at_real_time']} | "
                     f"{r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '-'} |")
    return "\n".join(lines) + "\n"


MODELS = {"mini-omni": compare_mini_omni}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="mini-omni")
    p.add_argument("--reference", type=Path, required=True, help="a checkout of the reference implementation")
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="replies per implementation after one warm-up")
    p.add_argument("--steps", type=int, default=40, help="generation steps per reply")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                   help="our batch sizes for 'sessions at real time'")
    p.add_argument("--sweep-steps", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads on CPU")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.reference = args.reference.resolve()
    check_reference(args.model, args.reference)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = MODELS[args.model](args, device)
    meta = {"model": args.model, "size": args.size, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
            "torch": torch.__version__, "date": date.today().isoformat(), "steps": args.steps,
            "repeats": args.repeats, "threads": torch.get_num_threads()}
    result = {**meta, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}_compare_{args.model}_{args.size}_{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    text = table(args.model, rows, meta)
    (args.out / f"{stem}.md").write_text(text + f"\nMachine: {meta['device_name']}; torch {meta['torch']}.\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
