"""Mini-Omni2's image question: the reference's get_input_ids_ImageQA_ATBatch. Both rows are

    audio streams: _image, _pad_a x 50, _eoimage, _input_a, _pad_a x T_a, _eoa, <last>
    text stream:   _pad_t x (54 + T_a), _answer_t            (no _input_t / _eot, unlike audio-only)

with <last> = _answer_a in row 0 (it speaks) and _pad_a in row 1 (it thinks in text). CLIP
features go to positions 1..50. The reference's concat_feat writes the Whisper features from
position 52, the ``_input_a`` slot, not 53: ``_input_a`` is overwritten by the first frame and the
last ``_pad_a`` keeps its own embedding. That off-by-one is what the published model saw, so it is
reproduced here (AUDIO_START)."""
from __future__ import annotations

import torch

from ..mini_omni.prompts import Task
from ..mini_omni.tokens import (
    ANSWER_A,
    ANSWER_T,
    AUDIO_LAYERS,
    AUDIO_VOCAB,
    EOA,
    INPUT_A,
    PAD_A,
    PAD_T,
    layershift,
)

IMAGE = AUDIO_VOCAB + 5  # _image (local audio id)
EOIMAGE = AUDIO_VOCAB + 6  # _eoimage
IMAGE_TOKENS = 50  # CLIP ViT-B/32 at 224 px: CLS + 7 x 7 patches; the layout is fixed to it
AUDIO_START = 1 + IMAGE_TOKENS + 1  # 52, see the module docstring

# the reference's task pair ["ImageQA_A", "ImageQA_AT"] as one batch-trick task
IMAGE_TASK = Task("ImageQA_A+ImageQA_AT", audio_input=True, speaks=True, rows=2)


def image_audio_question(feature_frames: int) -> torch.Tensor:
    """(2, 8, 55 + T_a) absolute ids of the image + audio question (the batch trick's two rows)."""
    head = [IMAGE] + [PAD_A] * IMAGE_TOKENS + [EOIMAGE, INPUT_A] + [PAD_A] * feature_frames + [EOA]
    text = [PAD_T] * (len(head)) + [ANSWER_T]
    rows = []
    for last in (ANSWER_A, PAD_A):
        audio = [[layershift(i, layer) for i in [*head, last]] for layer in range(AUDIO_LAYERS)]
        rows.append(audio + [text])
    return torch.tensor(rows, dtype=torch.long)
