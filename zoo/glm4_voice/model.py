"""GLM-4-Voice behind the zoo interface: the speech tokenizer, the 9B LLM and the flow + HiFT
decoder loaded from the three published repos, replies streamed as text deltas and audio blocks,
conversations carried across turns, and batched serving over session slots.

Precision: ``dtype`` sets the LLM's (bfloat16 by default on a GPU, float32 on CPU; "int8" and
"int4" quantise its weights, computing in bfloat16: bitsandbytes on a GPU, torch's weight-only
kernels on a CPU, see zoo.core.quantize). The tokenizer and
the decoder run in float32 as the reference runs them (float64 when dtype is float64, for parity).

History: the last chunk of a reply carries ``chunk.turn``, a small JSON-able record of the
exchange; pass the records of earlier turns as ``history`` to continue the conversation. The
prompt is then rebuilt as the reference web demo rebuilds it (previous prompt + previous completion
text, re-tokenised), so a conversation is the same token sequence the reference would see."""
from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..core.admission import part_end
from ..core.audio import AudioSource, load_audio
from ..core.checkpoints import resolve_files
from ..core.devices import pick_device
from ..core.errors import OptionsError
from ..core.isolation import admit_each, isolate
from ..core.quantize import QUANTIZED, device_precision
from ..core.sampling import Sampling, UnusableLogits, sample_rows
from ..core.scheduler import OneSlotSteppers
from ..core.types import Chunk, ModelCard, Options, Stage, VoiceModel
from .decoder import DECODER_FILES, AudioDecoder
from .engine import SlotEngine
from .llm import INDEX_FILE, load_llm
from .prompt import LOW_LATENCY_BLOCKS, REFERENCE_BLOCKS, ReplySplitter, audio_as_text, build_prompt
from .speech_tokenizer import SAMPLE_RATE, TOKENIZER_FILES, SpeechTokenizer
from .text_tokenizer import TOKENIZER_FILES as TEXT_TOKENIZER_FILES
from .text_tokenizer import GlmTokenizer

log = logging.getLogger("zoo.glm4_voice")

LLM_FILES = ("config.json", INDEX_FILE, *TEXT_TOKENIZER_FILES)
STREAM_MODES = ("seamless", "reference")

CARD = ModelCard(
    name="glm-4-voice",
    title="GLM-4-Voice",
    description="Speech in, streamed speech and text out; Chinese and English; follows spoken instructions about "
                "emotion, speed and dialect (GLM-4-9B + WhisperVQ tokenizer + flow-matching/HiFT decoder).",
    input_sample_rate=SAMPLE_RATE,
    output_sample_rate=22050,
    languages=("zh", "en"),
    parameters="9.4B LLM (19 GB bf16) + 0.34B speech tokenizer + 0.11B flow + 0.02B HiFT",
    quantizations=QUANTIZED,
    hardware="a CUDA GPU with 24 GB+ in bf16 (21.2 GiB peak measured on an H200); dtype int8 / int4 for smaller "
             "cards (LLM weights 10.9 / 6.9 GB, computed); CPU only for tests",
    download_size="≈ 21 GB: LLM 19 GB (bf16) + speech tokenizer ≈ 1.4 GB + flow and HiFT decoder ≈ 0.5 GB "
                  "(the last two computed for fp32)",
    components={"llm": "THUDM/glm-4-voice-9b", "tokenizer": "THUDM/glm-4-voice-tokenizer",
                "decoder": "THUDM/glm-4-voice-decoder"},
    max_input_seconds=120.0,
    reply_tokens_per_second=12.5 * 39 / 26,  # 13 text + 26 audio tokens per 26 audio tokens at 12.5 Hz
    multi_turn=True,
    text_input=True,
    paper="https://arxiv.org/abs/2412.02612",
    license="code Apache-2.0 (github.com/THUDM/GLM-4-Voice); weights under the GLM-4 model license "
            "(huggingface.co/THUDM/glm-4-voice-9b/blob/main/LICENSE)",
    measured_ttfa="766 ms for a 3 s question on one H200 "
                  "(bfloat16, random full-size weights, 2026-11-27: bench/results/2026-11-27_h200_gpu.md)",
)


@dataclass
class GlmVoiceOptions(Options):
    """Defaults are the reference web demo's: temperature 0.2, top-p 0.8, up to 2000 tokens.

    ``stream_mode``: "seamless" (default) decodes a 10-token first block (0.8 s of speech) then
    25, 50, 100, 150, 200 tokens, each with a bounded left context, and loses no samples at block
    seams; "reference" reproduces the reference web demo's stream exactly (25, 50, 100, 150, 200
    tokens, the whole history re-decoded each block, fresh noise per block)."""

    # the published LLM's context (max_position_embeddings); a reply also stops when the prompt
    # leaves less room
    MAX_NEW_TOKENS: ClassVar[int] = 8192

    temperature: float = 0.2
    top_p: float = 0.8
    max_new_tokens: int = 2000
    stream_mode: str = "seamless"

    def validate(self) -> GlmVoiceOptions:
        super().validate()
        if self.stream_mode not in STREAM_MODES:
            raise OptionsError(f"stream_mode must be one of {STREAM_MODES}, got {self.stream_mode!r}")
        return self


class TextDeltas:
    """Text token ids -> text, as soon as each character is complete (UTF-8 across ids)."""

    def __init__(self, tokenizer: GlmTokenizer) -> None:
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.utf8.decode(self.tokenizer.decode_bytes([token]))

    def finish(self) -> str:
        return self.utf8.decode(b"", final=True)


class Reply:
    """One reply in flight: its slot, the sampled ids routed into text deltas and audio blocks,
    and the chunks not yet collected by ``poll``."""

    def __init__(self, model: GlmVoice, prompt: str, prompt_ids: list[int], turn: dict, options: GlmVoiceOptions) -> None:
        self.model, self.prompt, self.prompt_ids, self.turn, self.options = model, prompt, prompt_ids, turn, options
        tokenizer = model.tokenizer
        self.stop_ids = set(model.stop_ids)
        self.end_id = tokenizer.id("<|user|>")
        blocks = LOW_LATENCY_BLOCKS if options.stream_mode == "seamless" else REFERENCE_BLOCKS
        self.splitter = ReplySplitter(tokenizer.audio_offset, self.end_id, blocks)
        self.text = TextDeltas(tokenizer)
        self.audio = model.decoder.new_state(options.stream_mode)
        device = model.device
        self.generator = torch.Generator(device=device).manual_seed(options.seed)
        self.engine: SlotEngine | None = None  # set with the slot when a stepper starts the reply
        self.slot: int | None = None
        self.prefilled = 0  # prompt ids in its slot's cache (a chunked prefill runs in parts)
        self.token: int | None = None  # sampled, not yet fed to the LLM
        self.generated = 0
        self.skipped = 0  # sampled ids with no vocabulary entry (no text, no audio)
        self.done = False
        self.error: Exception | None = None
        self._text: list[str] = []
        self._audio: list[np.ndarray] = []
        self._final_turn: dict | None = None

    def choose(self, logits: torch.Tensor) -> None:
        """Sample the next id from (1, vocab) logits, then route it."""
        choose_all([self], logits)

    def accept(self, token: int) -> None:
        """The sampled next id: counted, then routed."""
        self.token = token
        self.generated += 1
        self._route(token)

    def _route(self, token: int) -> None:
        block = None
        if token in self.stop_ids:
            block = self.splitter.push(token) if token == self.end_id else self.splitter.finish()
            self._finish(block)
            return
        if self.model.tokenizer.has_entry(token):
            block = self.splitter.push(token)
            if token < self.model.tokenizer.audio_offset:
                self._text.append(self.text.push(token))
        else:
            self._skip(token)
        out_of_room = self.engine is not None and self.engine.room(self.slot) < 1
        if self.generated >= self.options.max_new_tokens or out_of_room:
            self._finish(block if block is not None else self.splitter.finish())
        elif block is not None:
            self._audio.append(self.model.decoder.step(self.audio, block))

    def _skip(self, token: int) -> None:
        """An id the LLM can emit but the vocabulary lacks: not text, not audio, left out of the
        reply (the LLM still reads it back as its own output)."""
        if not self.skipped:
            log.warning("the LLM emitted id %d, which has no vocabulary entry: skipped (once per reply "
                        "logged; Reply.skipped counts them)", token)
        self.skipped += 1

    def _finish(self, last_block: list[int] | None) -> None:
        self._text.append(self.text.finish())
        self._audio.append(self.model.decoder.finish(self.audio, last_block or []))
        completion = self.model.tokenizer.decode(self.splitter.completion_ids)
        self._final_turn = dict(self.turn, assistant=completion)
        self.done = True

    def poll(self) -> Chunk | None:
        text, self._text = "".join(self._text), []
        audio, self._audio = [a for a in self._audio if a.size], []
        turn, self._final_turn = self._final_turn, None
        if not text and not audio and turn is None:
            return None
        samples = np.concatenate(audio).astype(np.float32, copy=False) if audio else np.zeros(0, np.float32)
        return Chunk(audio=samples, text=text, turn=turn)


def choose_all(replies: list[Reply], logits: torch.Tensor) -> None:
    """Every reply's next id from its row of ``logits`` (B, vocab): one draw for the batch, each
    reply with its own options and generator (sample_rows), one read back to the host; then each
    routes its own id to its text and decoder, isolated: a reply whose logits were unusable, or
    whose routing fails, ends alone."""
    tokens, unusable = sample_rows(logits, [Sampling.of(r.options, r.generator) for r in replies])
    picks = torch.cat([tokens, unusable.long()]).tolist()
    for reply, token, bad in zip(replies, picks[: len(replies)], picks[len(replies):]):
        with isolate(reply):
            if bad:
                raise UnusableLogits()
            reply.accept(token)


class ReplyStepper:
    """Batched serving for zoo.core.scheduler: one slot engine shared by every admitted reply;
    each step feeds every reply's last id in one forward pass."""

    def __init__(self, model: GlmVoice, max_sessions: int) -> None:
        self.model = model
        self.engine = SlotEngine(model.llm, slots=max_sessions, max_len=model.max_context)

    def prepare(self, audio: AudioSource, sample_rate: int | None, options, history=None) -> Reply:
        return self.model.prepare(audio=audio, sample_rate=sample_rate, options=options, history=history)

    def start(self, job: Reply) -> None:
        self.start_part(job, len(job.prompt_ids))

    def start_many(self, jobs: list[Reply]) -> None:
        """zoo.core.types.BatchStarter: the arrivals' prompts in one forward (SlotEngine.prefill_many),
        their first ids drawn in one call as ``step`` draws them. A job that cannot start (no free
        slot, a prompt longer than the context) gets its own error; the others start."""
        admitted = admit_each(jobs, self._admit)
        if admitted:
            logits = self.engine.prefill_many([job.slot for job in admitted], [job.prompt_ids for job in admitted])
            for job in admitted:
                job.prefilled = len(job.prompt_ids)
            choose_all(admitted, logits)

    def prompt_length(self, job: Reply) -> int:
        return len(job.prompt_ids)

    def start_part(self, job: Reply, positions: int) -> bool:
        """zoo.core.types.ChunkedStarter: the next ``positions`` prompt ids appended to the job's
        slot (``SlotEngine.prefill`` appends); the last part's logits draw its first id."""
        end = part_end(job.prefilled, positions, len(job.prompt_ids))
        if job.slot is None:
            self._admit(job)
        logits = self.engine.prefill(job.slot, job.prompt_ids[job.prefilled : end])
        job.prefilled = end
        if end < len(job.prompt_ids):
            return False
        job.choose(logits[None])
        return True

    def _admit(self, job: Reply) -> None:
        """A slot for the job, checked to hold its prompt (``release`` gives it back either way)."""
        job.engine, job.slot = self.engine, self.engine.acquire()
        self.engine.check_room(job.slot, len(job.prompt_ids))

    def step(self, jobs: list[Reply]) -> None:
        live = [job for job in jobs if not job.done]
        if not live:
            return
        choose_all(live, self.engine.step([job.slot for job in live], torch.tensor([job.token for job in live])))

    def release(self, job: Reply) -> None:
        if job.slot is not None:
            self.engine.release(job.slot)
            job.slot = None


class GlmVoice(VoiceModel):
    card = CARD
    options_class = GlmVoiceOptions

    def __init__(self, llm, speech_tokenizer: SpeechTokenizer, tokenizer: GlmTokenizer, decoder: AudioDecoder) -> None:
        self.llm, self.speech_tokenizer, self.tokenizer, self.decoder = llm, speech_tokenizer, tokenizer, decoder
        eos = llm.config.eos_token_id
        self.stop_ids = tuple(eos if isinstance(eos, (list, tuple)) else [eos])  # <|endoftext|> <|user|> <|observation|>
        self.max_context = llm.config.max_position_embeddings
        self._steppers = OneSlotSteppers(lambda: ReplyStepper(self, max_sessions=1))

    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, *, device=None, dtype=None, llm: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
             decoder: str | os.PathLike | None = None) -> GlmVoice:
        device = pick_device(device)
        llm_dtype, quantized, side_dtype = precision(dtype, device)
        llm_dir = resolve_files(llm or CARD.components["llm"], LLM_FILES, component="llm", optional=("*.safetensors",))
        tokenizer_dir = resolve_files(tokenizer or CARD.components["tokenizer"], TOKENIZER_FILES, component="tokenizer")
        decoder_dir = resolve_files(decoder or CARD.components["decoder"], DECODER_FILES, component="decoder")
        network = load_llm(llm_dir, dtype=llm_dtype, device=device, quantized=quantized)
        return cls(network, SpeechTokenizer.load(tokenizer_dir, device=device, dtype=side_dtype),
                   GlmTokenizer.load(llm_dir), AudioDecoder.load(decoder_dir, device=device, dtype=side_dtype))

    # -- the zoo interface --------------------------------------------------------------------
    def respond(self, audio: AudioSource, sample_rate: int | None = None,
                options: GlmVoiceOptions | Mapping[str, Any] | None = None,
                history: Sequence[Mapping[str, Any]] | None = None) -> Iterator[Chunk]:
        """Answer a spoken turn with text and speech; ``history``: earlier ``chunk.turn`` records."""
        return self._stream(self.prepare(audio=audio, sample_rate=sample_rate, options=options, history=history))

    def respond_text(self, text: str, options: GlmVoiceOptions | Mapping[str, Any] | None = None,
                     history: Sequence[Mapping[str, Any]] | None = None) -> Iterator[Chunk]:
        """Answer a typed turn with text and speech (the reference's text-input system prompt)."""
        return self._stream(self.prepare(text=text, options=options, history=history))

    def stepper(self, max_sessions: int) -> ReplyStepper:
        return ReplyStepper(self, max_sessions)

    def prepare(self, *, audio: AudioSource | None = None, sample_rate: int | None = None, text: str | None = None,
                options=None, history: Sequence[Mapping[str, Any]] | None = None) -> Reply:
        """Validate the input and options, tokenize speech and prompt; no LLM work yet."""
        opts = self.options(options)
        if audio is not None:
            wav = load_audio(audio, sample_rate, target_rate=SAMPLE_RATE, max_seconds=self.card.max_input_seconds)
            user_input, spoken = audio_as_text(self.speech_tokenizer(wav)), True
        elif text is not None and text.strip():
            user_input, spoken = text, False
        else:
            raise OptionsError("a turn needs audio or a non-empty text question")
        prompt = build_prompt(user_input, spoken=spoken, history=conversation_text(history))
        ids = self.tokenizer.encode(prompt)
        if len(ids) >= self.max_context:
            raise OptionsError(f"the conversation is {len(ids)} tokens; the model reads at most {self.max_context}")
        return Reply(self, prompt, ids, {"user": user_input, "spoken": spoken}, opts)

    def benchmark_stages(self, audio: np.ndarray, sample_rate: int) -> dict[str, Callable[[], object]]:
        """One call per pipeline stage, for bench/latency.py to time."""
        wav = load_audio(audio, sample_rate, target_rate=SAMPLE_RATE)
        reply = self.prepare(audio=audio, sample_rate=sample_rate)
        engine = SlotEngine(self.llm, slots=1, max_len=self.max_context)
        slot = engine.acquire()
        first_block = [int(i) for i in torch.randint(0, 16384, (LOW_LATENCY_BLOCKS[0],),
                                                      generator=torch.Generator().manual_seed(0))]

        def prefill() -> None:
            engine.cache.lengths[slot] = 0
            engine.prefill(slot, reply.prompt_ids)

        def decode_step() -> None:
            if engine.room(slot) < 1 or engine.cache.lengths[slot] == 0:
                prefill()
            engine.step([slot], torch.tensor([reply.prompt_ids[-1]]))

        def first_decoder_block() -> None:
            self.decoder.step(self.decoder.new_state("seamless"), first_block)

        return {Stage.ENCODE: lambda: self.speech_tokenizer(wav), Stage.PREFILL: prefill,
                Stage.DECODE_STEP: decode_step, Stage.FIRST_AUDIO: first_decoder_block}

    # -- internals ----------------------------------------------------------------------------
    def _stream(self, reply: Reply) -> Iterator[Chunk]:
        return self._steppers.stream(reply)


def conversation_text(history: Sequence[Mapping[str, Any]] | None) -> str:
    """Earlier turns -> the reference's history string (each prompt + its completion)."""
    text = ""
    for number, turn in enumerate(history or ()):
        try:
            user, spoken, assistant = str(turn["user"]), bool(turn["spoken"]), str(turn["assistant"])
        except (KeyError, TypeError):
            raise OptionsError(f"history[{number}] is not a turn record (pass the chunk.turn of earlier replies)") from None
        text = build_prompt(user, spoken=spoken, history=text) + assistant
    return text


def precision(dtype, device: torch.device) -> tuple[torch.dtype, str | None, torch.dtype]:
    """``dtype`` -> (LLM compute dtype, quantisation or None, tokenizer/decoder dtype)."""
    llm_dtype, quantized = device_precision(dtype, device)
    return llm_dtype, quantized, torch.float64 if llm_dtype == torch.float64 else torch.float32
