"""Regenerate the bundled spoken questions for ``python -m bench.quality`` (no downloaded data).

    python demos/quality/make_data.py

Each question is spoken by espeak-ng (voice en-us+f2 at 150 words per minute: of the espeak-ng
voices tried, the one the offline fallback ASR, pocketsphinx, transcribes best) and written as
16 kHz mono PCM16 next to ``questions.jsonl``, one line per question in the layout of
VoiceBench's subsets: an audio file, the question's text and, where there is one, a reference
answer with the task that says how it is scored (bench/quality/scoring.py). The tests transcribe
q05.wav, a known sentence, to prove the ASR really runs. espeak-ng versions differ
slightly, so regenerated files may not be byte-identical to the committed ones.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

HERE = Path(__file__).resolve().parent
VOICE, WPM, RATE = "en-us+f2", 150, 16000

# task: "open" (no reference), "keyword" (the reference must be said), "mcq" (the reference
# letter, or its option's text, must be said), "repeat" (WER against the reference)
QUESTIONS = [
    {"id": "q01", "task": "open", "prompt": "Can you tell me a joke?"},
    {"id": "q02", "task": "keyword", "prompt": "What is the capital of France?", "reference": "Paris"},
    {"id": "q03", "task": "mcq", "prompt": "Which of these is a fruit? A, a chair. B, an apple. C, a car.",
     "choices": {"A": "a chair", "B": "an apple", "C": "a car"}, "reference": "B"},
    {"id": "q04", "task": "repeat", "prompt": "Please repeat after me: the weather is nice today.",
     "reference": "the weather is nice today"},
    {"id": "q05", "task": "keyword", "prompt": "How many days are there in a week?", "reference": "seven"},
]


def speak(text: str, path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", VOICE, "-s", str(WPM), "-w", str(raw), text], check=True)
        audio, rate = sf.read(raw, dtype="float32")
    sf.write(path, np.clip(soxr.resample(audio, rate, RATE), -1, 1), RATE, subtype="PCM_16")


def main() -> None:
    lines = []
    for q in QUESTIONS:
        speak(q["prompt"], HERE / f"{q['id']}.wav")
        lines.append(json.dumps({"audio": f"{q['id']}.wav", **q}))
    (HERE / "questions.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
