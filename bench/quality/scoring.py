"""Texts -> numbers: word error rate and the answer scores (documented in README, "Quality").

Every comparison first normalises both texts the same way (lower case, punctuation dropped,
numbers 0-20 spelled out, whitespace collapsed), so "Seven." and "7" match and a WER counts words,
not formatting."""
from __future__ import annotations

import re

import jiwer

_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen twenty").split()


def normalize(text: str) -> str:
    text = re.sub(r"[^\w\s']", " ", text.lower()).replace("_", " ")
    words = [_NUMBERS[int(w)] if w.isdigit() and int(w) < len(_NUMBERS) else w for w in text.split()]
    return " ".join(words)


def wer(reference: str, hypothesis: str) -> float | None:
    """Word error rate of ``hypothesis`` against ``reference`` after normalize(); can exceed 1
    (insertions). None when the reference has no words (WER is undefined then)."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return None
    return float(jiwer.wer(ref, hyp)) if hyp else 1.0


def contains(haystack: str, needle: str) -> bool:
    """Whether the normalised ``needle`` occurs in the normalised ``haystack`` as whole words."""
    n, h = normalize(needle), normalize(haystack)
    return bool(n) and f" {n} " in f" {h} "


def mcq_choice(answer: str, choices: dict[str, str]) -> str | None:
    """The option an answer picks: its letter said alone ("B.") or introduced ("option b", "the
    answer is b", "letter b"; a bare letter inside a sentence is not enough: "a" is also a word),
    or its option's text ("an apple"). None when it names no option or more than one (no credit
    for hedging)."""
    text = normalize(answer)
    picked = set()
    for letter, option in choices.items():
        x = letter.lower()
        if text == x or re.search(rf"\b(option|answer|answer is|letter) {x}\b", text) or contains(text, option):
            picked.add(letter)
    return picked.pop() if len(picked) == 1 else None


def answer_score(task: str, answer: str, reference: str | None, choices: dict[str, str] | None = None) -> dict:
    """The score of one answer, by task: ``keyword`` 1/0 (the reference said somewhere),
    ``mcq`` 1/0 (exactly the reference option picked), ``repeat`` WER against the reference
    (lower is better), ``open`` none (no reference: only consistency, MOS and timing apply)."""
    if task == "open" or reference is None:
        return {"metric": None, "value": None}
    if task == "keyword":
        return {"metric": "keyword_match", "value": float(contains(answer, reference))}
    if task == "mcq":
        picked = mcq_choice(answer, choices or {})
        return {"metric": "mcq_accuracy", "value": float(picked == reference), "picked": picked}
    if task == "repeat":
        return {"metric": "repeat_wer", "value": wer(reference, answer)}
    raise ValueError(f"unknown task {task!r}: open, keyword, mcq or repeat")
