"""Mini-Omni behind the zoo interface: loading the published files, the five tasks of the
reference plus its batch trick, and streaming replies (text deltas alongside audio chunks)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tokenizers import Tokenizer

from ..core.audio import AudioSource, load_audio
from ..core.checkpoints import load_strict, resolve_files
from ..core.devices import pick_device
from ..core.errors import OptionsError, WeightsNotFound
from ..core.isolation import isolate
from ..core.scheduler import OneSlotSteppers
from ..core.types import Chunk, ModelCard, Options, Stage, VoiceModel
from . import whisper
from .codec import CODEC_FILES, Codec, Window, load_snac
from .config import GPTConfig
from .engine import Engine, Session
from .gpt import GPT, QUANTIZED, precision
from .prompts import TASKS, Task, audio_question, text_question
from .tokens import AUDIO_LAYERS, EOT

CHECKPOINT_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json")
WHISPER_FILE = "small.pt"
# Mini-Omni2's repo ships the stock openai-whisper small.pt that Mini-Omni's code downloads.
WHISPER_HUB_FALLBACK = "gpt-omni/mini-omni2"

CARD = ModelCard(
    name="mini-omni",
    title="Mini-Omni",
    description="Speech in, streamed speech and text out (Qwen2-0.5B + Whisper-small encoder + SNAC 24 kHz); English.",
    input_sample_rate=whisper.SAMPLE_RATE,
    output_sample_rate=24000,
    languages=("en",),
    parameters="0.5B LLM (532M unique params, 2.8 GB fp32 file) + Whisper-small encoder (88M) + SNAC (20M)",
    quantizations=QUANTIZED,
    hardware="CPU works (slow); any CUDA GPU with 4 GB+ for real time",
    download_size="≈ 3.4 GB: lit_model.pth 2.8 GB (fp32) + Whisper small.pt 0.46 GB (fp16) + SNAC ≈ 0.08 GB",
    components={"checkpoint": "gpt-omni/mini-omni", "codec": "hubertsiuzdak/snac_24khz"},
    max_input_seconds=30.0,
    reply_tokens_per_second=24000 / 2048,  # one SNAC frame (7 codes, 2048 samples) per step
    multi_turn=False,
    text_input=True,
    paper="https://arxiv.org/abs/2408.16725",
    license="MIT (code: github.com/gpt-omni/mini-omni; weights: the same license on the hub)",
    measured_ttfa="247 ms on one H200 "
                  "(bfloat16, random full-size weights, 2026-11-27: bench/results/2026-11-27_h200_gpu.md)",
)


@dataclass
class MiniOmniOptions(Options):
    """Defaults are the reference's: temperature 0.9 with top_k 1 (which is greedy), top_p 1.
    ``max_new_tokens`` is further capped so prompt + reply fit the 2048-token context, which is the
    reference's ``max_returned_tokens=2048``."""

    MAX_NEW_TOKENS: ClassVar[int] = 2048  # the published context (block_size): no reply can be longer

    temperature: float = 0.9
    top_k: int | None = 1
    top_p: float = 1.0
    max_new_tokens: int = 2048
    stream_stride: int = 4  # frames (85.3 ms each) per audio chunk, as the reference server
    first_chunk_frames: int = 1  # the first chunk leaves as soon as its frames are final
    # frames of right context per chunk: 3 = identical to the one-pass decode, 2 = 87 dB SNR
    # against it (inaudible; one decode step less to the first audio), 1 = 45 dB, 0 = 26 dB
    lookahead: int = 2
    stream_mode: str = "seamless"  # or "reference": independent chunks, tail dropped
    codec_noise: bool = True  # SNAC's learned noise injection (seeded by ``seed``)

    def validate(self) -> MiniOmniOptions:
        super().validate()
        if not 1 <= self.stream_stride <= 64:
            raise OptionsError(f"stream_stride must be in [1, 64], got {self.stream_stride}")
        if not 1 <= self.first_chunk_frames <= self.stream_stride:
            raise OptionsError(f"first_chunk_frames must be in [1, stream_stride], got {self.first_chunk_frames}")
        if not 0 <= self.lookahead <= 3:
            raise OptionsError(f"lookahead must be in [0, 3], got {self.lookahead}")
        if self.stream_mode not in ("seamless", "reference"):
            raise OptionsError(f"stream_mode must be 'seamless' or 'reference', got {self.stream_mode!r}")
        return self


class TextStream:
    """Incremental detokenisation: the text up to the first _eot, emitted as deltas. Each step
    decodes only the ids since the last emitted text (not the whole reply again): the delta is
    decode(ids[start:]) minus decode(ids[start:sent]), held back while it ends in half a
    multi-byte character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # ids before this are fully emitted
        self.sent = 0  # ids up to here are emitted
        self.emitted_any = False
        self.ended = False

    def push(self, token: int) -> str:
        if self.ended or token == EOT:
            self.ended = True
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.start : self.sent])
        text = self.tokenizer.decode(self.ids[self.start :])
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return ""
        delta = text[len(before):]
        if not self.emitted_any:  # the reply's leading space, as the reference's strip()
            delta = delta.lstrip()
            self.emitted_any = bool(delta)
        self.start, self.sent = self.sent, len(self.ids)
        return delta


class Reply:
    """Turns a session's growing outputs into Chunks: text per step, audio per ``stride`` frames.
    Audio layer j carries frame f at output position f + j + 1, so frame f is complete at f + 7."""

    def __init__(self, session: Session, tokenizer: Tokenizer, codec: Codec, options: MiniOmniOptions) -> None:
        self.session = session
        self.text = TextStream(tokenizer)
        self.audio = codec.new_state(
            options.stream_stride, options.lookahead, options.stream_mode, options.seed, options.codec_noise,
            first_chunk=options.first_chunk_frames,
        )
        self.read = 0
        self.text_delta: list[str] = []
        self.audio_ready: list[np.ndarray] = []

    @property
    def done(self) -> bool:
        return self.session.done

    @property
    def error(self) -> Exception | None:
        return self.session.error

    def advance(self) -> list[Window]:
        """Consume the session's new outputs: text now, frames into the audio streamer. Returns
        the audio windows due for decoding (hand their audio back with ``complete``)."""
        outputs = self.session.outputs
        while self.read < len(outputs):
            p = self.read
            self.text_delta.append(self.text.push(outputs[p][AUDIO_LAYERS]))
            if self.session.task.speaks and p >= AUDIO_LAYERS:
                f = p - AUDIO_LAYERS
                self.audio.push([outputs[f + 1 + j][j] for j in range(AUDIO_LAYERS)])
            self.read += 1
        if not self.session.task.speaks:
            return []
        return self.audio.plan(final=self.session.done)

    def complete(self, audio: list[np.ndarray]) -> None:
        self.audio_ready.extend(audio)

    def take(self) -> Chunk | None:
        """Everything produced since the last take, as one chunk (None if nothing)."""
        text, self.text_delta = "".join(self.text_delta), []
        chunks, self.audio_ready = self.audio_ready, []
        if not chunks and not text:
            return None
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return Chunk(audio=audio.astype(np.float32, copy=False), text=text)

    def poll(self) -> Chunk | None:
        if self.error is None:  # a failed reply's output stops where it failed
            windows = self.advance()
            if windows:
                self.complete(self.audio.codec.decode_windows(windows))
        return self.take()


class ReplyStepper:
    """Batched serving of respond() for zoo.core.scheduler: its own engine with two KV-cache rows
    per session (the batch trick), shared by every session the scheduler admits."""

    def __init__(self, model: MiniOmni, max_sessions: int) -> None:
        self.model = model
        self.engine = Engine(model.gpt, max_rows=2 * max_sessions)

    def prepare(self, audio: AudioSource, sample_rate: int | None, options, history=None) -> Reply:
        """``history`` is not used: Mini-Omni was trained on single turns."""
        return self.model.start_session("A1A2+A1T2", audio=audio, sample_rate=sample_rate, options=options)[1]

    def start(self, job: Reply) -> None:
        self.engine.start(job.session)

    def start_many(self, jobs: list[Reply]) -> None:
        """zoo.core.types.BatchStarter: new arrivals' prompts in one forward."""
        self.engine.start_many([job.session for job in jobs])

    def prompt_length(self, job: Reply) -> int:
        return job.session.prompt_length

    def start_part(self, job: Reply, positions: int) -> bool:
        """zoo.core.types.ChunkedStarter: the next part of the job's prompt (Engine.start_part)."""
        return self.engine.start_part(job.session, positions)

    def step(self, jobs: list[Reply]) -> None:
        """One decode step for every session, then every due audio window in one codec batch.
        If that batch fails, each session's windows are decoded on their own (isolated), so only
        the session whose windows fail ends."""
        self.engine.step([job.session for job in jobs])
        due = []
        for job in jobs:
            if job.error is None:
                with isolate(job.session):
                    due.append((job, job.advance()))
        try:
            audio = self.model.codec.decode_windows([w for _, windows in due for w in windows])
        except Exception:  # noqa: BLE001 - not attributable yet: find the session it belongs to
            for job, windows in due:
                with isolate(job.session):
                    job.complete(self.model.codec.decode_windows(windows))
            return
        for job, windows in due:
            job.complete(audio[: len(windows)])
            audio = audio[len(windows):]

    def release(self, job: Reply) -> None:
        self.engine.release(job.session)


class MiniOmni(VoiceModel):
    card = CARD
    options_class = MiniOmniOptions

    def __init__(self, gpt: GPT, encoder: whisper.AudioEncoder, codec: Codec, tokenizer: Tokenizer) -> None:
        self.gpt, self.encoder, self.codec, self.tokenizer = gpt.pack(), encoder, codec, tokenizer
        # respond() and generate() run on one-slot steppers (two KV-cache rows: the batch trick's),
        # so replies that run at once in one process never share cache rows
        self._steppers = OneSlotSteppers(lambda: self.stepper(1))
        whisper.mel_filters(encoder.dims.n_mels)  # build once now, not inside the first reply

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        checkpoint: str | os.PathLike | None = None,
        codec: str | os.PathLike | None = None,
    ) -> MiniOmni:
        device = pick_device(device)
        dtype, quantized = precision(dtype)
        ckpt = resolve_files(checkpoint or CARD.components["checkpoint"], CHECKPOINT_FILES, component="checkpoint", optional=(WHISPER_FILE,))
        codec_dir = resolve_files(codec or CARD.components["codec"], CODEC_FILES, component="codec")
        gpt = load_gpt(ckpt).placed(device, dtype, quantized)
        encoder = load_whisper_encoder(_whisper_file(ckpt)).to(device=device, dtype=dtype).eval()
        snac = load_snac(codec_dir, dtype, device)
        tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        return cls(gpt, encoder, Codec(snac), tokenizer)

    # -- the zoo interface --------------------------------------------------------------------
    def respond(
        self,
        audio: AudioSource,
        sample_rate: int | None = None,
        options: MiniOmniOptions | Mapping[str, Any] | None = None,
        history: Sequence[Any] | None = None,
    ) -> Iterator[Chunk]:
        """Answer a spoken question with speech and text (the reference server's A1A2+A1T2 batch).
        Mini-Omni was trained on single turns: ``history`` is accepted and not used."""
        return self.generate("A1A2+A1T2", audio=audio, sample_rate=sample_rate, options=options)

    def stepper(self, max_sessions: int) -> ReplyStepper:
        return ReplyStepper(self, max_sessions)

    def respond_text(self, text: str, options: MiniOmniOptions | Mapping[str, Any] | None = None) -> Iterator[Chunk]:
        """Answer a typed question with speech and text (the reference's T1A2 task)."""
        return self.generate("T1A2", text=text, options=options)

    def generate(
        self,
        task: str,
        *,
        audio: AudioSource | None = None,
        sample_rate: int | None = None,
        text: str | None = None,
        options: MiniOmniOptions | Mapping[str, Any] | None = None,
        **inputs: Any,
    ) -> Iterator[Chunk]:
        """Stream any reference task: A1A2, A1T2, ASR, T1A2, T1T2 or A1A2+A1T2 (``inputs``: what
        a subclass's own tasks take, e.g. an image)."""
        _, reply = self.start_session(task, audio=audio, sample_rate=sample_rate, text=text, options=options, **inputs)
        return self._stream(reply)

    def start_session(self, task: str, *, audio=None, sample_rate=None, text=None, options=None) -> tuple[Session, Reply]:
        """Validate and encode the input, build the prompt; no LLM work yet (the engine's
        ``start`` runs the prefill)."""
        opts = self.options(options)
        if task not in TASKS:
            raise OptionsError(f"unknown task {task!r}; one of {sorted(TASKS)}")
        spec = TASKS[task]
        prompt, features = self._prompt(spec, audio, sample_rate, text)
        room = self.gpt.config.block_size - prompt.size(-1)
        session = Session(spec, prompt, features, opts, max_outputs=min(opts.max_new_tokens, room))
        return session, Reply(session, self.tokenizer, self.codec, opts)

    def encode_audio(self, audio: AudioSource, sample_rate: int | None = None) -> torch.Tensor:
        """Any audio -> Whisper features (1, T_a, 768) of the frames the reference keeps."""
        wav = load_audio(audio, sample_rate, target_rate=whisper.SAMPLE_RATE, max_seconds=self.card.max_input_seconds)
        mel = whisper.log_mel_spectrogram(wav, self.encoder.dims.n_mels)
        weight = self.encoder.conv1.weight
        with torch.inference_mode():
            features = self.encoder(mel[None].to(weight.device, weight.dtype))
        return features[:, : whisper.feature_frames(wav.size)]

    def benchmark_stages(self, audio: np.ndarray, sample_rate: int) -> dict[str, Callable[[], object]]:
        """One call per pipeline stage, on ``audio``, for bench/latency.py to time."""
        features = self.encode_audio(audio, sample_rate)
        batch = TASKS["A1A2+A1T2"]
        prompt = audio_question(batch, features.size(1))
        opts = self.options({})
        engine = Engine(self.gpt, max_rows=2)  # its own KV cache: replies stay unaffected
        live: list[Session] = []

        def prefill() -> None:
            session = Session(batch, prompt, features, opts, max_outputs=self.gpt.config.block_size)
            engine.start(session)
            engine.release(session)

        def decode_step() -> None:
            if not live or live[0].done or live[0].position >= 600:
                for s in live:
                    engine.release(s)
                live[:] = [Session(batch, prompt, features, opts, max_outputs=self.gpt.config.block_size)]
                engine.start(live[0])
            engine.step(live)

        frames = torch.randint(0, 4096, (opts.stream_stride + 6, AUDIO_LAYERS), generator=torch.Generator().manual_seed(0))
        return {
            Stage.ENCODE: lambda: self.encode_audio(audio, sample_rate),  # Whisper
            Stage.PREFILL: prefill,
            Stage.DECODE_STEP: decode_step,
            Stage.FIRST_AUDIO: lambda: self.codec.decode(frames[:1 + opts.lookahead]),  # the first chunk
            "codec_chunk": lambda: self.codec.decode(frames),  # 4 frames + 3 left + 3 right
            "codec_chunk_reference": lambda: self.codec.decode(frames[: opts.stream_stride]),
        }

    # -- internals ----------------------------------------------------------------------------
    def _prompt(self, spec: Task, audio, sample_rate, text) -> tuple[torch.Tensor, torch.Tensor | None]:
        if spec.audio_input:
            if audio is None:
                raise OptionsError(f"task {spec.name} needs audio")
            features = self.encode_audio(audio, sample_rate)
            return audio_question(spec, features.size(1)), features
        if not text or not text.strip():
            raise OptionsError(f"task {spec.name} needs a non-empty text question")
        ids = self.tokenizer.encode(text).ids
        if len(ids) + 3 >= self.gpt.config.block_size:
            raise OptionsError(f"the text question is too long ({len(ids)} tokens)")
        return text_question(spec, ids), None

    def _stream(self, reply: Reply) -> Iterator[Chunk]:
        return self._steppers.stream(reply)


def load_gpt(folder: Path, config_class: type[GPTConfig] = GPTConfig, gpt_class: type[GPT] = GPT) -> GPT:
    config = config_class.from_yaml(folder / "model_config.yaml")
    with torch.device("meta"):
        gpt = gpt_class(config)
    load_strict(gpt, folder / "lit_model.pth", f"the litgpt layout of {folder / 'model_config.yaml'}")
    if config.tie_word_embeddings:  # assign=True replaced the shared Parameter: re-tie to wte
        gpt.lm_head.weight = gpt.transformer.wte.weight
    return gpt


def load_whisper_encoder(path: Path) -> whisper.AudioEncoder:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    dims = whisper.EncoderDims.from_checkpoint(checkpoint["dims"])
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in checkpoint["model_state_dict"].items() if k.startswith(prefix)}
    encoder = whisper.AudioEncoder(dims)
    encoder.load_state_dict(state, strict=True)
    return encoder


def _whisper_file(ckpt: Path) -> Path:
    """small.pt: in the checkpoint folder (as Mini-Omni2 ships it), else openai-whisper's cache,
    else downloaded from the Mini-Omni2 hub repo (the same stock file)."""
    if (ckpt / WHISPER_FILE).is_file():
        return ckpt / WHISPER_FILE
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper" / WHISPER_FILE
    if cache.is_file():
        return cache
    try:
        return resolve_files(WHISPER_HUB_FALLBACK, (WHISPER_FILE,), component="checkpoint") / WHISPER_FILE
    except WeightsNotFound as err:
        raise WeightsNotFound(
            f"Whisper-small encoder: no {WHISPER_FILE} in {ckpt} or {cache.parent}, and {err}"
        ) from None
