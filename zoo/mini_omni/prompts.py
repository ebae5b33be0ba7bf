"""Input assembly for Mini-Omni's tasks: 8 parallel streams (7 audio layers + text), as the
reference's get_input_ids_* functions build them. Every stream has the same length."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokens import (
    ANSWER_A,
    ANSWER_T,
    ASR,
    AUDIO_LAYERS,
    EOA,
    EOT,
    INPUT_A,
    INPUT_T,
    PAD_A,
    PAD_T,
    layershift,
)


@dataclass(frozen=True)
class Task:
    """One of the reference's tasks. ``rows`` > 1 is the batch trick: row 0 speaks, row 1 thinks
    in text and its text drives row 0."""

    name: str
    audio_input: bool
    speaks: bool
    rows: int = 1


TASKS = {
    task.name: task
    for task in (
        Task("A1A2", audio_input=True, speaks=True),
        Task("A1T2", audio_input=True, speaks=False),
        Task("ASR", audio_input=True, speaks=False),
        Task("T1A2", audio_input=False, speaks=True),
        Task("T1T2", audio_input=False, speaks=False),
        Task("A1A2+A1T2", audio_input=True, speaks=True, rows=2),
    )
}


def _audio_layers(local_ids: list[int]) -> list[list[int]]:
    return [[layershift(i, layer) for i in local_ids] for layer in range(AUDIO_LAYERS)]


def audio_question(task: Task, feature_frames: int) -> torch.Tensor:
    """(rows, 8, T_a + 3): ``_input, pad * T_a, _eo{a,t}, <task token>``; whisper features go to
    positions 1..T_a of the audio streams."""
    pads = [PAD_A] * feature_frames
    text = [INPUT_T] + [PAD_T] * feature_frames + [EOT, ASR if task.name == "ASR" else ANSWER_T]
    rows = []
    for row in range(task.rows):
        answer_a = ANSWER_A if task.speaks and row == 0 else PAD_A
        rows.append(_audio_layers([INPUT_A, *pads, EOA, answer_a]) + [text])
    return torch.tensor(rows, dtype=torch.long)


def text_question(task: Task, text_ids: list[int]) -> torch.Tensor:
    """(1, 8, n + 3): text ``_input_t, ids, _eot, _answer_t``; audio streams padded, ending in
    ``_answer_a`` when the task speaks."""
    n = len(text_ids)
    audio = [PAD_A] * (n + 2) + [ANSWER_A if task.speaks else PAD_A]
    text = [INPUT_T, *text_ids, EOT, ANSWER_T]
    return torch.tensor([_audio_layers(audio) + [text]], dtype=torch.long)
