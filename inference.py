"""Answer the preset spoken questions in demos/samples/ (or your own files / a typed question):
print each question, the model's text reply, audio seconds, time to first audio and real-time
factor, and write the replies as wav files plus summary.json.

    python inference.py                      # Mini-Omni from the Hugging Face hub
    python inference.py --tiny               # random tiny weights: a smoke test, output is noise
    python inference.py --input my.wav --checkpoint ./mini-omni --codec ./snac_24khz
    python inference.py --model mini-omni2   # spoken questions about the preset images in demos/images/
    python inference.py --model mini-omni2 --input question.wav --image photo.jpg

Each run writes output/<model>/<timestamp>/: the replies (NN.wav), summary.json and inference.log
(what happened, with the traceback of any failure). Exit status: 0 when every question was
answered, 1 when some failed, 2 when nothing could start (bad flags, no weights, a missing file).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

import zoo
from zoo.cli import add_model_flags, load_model, noise_notice

SAMPLES = Path(__file__).resolve().parent / "demos" / "samples"
IMAGES = Path(__file__).resolve().parent / "demos" / "images"  # presets.json: image + spoken question
log = logging.getLogger("omni-zoo.inference")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", type=Path, metavar="FILE", help="your own audio files")
    parser.add_argument("--text", help="a typed question instead of audio")
    parser.add_argument("--image", type=Path, help="an image the --input questions are about (models that take images)")
    parser.add_argument("--output-dir", type=Path, default=Path("output"))
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int, default=0)
    add_model_flags(parser, argv)
    return parser.parse_args(argv)


def questions(args, card: zoo.ModelCard) -> list[dict]:
    if args.text:
        return [{"name": "text", "transcript": args.text, "text": args.text}]
    if args.input:
        image = {"image": args.image} if args.image else {}
        return [{"name": p.stem, "transcript": f"({p.name})", "path": p, **image} for p in args.input]
    if card.image_input:  # the preset questions about the preset images
        presets = json.loads((IMAGES / "presets.json").read_text())
        return [{"name": Path(p["audio"]).stem, "transcript": f"{p['question']} [{p['image']}]",
                 "path": IMAGES / p["audio"], "image": IMAGES / p["image"]} for p in presets]
    transcripts = json.loads((SAMPLES / "transcripts.json").read_text())
    return [{"name": Path(f).stem, "transcript": t, "path": SAMPLES / f} for f, t in sorted(transcripts.items())]


def answer(model, question: dict, options) -> dict:
    started = time.perf_counter()
    if "text" in question:
        stream = model.respond_text(question["text"], options)
    else:
        image = question.get("image")
        stream = model.respond(str(question["path"]), options=options, image=None if image is None else str(image))
    first_audio, audio, text = None, [], []
    for chunk in stream:
        if chunk.audio.size and first_audio is None:
            first_audio = time.perf_counter() - started
        audio.append(chunk.audio)
        text.append(chunk.text)
    elapsed = time.perf_counter() - started
    wave = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    seconds = wave.size / model.card.output_sample_rate
    return {
        "question": question["transcript"],
        "reply": "".join(text).strip(),
        "audio_s": round(seconds, 3),
        "ttfa_ms": None if first_audio is None else round(first_audio * 1000, 1),
        "compute_s": round(elapsed, 3),
        "rtf": round(elapsed / seconds, 3) if seconds else None,
        "audio": wave,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    card = zoo.card(args.model)
    missing = [problem for path in args.input or [] if (problem := input_problem(path))]
    if missing:  # before minutes of loading: which file and why
        for problem in missing:
            print(f"error: --input {problem}", file=sys.stderr)
        return 2
    run_dir = args.output_dir / args.model / datetime.now().strftime("%Y%m%d_%H%M%S")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create the output folder {run_dir}: {err.strerror or err}", file=sys.stderr)
        return 2
    log_path = run_dir / "inference.log"
    start_log(log_path)
    log.info("inference.py %s", " ".join(sys.argv[1:] if argv is None else argv))
    try:
        model = load_model(args, seed=args.seed)
        notice = noise_notice(model)
        if notice:
            print(f"!! {notice} !!", file=sys.stderr)
        overrides = {"seed": args.seed}
        if args.max_new_tokens is not None:
            overrides["max_new_tokens"] = args.max_new_tokens
        if args.temperature is not None:
            overrides["temperature"] = args.temperature
        options = model.options(overrides)
        if args.image and not card.image_input:
            raise zoo.UnsupportedError(f"{card.name} does not take images (--image)")
        todo = questions(args, card)
    except (zoo.ZooError, OSError) as err:  # expected: no weights, no GPU, bad option: its message says it all
        log.error("%s", err, exc_info=not isinstance(err, zoo.ZooError))  # an OSError's origin: in the log
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug or a broken install: one line here, the traceback in the log
        log.exception("loading %s failed", args.model)
        print(f"error: loading {args.model} failed ({type(err).__name__}: {err}); the traceback is in {log_path}",
              file=sys.stderr)
        return 2

    results = []
    for i, question in enumerate(tqdm(todo, desc=f"{args.model} answering", unit="question")):
        try:
            result = answer(model, question, options)
        except zoo.ZooError as err:  # e.g. an undecodable --input file: report it, go on
            log.error("question %d (%s): %s", i, question["transcript"], err)
            results.append({"question": question["transcript"], "error": str(err)})
            tqdm.write(f"error on {question['transcript']}: {err}")
            continue
        except Exception as err:  # a failure in the model itself: report it with where the details are, go on
            log.exception("question %d (%s) failed", i, question["transcript"])
            message = f"{args.model} failed ({type(err).__name__}: {err}); traceback in {log_path}"
            results.append({"question": question["transcript"], "error": message})
            tqdm.write(f"error on {question['transcript']}: {message}")
            continue
        wav_path = run_dir / f"{i:02d}.wav"
        sf.write(wav_path, result.pop("audio"), card.output_sample_rate, subtype="PCM_16")
        log.info("question %d (%s): %.2f s of audio, TTFA %s ms", i, question["transcript"], result["audio_s"],
                 result["ttfa_ms"])
        results.append({**result, "wav": wav_path.name})

    summary = {"model": args.model, "random_weights": model.random_weights, "device": str(args.device or "auto"),
               "dtype": args.dtype or "float32", "results": results}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print_table(results)
    if notice:
        print(f"!! {notice} !!")
    failed = sum("error" in r for r in results)
    print(f"answered {len(results) - failed} of {len(results)} questions; replies, summary.json and inference.log "
          f"in {run_dir}")
    if failed:
        print(f"error: {failed} of {len(results)} questions failed (see the table above; details in {log_path})",
              file=sys.stderr)
    return 1 if failed else 0


def input_problem(path: Path) -> str | None:
    """Why ``path`` cannot be an input file (None when it can be read)."""
    if not path.exists():
        return f"{path}: no such file"
    if path.is_dir():
        return f"{path}: is a folder, not an audio file"
    if not os.access(path, os.R_OK):
        return f"{path}: not readable (permission denied)"
    return None


def start_log(path: Path) -> None:
    """Everything about this run, tracebacks included, goes to ``path``; the terminal gets one line each."""
    for old in list(log.handlers):  # an earlier run in this process (tests) logs to its own folder
        log.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def print_table(results: list[dict]) -> None:
    header = f"{'#':>2}  {'question':32}  {'audio s':>7}  {'TTFA ms':>8}  {'RTF':>6}  reply"
    print(header)
    print("-" * len(header))
    for i, r in enumerate(results):
        if "error" in r:
            print(f"{i:>2}  {r['question'][:32]:32}  error: {r['error']}")
            continue
        ttfa = "-" if r["ttfa_ms"] is None else f"{r['ttfa_ms']:.0f}"
        rtf = "-" if r["rtf"] is None else f"{r['rtf']:.2f}"
        print(f"{i:>2}  {r['question'][:32]:32}  {r['audio_s']:7.2f}  {ttfa:>8}  {rtf:>6}  {r['reply'][:80]}")


if __name__ == "__main__":
    sys.exit(main())
