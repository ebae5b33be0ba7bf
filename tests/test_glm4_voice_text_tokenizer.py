"""GLM-4-Voice's text tokenizer against the reference ChatGLM4Tokenizer (transformers' slow path,
trust_remote_code) on the tiny tokenizer folder: tests/data/glm_text_tokenizer_reference.json holds
the reference's ids for prompts with audio tokens, history, Chinese, emoji and edge cases."""
import json
from pathlib import Path

import pytest

from zoo.glm4_voice.prompt import audio_as_text, build_prompt
from zoo.glm4_voice.random_weights import AUDIO_OFFSET, write_tiny_text_tokenizer
from zoo.glm4_voice.text_tokenizer import GlmTokenizer

REFERENCE = json.loads((Path(__file__).parent / "data" / "glm_text_tokenizer_reference.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return GlmTokenizer.load(write_tiny_text_tokenizer(tmp_path_factory.mktemp("glm_text")))


@pytest.mark.parametrize("case", range(len(REFERENCE["results"])))
def test_ids_and_decoded_text_equal_the_reference(tokenizer, case):
    expected = REFERENCE["results"][case]
    ids = tokenizer.encode(expected["text"])
    assert ids == expected["ids"]
    assert tokenizer.decode(ids[2:]) == expected["decoded"]


def test_special_ids_come_from_the_files(tokenizer):
    assert tokenizer.audio_offset == REFERENCE["audio_0"] == AUDIO_OFFSET
    assert tokenizer.id("<|user|>") == REFERENCE["user"]
    assert tokenizer.encode("", prefix=True) == [tokenizer.id("[gMASK]"), tokenizer.id("<sop>")]


def test_audio_tokens_are_single_ids(tokenizer):
    ids = tokenizer.encode(build_prompt(audio_as_text([0, 9, 16383]), spoken=True), prefix=False)
    begin = ids.index(tokenizer.id("<|begin_of_audio|>"))
    assert ids[begin + 1 : begin + 5] == [AUDIO_OFFSET, AUDIO_OFFSET + 9, AUDIO_OFFSET + 16383,
                                          tokenizer.id("<|end_of_audio|>")]


def test_a_config_that_disagrees_with_the_ranks_is_refused(tmp_path):
    folder = write_tiny_text_tokenizer(tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    user = next(k for k, v in config["added_tokens_decoder"].items() if v["content"] == "<|user|>")
    config["added_tokens_decoder"]["1"] = config["added_tokens_decoder"].pop(user)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="<\\|user\\|>"):
        GlmTokenizer.load(folder)
