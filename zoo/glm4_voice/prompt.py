"""GLM-4-Voice's conversation format and reply streaming, as the reference web demo
(THUDM/GLM-4-Voice:web_demo.py) does them: the prompt string (system prompts verbatim), the
history carried as text, and the split of generated ids into text, audio blocks and the end."""
from __future__ import annotations

from dataclasses import dataclass, field

# Verbatim, including the audio prompt's trailing space: the model was trained on these strings.
SYSTEM_PROMPT_AUDIO = ("User will provide you with a speech instruction. Do it step by step. First, think about "
                       "the instruction and respond in a interleaved manner, with 13 text token followed by 26 "
                       "audio tokens. ")
SYSTEM_PROMPT_TEXT = ("User will provide you with a text instruction. Do it step by step. First, think about the "
                      "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio "
                      "tokens.")
TEXT_PER_ROUND, AUDIO_PER_ROUND = 13, 26  # the interleave the system prompt asks for

# Audio tokens per decoder call. The reference web demo (main) grows its blocks; its dev branch
# starts with 10 tokens (0.79 s of speech) for a faster first audio, which we keep as the default.
REFERENCE_BLOCKS = (25, 50, 100, 150, 200)
LOW_LATENCY_BLOCKS = (10, 25, 50, 100, 150, 200)


def audio_as_text(ids: list[int]) -> str:
    """Speech-tokenizer ids -> the text the LLM reads them as."""
    return "<|begin_of_audio|>" + "".join(f"<|audio_{i}|>" for i in ids) + "<|end_of_audio|>"


def build_prompt(user_input: str, *, spoken: bool, history: str = "") -> str:
    """The prompt for one turn. ``history`` is the previous prompt plus the previous completion
    text (the reference keeps the conversation as text and re-tokenises it every turn); the system
    prompt is added only if the history has none."""
    prompt = history.strip()
    if "<|system|>" not in prompt:
        prompt += f"<|system|>\n{SYSTEM_PROMPT_AUDIO if spoken else SYSTEM_PROMPT_TEXT}"
    return prompt + f"<|user|>\n{user_input}<|assistant|>streaming_transcription\n"


@dataclass
class ReplySplitter:
    """Feed generated ids one by one; ids >= ``audio_offset`` are audio (id - offset), others text,
    and ``end_id`` (``<|user|>``) ends the reply. ``push`` returns an audio block when one is due:
    ``blocks[i]`` tokens for the i-th block (the last size repeats), or whatever is left at the end."""

    audio_offset: int
    end_id: int
    blocks: tuple[int, ...] = LOW_LATENCY_BLOCKS
    text_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    pending_audio: list[int] = field(default_factory=list)
    blocks_sent: int = 0
    finished: bool = False

    def push(self, token_id: int) -> list[int] | None:
        if self.finished:
            return None
        if token_id == self.end_id:
            self.finished = True
            return self._flush() if self.pending_audio else None
        self.completion_ids.append(token_id)
        if token_id >= self.audio_offset:
            self.pending_audio.append(token_id - self.audio_offset)
            size = self.blocks[min(self.blocks_sent, len(self.blocks) - 1)]
            if len(self.pending_audio) >= size:
                return self._flush()
        else:
            self.text_ids.append(token_id)
        return None

    def finish(self) -> list[int] | None:
        """The reply ended without ``end_id`` (token limit): the last block, if any."""
        self.finished = True
        return self._flush() if self.pending_audio else None

    def _flush(self) -> list[int]:
        block, self.pending_audio = self.pending_audio, []
        self.blocks_sent += 1
        return block
