"""The spoken questions: a JSONL file (or a folder holding one) in the layout of VoiceBench's
subsets, one question per line:

    {"id": "q02", "audio": "q02.wav", "prompt": "What is the capital of France?",
     "task": "keyword", "reference": "Paris"}

``audio`` is a path relative to the JSONL file (or {"path": ...}); ``prompt`` the question's text
(optional: it lets the report check the ASR on the questions themselves); ``task`` one of open,
keyword, mcq (with ``choices`` {"A": text, ...} and the letter as ``reference``) or repeat
(default: open without a reference, keyword with one). A folder without a JSONL but with a
``transcripts.json`` ({file: text}, the layout of demos/samples/) gives open questions."""
from __future__ import annotations

import json
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[2] / "demos" / "quality" / "questions.jsonl"
TASKS = ("open", "keyword", "mcq", "repeat")


def load_questions(source: str | Path | None = None) -> list[dict]:
    path = Path(source) if source else BUNDLED
    if path.is_dir():
        jsonl = sorted(path.glob("*.jsonl"))
        if len(jsonl) == 1:
            path = jsonl[0]
        elif (path / "transcripts.json").exists():
            texts = json.loads((path / "transcripts.json").read_text())
            return [{"id": Path(f).stem, "audio": str(path / f), "prompt": t, "task": "open", "reference": None,
                     "choices": None} for f, t in sorted(texts.items())]
        else:
            raise ValueError(f"{path}: expected one .jsonl file (found {len(jsonl)}) or a transcripts.json")
    questions = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        audio = row["audio"]["path"] if isinstance(row.get("audio"), dict) else row.get("audio")
        if not audio:
            raise ValueError(f"{path}:{n}: no audio file")
        reference = row.get("reference")
        task = row.get("task") or ("keyword" if reference else "open")
        if task not in TASKS:
            raise ValueError(f"{path}:{n}: task {task!r} is not one of {TASKS}")
        if task == "mcq" and not row.get("choices"):
            raise ValueError(f"{path}:{n}: an mcq question needs choices")
        questions.append({"id": str(row.get("id", n)), "audio": str(path.parent / audio), "prompt": row.get("prompt"),
                          "task": task, "reference": reference, "choices": row.get("choices")})
    return questions
