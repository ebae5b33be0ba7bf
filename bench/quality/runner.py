"""Score models' spoken answers.

    python -m bench.quality --model mini-omni                        # published weights
    python -m bench.quality --model mini-omni hertz-dev --tiny       # random weights: a smoke run
    python -m bench.quality --model glm-4-voice --data ~/voicebench/openbookqa.jsonl --limit 100

Each question goes through ``respond``; per reply: TTFA and RTF (timed as inference.py does),
the ASR's transcript of the reply audio and its WER against the reply's own text (speech-text
consistency; audio-only models have no text), a DNSMOS estimate, and the answer's score when the
question has a reference. Duplex models also run a scripted conversation (duplex.py). Writes
<out>/report.json, report.md, the replies' audio, and quality.png when several models ran.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import zoo
from zoo.cli import add_component_flags, component_values, noise_notice
from zoo.core.devices import pick_device

from . import report
from .asr import load_asr
from .data import load_questions
from .duplex import Script, converse
from .mos import Mos
from .scoring import answer_score, wer

RESULTS = Path(__file__).resolve().parents[1] / "results" / "quality"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["mini-omni"], choices=zoo.names())
    p.add_argument("--tiny", action="store_true", help="tiny random weights: the replies are noise, the scores too")
    p.add_argument("--random-full", action="store_true", help="published sizes, random weights (noise)")
    p.add_argument("--device", help="cuda, cpu (default: cuda if present)")
    p.add_argument("--dtype")
    p.add_argument("--data", help="a JSONL file or folder of questions (default: demos/quality/questions.jsonl)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--max-new-tokens", type=int, help="reply length limit (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--asr", default="auto", choices=["auto", "whisper", "pocketsphinx"])
    p.add_argument("--whisper", metavar="REPO_OR_DIR", help="Whisper weights: a local folder or a cached repo id")
    p.add_argument("--no-mos", action="store_true", help="skip DNSMOS (the report says so)")
    p.add_argument("--no-duplex", action="store_true", help="skip the scripted duplex conversation")
    p.add_argument("--duplex-script", default="2,3,2,2", metavar="SPEAK,PAUSE,BARGE,TAIL",
                   help="seconds of the duplex script's four parts (default 2,3,2,2)")
    p.add_argument("--out", type=Path, help=f"report folder (default {RESULTS}/<date>_<time>)")
    chosen = p.parse_known_args(argv)[0].model
    if len(chosen) == 1:  # one model: its published parts may be given (--checkpoint DIR, ...)
        add_component_flags(p.add_argument_group("weights"), zoo.card(chosen[0]))
    return p.parse_args(argv)


def answer(model, question: dict, options) -> dict:
    """One reply, timed: TTFA (respond() called -> first audio chunk) and RTF (whole reply's
    compute time / its audio duration), as inference.py measures them."""
    started = time.perf_counter()
    first, audio, text = None, [], []
    for chunk in model.respond(question["audio"], options=options):
        if chunk.audio.size and first is None:
            first = time.perf_counter() - started
        audio.append(chunk.audio)
        text.append(chunk.text)
    elapsed = time.perf_counter() - started
    wave = np.concatenate(audio).astype(np.float32) if audio else np.zeros(0, np.float32)
    seconds = wave.size / model.card.output_sample_rate
    return {"audio": wave, "text": "".join(text).strip(), "audio_s": round(seconds, 3),
            "ttfa_ms": None if first is None else round(first * 1000, 1),
            "rtf": round(elapsed / seconds, 3) if seconds else None}


def score_question(model, question: dict, options, asr, mos, folder: Path) -> dict:
    reply = answer(model, question, options)
    rate = model.card.output_sample_rate
    path = folder / f"{question['id']}.wav"
    sf.write(path, reply.pop("audio"), rate, subtype="FLOAT")  # FLOAT: exactly what was scored
    audio, _ = sf.read(path, dtype="float32")
    transcript = asr.transcribe(audio, rate)
    has_text = model.card.text_output
    # the answer that is scored: the reply's text, or for audio-only models what the ASR heard
    said = reply["text"] if has_text else transcript
    return {"id": question["id"], "task": question["task"], "prompt": question["prompt"],
            "reference": question["reference"], **reply, "reply_wav": str(path), "transcript": transcript,
            "consistency_wer": wer(reply["text"], transcript) if has_text else None,
            "mos": mos.score(audio, rate) if mos else None,
            "answer_source": "text" if has_text else "transcript",
            "score": answer_score(question["task"], said, question["reference"], question["choices"])}


def summary(rows: list[dict]) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return round(statistics.fmean(values), 3) if values else None

    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    out = {"questions": len(rows), "ttfa_ms_median": median(r["ttfa_ms"] for r in rows),
           "rtf_median": median(r["rtf"] for r in rows),
           "consistency_wer_mean": mean(r["consistency_wer"] for r in rows),
           "mos_ovrl_mean": mean((r["mos"] or {}).get("ovrl") for r in rows)}
    for metric in sorted({r["score"]["metric"] for r in rows if r["score"]["metric"]}):
        out[metric] = mean(r["score"]["value"] for r in rows if r["score"]["metric"] == metric)
    return out


def run_model(name: str, args, questions, asr, mos, out: Path) -> dict:
    card = zoo.card(name)
    weights = "full" if args.random_full else "tiny" if args.tiny else None
    components = component_values(args, card) if len(args.model) == 1 else {}
    model = zoo.load(name, device=args.device, dtype=args.dtype, random_weights=weights, seed=args.seed, **components)
    values = {"seed": args.seed}
    if args.max_new_tokens:
        values["max_new_tokens"] = args.max_new_tokens
    options = model.options(values)
    folder = out / "replies" / name
    folder.mkdir(parents=True, exist_ok=True)
    rows, errors = [], []
    for q in questions:
        try:
            rows.append(score_question(model, q, options, asr, mos, folder))
        except zoo.ZooError as e:  # e.g. audio over card.max_input_seconds: that question only
            errors.append({"id": q["id"], "error": f"{type(e).__name__}: {e}"})
            print(f"[{name}] {q['id']}: {errors[-1]['error']}", file=sys.stderr)
            continue
        report.progress(name, rows[-1])
    result = {"model": name, "random_weights": weights, "notice": noise_notice(model),
              "checkpoint": f"seeded random weights ({weights}, seed {args.seed})" if weights
              else {c: components.get(c, repo) for c, repo in card.components.items()},
              "device": str(pick_device(args.device)), "dtype": args.dtype or "the model's default",
              "options": {"max_new_tokens": options.max_new_tokens, "seed": options.seed},
              "text_output": card.text_output, "questions": rows, "errors": errors, "summary": summary(rows)}
    if card.duplex and not args.no_duplex:
        seconds = [float(s) for s in args.duplex_script.split(",")]
        script = Script(questions[0]["audio"], questions[min(1, len(questions) - 1)]["audio"], *seconds)
        latencies, user, reply = converse(model, script, {"seed": args.seed})
        wav = out / "replies" / name / "duplex_user_left_model_right.wav"
        sf.write(wav, np.stack([user, reply], axis=1), model.card.input_sample_rate, subtype="FLOAT")
        result["duplex"] = {**latencies, "wav": str(wav), "script": vars(script)}
    return result


ASR_CHECK_MAX = 20  # enough to see how the ASR copes with this data; a big data set would double the ASR time


def asr_check(asr, questions: list[dict]) -> dict:
    """The ASR on (up to ASR_CHECK_MAX of) the questions themselves, whose prompts are what was
    said: how far its transcripts of the replies can be trusted on this data."""
    rows = []
    for q in [q for q in questions if q["prompt"]][:ASR_CHECK_MAX]:
        audio, rate = sf.read(q["audio"], dtype="float32", always_2d=True)
        heard = asr.transcribe(audio.mean(axis=1), rate)
        rows.append({"id": q["id"], "said": q["prompt"], "heard": heard, "wer": wer(q["prompt"], heard)})
    values = [r["wer"] for r in rows if r["wer"] is not None]
    return {"questions": rows, "wer_mean": round(statistics.fmean(values), 3) if values else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    questions = load_questions(args.data)[: args.limit]
    if not questions:
        print("no questions", file=sys.stderr)
        return 2
    stamp = datetime.now()
    out = args.out or RESULTS / stamp.strftime("%Y-%m-%d_%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    asr = load_asr(args.asr, args.whisper, args.device)
    mos = None if args.no_mos else Mos()
    result = {"date": stamp.isoformat(timespec="seconds"), "machine": report.machine(), "torch": torch.__version__,
              "data": str(Path(args.data).resolve()) if args.data else "bundled (demos/quality/questions.jsonl)",
              "asr": asr.name, "asr_check": asr_check(asr, questions),
              "mos": ("skipped (--no-mos)" if mos is None else mos.name if mos.available else mos.reason),
              "models": []}
    for name in args.model:
        result["models"].append(run_model(name, args, questions, asr, mos if mos and mos.available else None, out))
    paths = report.write(result, out)
    report.print_table(result)
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
