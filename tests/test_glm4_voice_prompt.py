"""GLM-4-Voice prompt construction and reply splitting, as the reference web demo does them."""
from zoo.glm4_voice.prompt import (
    LOW_LATENCY_BLOCKS,
    REFERENCE_BLOCKS,
    SYSTEM_PROMPT_AUDIO,
    SYSTEM_PROMPT_TEXT,
    ReplySplitter,
    audio_as_text,
    build_prompt,
)

OFFSET, END = 152353, 151336


def test_first_turn_prompts_verbatim():
    spoken = build_prompt(audio_as_text([5, 16383]), spoken=True)
    assert spoken == ("<|system|>\nUser will provide you with a speech instruction. Do it step by step. First, think "
                      "about the instruction and respond in a interleaved manner, with 13 text token followed by 26 "
                      "audio tokens. <|user|>\n<|begin_of_audio|><|audio_5|><|audio_16383|><|end_of_audio|>"
                      "<|assistant|>streaming_transcription\n")
    assert SYSTEM_PROMPT_AUDIO.endswith("tokens. ") and SYSTEM_PROMPT_TEXT.endswith("tokens.")
    typed = build_prompt("Hello", spoken=False)
    assert typed.startswith("<|system|>\n" + SYSTEM_PROMPT_TEXT + "<|user|>\nHello<|assistant|>")


def test_later_turns_keep_the_history_as_text_without_a_second_system_prompt():
    first = build_prompt("Hi", spoken=False)
    history = first + "Hello!<|audio_1|><|audio_2|>\n"
    second = build_prompt("And you?", spoken=True, history=history)
    assert second.count("<|system|>") == 1
    assert second == history.strip() + "<|user|>\nAnd you?<|assistant|>streaming_transcription\n"


def test_splitter_blocks_text_and_end():
    splitter = ReplySplitter(OFFSET, END, blocks=(3, 5))
    stream = [10, 11, OFFSET + 1, OFFSET + 2, 12, OFFSET + 3] + [OFFSET + i for i in range(4, 12)] + [END, 99, OFFSET]
    blocks = [b for b in (splitter.push(t) for t in stream) if b is not None]
    assert blocks == [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11]]  # 3, then 5s, then the rest at the end
    assert splitter.text_ids == [10, 11, 12] and splitter.finished
    assert splitter.completion_ids == stream[: stream.index(END)]  # ids after the end are ignored


def test_reply_cut_by_the_token_limit_flushes_its_tail():
    splitter = ReplySplitter(OFFSET, END, blocks=REFERENCE_BLOCKS)
    assert all(splitter.push(OFFSET + i) is None for i in range(7))
    assert splitter.finish() == list(range(7)) and splitter.finish() is None
    assert LOW_LATENCY_BLOCKS[0] == 10 and REFERENCE_BLOCKS == (25, 50, 100, 150, 200)
