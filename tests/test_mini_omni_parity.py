"""Greedy tokens equal the reference code's on the same weights (float64, CPU). The expected ids in
tests/data/reference_tiny_tokens.json were produced by gpt-omni/mini-omni's own generate_* functions
on the tiny checkpoint this repository writes (see 'about' in that file)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SAMPLES

import zoo

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_tiny_tokens.json").read_text())
AUDIO_TASKS = {"A1A2", "A1T2", "ASR", "A1A2+A1T2"}


@pytest.fixture(scope="module")
def models(tiny_folders, tmp_path_factory):
    """seed0: the tiny checkpoint as written. seed0_stops: untied head with the given rows."""
    stops = tmp_path_factory.mktemp("stops") / "checkpoint"
    shutil.copytree(tiny_folders.checkpoint, stops)
    state = torch.load(stops / "lit_model.pth", weights_only=True)
    for row, values in REFERENCE["variants"]["seed0_stops"]["lm_head_rows"].items():
        state["lm_head.weight"][int(row)] = torch.tensor(values)
    torch.save(state, stops / "lit_model.pth")
    config = yaml.safe_load((stops / "model_config.yaml").read_text())
    (stops / "model_config.yaml").write_text(yaml.safe_dump({**config, "tie_word_embeddings": False}))
    def load(ckpt):
        return zoo.load("mini-omni", device="cpu", dtype="float64", checkpoint=ckpt, codec=tiny_folders.codec)

    return {"seed0": load(tiny_folders.checkpoint), "seed0_stops": load(stops)}


CASES = [(variant, task) for variant in REFERENCE["variants"] for task in REFERENCE["variants"][variant]["tasks"]]


@pytest.mark.parametrize("variant, task", CASES)
def test_greedy_tokens_and_text_equal_the_reference(models, variant, task):
    model, expected = models[variant], REFERENCE["variants"][variant]["tasks"][task]
    inputs = {"audio": str(SAMPLES / "01.wav")} if task in AUDIO_TASKS else {"text": REFERENCE["text_question"]}
    session, reply = model.start_session(task, options={"max_new_tokens": 10_000}, **inputs)
    # the reference's max_returned_tokens counts the prompt too
    session.max_outputs = REFERENCE["variants"][variant]["max_returned_tokens"] - session.prompt_length
    text = "".join(chunk.text for chunk in model._stream(reply)).strip()
    if isinstance(expected["tokens"][0], list):
        assert session.outputs == expected["tokens"]
    else:
        assert [step[7] for step in session.outputs] == expected["tokens"]
    if task == "ASR":  # the reference's ASR printout lower-cases and strips punctuation
        text = text.lower().replace(",", "").replace(".", "").replace("?", "")
    assert text == expected["text"]


def test_the_stopping_variant_exercises_every_stop_rule():
    tasks = REFERENCE["variants"]["seed0_stops"]["tasks"]
    batch = [step[7] for step in tasks["A1A2+A1T2"]["tokens"]]
    eot = 151936
    assert eot in batch and batch[batch.index(eot) + 1 :] and set(batch[batch.index(eot) + 1 :]) == {eot + 1}
    assert len(tasks["A1A2+A1T2"]["tokens"]) < 400 - 100  # ended by _eoa, not by the limit
    assert len(tasks["A1T2"]["tokens"]) < 60  # ended by _eot
