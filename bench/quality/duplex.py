"""Duplex behaviour, in the spirit of Full-Duplex-Bench: a scripted conversation fed to
``model.duplex()`` frame by frame (the user speaks, pauses, then speaks over the model), and two
latencies read from the energy of the model's output:

- start latency: from the end of the user's first utterance to the model's first speech onset at
  or after it (0 when the model is already speaking then: ``overlap_at_end`` says so);
- barge-in latency: from the moment the user starts speaking over the model to the start of the
  model's first silence after it (None when the model was silent at that moment, or never
  stopped before the script ended: ``barge_in_note`` says which).

Speech detection is an energy gate on 50 ms windows: "active" when a window's RMS is above
``threshold_db`` dBFS (-35 by default), an onset needs ``min_on_s`` (0.2 s) of active windows in
a row, a stop ``min_off_s`` (0.3 s) of quiet ones, so breaths and short gaps between words do not
count. Limits: latencies are quantised to 50 ms and include the hangover choice; an energy gate
cannot tell speech from noise or a loud breath, so a model that answers with noise (random
weights) "speaks" all the time; the model's frame k is placed on the timeline at the end of input
frame k (it was computed after hearing that frame), so compute time is not included: this is the
model's behaviour, not the machine's speed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import soundfile as sf
import soxr

WINDOW_S = 0.05


@dataclass
class Gate:
    threshold_db: float = -35.0
    min_on_s: float = 0.2
    min_off_s: float = 0.3


def activity(audio: np.ndarray, rate: int, gate: Gate) -> np.ndarray:
    """One bool per 50 ms window: RMS above the gate's threshold (dBFS, full scale = 1.0)."""
    n = int(round(WINDOW_S * rate))
    windows = audio[: audio.size // n * n].reshape(-1, n).astype(np.float64)
    rms = np.sqrt(np.mean(windows**2, axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-10)) > gate.threshold_db


def first_run(active: np.ndarray, start: int, value: bool, length: int) -> int | None:
    """The first index >= start where ``length`` windows in a row equal ``value``; None if none."""
    run = 0
    for i in range(max(start, 0), active.size):
        run = run + 1 if active[i] == value else 0
        if run == length:
            return i - length + 1
    return None


def latencies(model_audio: np.ndarray, rate: int, user_end_s: float, barge_s: float, gate: Gate | None = None) -> dict:
    """Start and barge-in latencies (seconds) of ``model_audio`` (the model's output on the
    conversation's timeline, t=0 at its first sample) for a user who stopped speaking at
    ``user_end_s`` and spoke over the model from ``barge_s``."""
    gate = gate or Gate()
    active = activity(model_audio, rate, gate)
    on, off = max(1, round(gate.min_on_s / WINDOW_S)), max(1, round(gate.min_off_s / WINDOW_S))
    end_w, barge_w = int(round(user_end_s / WINDOW_S)), int(round(barge_s / WINDOW_S))

    def speaking_at(w: int) -> bool:  # active for at least min_on up to window w
        return w >= on and bool(active[w - on:w].all())

    overlap = speaking_at(end_w)
    onset = end_w if overlap else first_run(active, end_w, True, on)
    start = None if onset is None or onset >= barge_w else round((onset - end_w) * WINDOW_S, 3)
    start_note = "the model did not start before the user spoke again" if start is None else None
    barge, note = None, None
    if not speaking_at(barge_w):
        note = "the model was not speaking when the user barged in"
    else:
        stop = first_run(active, barge_w, False, off)
        if stop is None:
            note = f"the model did not stop within {(active.size - barge_w) * WINDOW_S:.2f} s of the barge-in"
        else:
            barge = round((stop - barge_w) * WINDOW_S, 3)
    return {"start_latency_s": start, "start_note": start_note, "overlap_at_end": overlap, "barge_in_latency_s": barge,
            "barge_in_note": note, "model_active_fraction": round(float(active.mean()), 3) if active.size else None,
            "gate": asdict(gate), "window_s": WINDOW_S}


@dataclass
class Script:
    """The user's side: speech, a pause for the model to answer, speech over the model, a tail
    for the model to stop in. Seconds; each piece is cut or padded to whole frames."""

    first: str  # audio file of the first utterance
    second: str  # audio file spoken over the model
    first_s: float = 2.0
    pause_s: float = 3.0
    second_s: float = 2.0
    tail_s: float = 2.0


def user_track(script: Script, rate: int, frame: int) -> tuple[np.ndarray, float, float]:
    """The user's signal at ``rate``, and when their first utterance ends and the barge-in starts."""
    def piece(path: str | None, seconds: float) -> np.ndarray:
        n = max(1, round(seconds * rate / frame)) * frame
        if path is None:
            return np.zeros(n, np.float32)
        audio, r = sf.read(path, dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
        if r != rate:
            audio = soxr.resample(audio, r, rate).astype(np.float32)
        return np.pad(audio[:n], (0, max(0, n - audio.size)))

    parts = [piece(script.first, script.first_s), piece(None, script.pause_s),
             piece(script.second, script.second_s), piece(None, script.tail_s)]
    # the user's first utterance ends where its speech does (the file may end in silence)
    speech = np.flatnonzero(np.abs(parts[0]) > 10 ** (Gate().threshold_db / 20))
    user_end = (speech[-1] + 1) / rate if speech.size else parts[0].size / rate
    barge = (parts[0].size + parts[1].size) / rate
    return np.concatenate(parts), user_end, barge


def converse(model, script: Script, options=None, gate: Gate | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Run the scripted conversation through ``model.duplex()``; returns the latencies, the
    user's track and the model's output, both at the card's input rate, aligned in time."""
    rate, frame = model.card.input_sample_rate, model.card.frame_samples
    user, user_end, barge = user_track(script, rate, frame)
    out_rate = model.card.output_sample_rate
    outputs = []
    with model.duplex(options) as session:
        for k in range(user.size // frame):
            outputs.append(session.step(user[k * frame:(k + 1) * frame]).audio)
    reply = np.concatenate(outputs).astype(np.float32)
    if out_rate != rate:
        reply = soxr.resample(reply, out_rate, rate).astype(np.float32)
    # frame k of the output is computed after input frame k: it plays during input frame k + 1
    reply = np.concatenate([np.zeros(frame, np.float32), reply])[: user.size]
    result = latencies(reply, rate, user_end, barge, gate)
    result.update({"user_end_s": round(user_end, 3), "barge_in_at_s": round(barge, 3),
                   "conversation_s": round(user.size / rate, 3), "frames": user.size // frame})
    return result, user, reply
