"""GLM-4-Voice speech tokenizer: the published key set at full size, the 12.5 Hz token rate, the
block-causal mask, 30 s segments, and deterministic ids on a tiny checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SAMPLES

from zoo.glm4_voice.random_weights import write_tiny_tokenizer
from zoo.glm4_voice.speech_tokenizer import SpeechTokenizer, SpeechTokenizerEncoder, TokenizerConfig, block_causal_mask

KEYS = {f["file"]: f for f in json.loads((Path(__file__).parent / "data/keys/glm-4-voice.json").read_text())["files"]}


def test_full_size_keys_and_shapes_equal_the_published_list():
    with torch.device("meta"):
        encoder = SpeechTokenizerEncoder(TokenizerConfig())
    ours = {k: list(v.shape) for k, v in encoder.state_dict().items()}
    assert ours == KEYS["model.safetensors"]["tensors"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = write_tiny_tokenizer(tmp_path_factory.mktemp("glm_tokenizer"))
    return SpeechTokenizer.load(folder, dtype=torch.float64)


@pytest.mark.parametrize("seconds", [0.05, 1.0, 2.0, 3.3, 29.99, 30.0, 31.0, 61.5])
def test_ids_at_12_5_hz(tokenizer, seconds):
    samples = int(seconds * 16000)
    audio = 0.1 * np.random.default_rng(0).standard_normal(samples).astype(np.float32)
    ids = tokenizer(audio)
    segments = [min(30 * 16000, samples - s) for s in range(0, samples, 30 * 16000)]
    assert len(ids) == sum(-(-n // 1280) for n in segments)  # ceil(samples / 1280) per 30 s segment
    assert all(0 <= i < 16384 for i in ids)


def test_ids_are_deterministic_and_depend_on_the_audio(tokenizer):
    speech, _ = sf.read(SAMPLES / "01.wav", dtype="float32")
    other, _ = sf.read(SAMPLES / "02.wav", dtype="float32")
    assert tokenizer(speech) == tokenizer(speech)
    assert tokenizer(speech) != tokenizer(other[: len(speech)])


def test_block_causal_mask():
    valid = torch.tensor([[True] * 5 + [False]])
    mask = block_causal_mask(valid, block=2)[0, 0]
    # frame 2 sees 0..3 (earlier frames and its own block), never the padding frame 5
    assert mask[2].tolist() == [True, True, True, True, False, False]
    assert mask[0].tolist() == [True, True, False, False, False, False]
    assert not mask[:, 5].any()


def test_a_frame_does_not_see_later_blocks(tokenizer):
    """Block-causal: changing audio after the first 4 s block leaves that block's ids unchanged."""
    rng = np.random.default_rng(1)
    audio = 0.1 * rng.standard_normal(16000 * 8).astype(np.float32)
    changed = audio.copy()
    changed[16000 * 5 :] = 0.1 * rng.standard_normal(16000 * 3)
    # the log-mel normalises by the segment's maximum: keep it equal in both
    changed[-10:] = audio[-10:] = 0.9
    first_block = 50  # 200 frames at 50 Hz = 50 ids
    a, b = tokenizer(audio), tokenizer(changed)
    assert a[:first_block] == b[:first_block] and a != b


REFERENCE = json.loads((Path(__file__).parent / "data" / "glm_tokenizer_reference_ids.json").read_text())


def reference_audio(name: str) -> np.ndarray:
    if name == "02":
        return sf.read(SAMPLES / "02.wav", dtype="float32")[0]
    parts = [sf.read(SAMPLES / f"0{i}.wav", dtype="int16")[0] for i in range(1, 6)]
    return (np.concatenate(parts * 20)[: 35 * 16000] / 32768.0).astype(np.float32)


@pytest.mark.parametrize("name", sorted(REFERENCE["ids"]))
def test_ids_equal_the_reference_code(name, tmp_path):
    """The ids THUDM/GLM-4-Voice's own tokenizer code gives on this tiny checkpoint (see 'about')."""
    tokenizer = SpeechTokenizer.load(write_tiny_tokenizer(tmp_path / "tok"), dtype=torch.float64)
    assert tokenizer(reference_audio(name)) == REFERENCE["ids"][name]
