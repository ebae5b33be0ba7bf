"""Moshi (kyutai-labs/moshi) behind the zoo interface: a full-duplex speech-text model. Every
80 ms the user's audio frame (24 kHz, 1920 samples) goes through the Mimi codec (8 codebooks),
the Helium temporal transformer reads it with Moshi's own previous text and audio tokens, and
Moshi answers with a text token (its "inner monologue") and 8 audio codebooks sampled by the depth
transformer, which Mimi decodes to its next 1920 samples. Audio codebooks after the first are
delayed one step, so the first answer comes one step late.

    session = model.duplex(options)         # duplex.py: the reference server's streaming path
    chunk = session.step(frame)             # 1920 samples in -> 1920 samples + text piece out
    model.duplex_stepper(n)                 # batched sessions (zoo.core.scheduler.DuplexScheduler)
    model.respond(audio)                    # reply.py: the user's turn, then silence

Sampling defaults are the reference's ``LMGen``: audio temperature 0.8 / top-k 250, text 0.7 /
25; ``temperature=0`` is greedy everywhere. Each session draws from its own torch.Generator
(seeded by ``Options.seed``); the reference draws with the global RNG through a top-k
multinomial, so seeded draws are not the reference's, the distributions are.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..core.audio import AudioSource
from ..core.devices import pick_device
from ..core.duplex import OneSlotDuplex
from ..core.quantize import QUANTIZED, device_precision
from ..core.scheduler import OneSlotSteppers
from ..core.types import Chunk, ModelCard, Stage, VoiceModel
from .checkpoint import DEFAULT_REPO, CheckpointInfo, load_lm, load_mimi
from .duplex import DuplexStepper
from .generate import Generator
from .lm import MoshiLM
from .mimi import FRAME_RATE, FRAME_SAMPLES, SAMPLE_RATE, Mimi
from .options import MoshiOptions
from .reply import ReplyStepper, prepare_reply

CARD = ModelCard(
    name="moshi",
    title="Moshi",
    description="Full-duplex speech-text model (Kyutai): listens and speaks at once in 80 ms frames, with its "
                "own text alongside (inner monologue). Helium 7B temporal transformer + depth transformer over "
                "the Mimi codec. English.",
    input_sample_rate=SAMPLE_RATE,
    output_sample_rate=SAMPLE_RATE,
    languages=("en",),
    parameters="7.7B LM (Helium 7B + depth transformer) + 96M Mimi codec",
    quantizations=QUANTIZED,
    hardware="a CUDA GPU with 24 GB for bfloat16 (the reference: about 18 GB at full context), 12 GB for int8 "
             "(the -q8 repos, or dtype int8); CPU only for tiny",
    components={"checkpoint": DEFAULT_REPO},
    download_size="≈ 15.8 GB: model.safetensors 15.4 GB (bf16) + Mimi 0.39 GB + tokenizer 0.6 MB",
    max_input_seconds=120.0,
    reply_tokens_per_second=FRAME_RATE,  # one 80 ms step per token
    duplex=True,
    frame_samples=FRAME_SAMPLES,
    text_output=True,
    multi_turn=False,
    text_input=False,
    # the reference server's /api/chat (serving/protocols/kyutai_reference.py); the reference web
    # client's URL parameters that set options
    protocols={"kyutai-opus": {"text_temperature": "text_temperature", "text_topk": "text_top_k",
                               "audio_temperature": "temperature", "audio_topk": "top_k"}},
    paper="https://arxiv.org/abs/2410.00037",
    license="code MIT (Python) and Apache-2.0 (Rust) (github.com/kyutai-labs/moshi); weights CC-BY-4.0",
)


def precision(dtype: torch.dtype | str | None, device: torch.device, int8_file: bool = False
              ) -> tuple[torch.dtype, str | None]:
    """``dtype`` -> (the LM's compute dtype, its quantisation or None); None means the file's own
    precision (int8 for the reference's q8 files), else bfloat16 on CUDA and float32 on a CPU."""
    return device_precision("int8" if dtype is None and int8_file else dtype, device)


class Moshi(VoiceModel):
    card = CARD
    options_class = MoshiOptions

    def __init__(self, mimi: Mimi, lm: MoshiLM, tokenizer, *, source: str = "") -> None:
        self.mimi, self.lm, self.tokenizer = mimi, lm, tokenizer
        self.generator = Generator(lm)
        self.source = source
        self.device, self.dtype = lm.text_emb.weight.device, lm.text_emb.weight.dtype
        self._steppers = OneSlotSteppers(lambda: ReplyStepper(self, 1))
        c = lm.config
        self._silent = {c.existing_text_padding_id, c.existing_text_end_padding_id}

    @classmethod
    def load(cls, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
             checkpoint: str | os.PathLike | None = None) -> Moshi:
        """``checkpoint``: a folder holding the published files, or a hub repo id (default
        kyutai/moshiko-pytorch-bf16; kyutai/moshika-pytorch-bf16 is the female voice, the -q8
        repos their int8 LMs). ``dtype`` (the LM's) defaults to the checkpoint's: bfloat16 on CUDA
        (as the reference), float32 on CPU, int8 for an int8 checkpoint. "int8" / "int4" pack the
        LM's Linears as the reference's q8 export does (zoo.core.quantize: bitsandbytes on a GPU,
        torch's kernels on a CPU), computing in bfloat16; a float dtype runs an int8 checkpoint
        dequantized. Mimi runs in float32 as in the reference (float64 when the LM does, for
        parity checks)."""
        import sentencepiece

        device = pick_device(device)
        info = CheckpointInfo.read(checkpoint or CARD.components["checkpoint"])
        dtype, quantized = precision(dtype, device, info.quantized)
        mimi = load_mimi(info, device, torch.float64 if dtype == torch.float64 else torch.float32)
        lm = load_lm(info, device, dtype, quantized)
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(info.tokenizer_path))
        return cls(mimi, lm, tokenizer, source=str(info.folder))

    def piece(self, token: int) -> str:
        """A text token as the reference server sends it: its SentencePiece piece with "▁" as a
        space; "" for the padding ids and for ids the tokenizer does not have."""
        if token in self._silent or not 0 <= token < self.tokenizer.get_piece_size():
            return ""
        return self.tokenizer.id_to_piece(token).replace("▁", " ")

    # -- half duplex ------------------------------------------------------------------------
    def respond(self, audio: AudioSource, sample_rate: int | None = None,
                options: MoshiOptions | Mapping[str, Any] | None = None,
                history: Sequence[Any] | None = None) -> Iterator[Chunk]:
        """Moshi's answer to ``audio`` (reply.py): ``max_new_tokens`` steps of 80 ms after it."""
        return self._steppers.stream(prepare_reply(self, audio, sample_rate, options))

    def stepper(self, max_sessions: int) -> ReplyStepper:
        return ReplyStepper(self, max_sessions)

    # -- full duplex --------------------------------------------------------------------------
    def duplex(self, options: MoshiOptions | Mapping[str, Any] | None = None) -> OneSlotDuplex:
        stepper = DuplexStepper(self, 1)
        return OneSlotDuplex(stepper, stepper.open(options))

    def duplex_stepper(self, max_sessions: int, *, graphs: bool | None = None) -> DuplexStepper:
        return DuplexStepper(self, max_sessions, graphs=graphs)

    # -- benchmarks ---------------------------------------------------------------------------
    def benchmark_stages(self, audio: np.ndarray, sample_rate: int) -> dict[str, Callable[[], object]]:
        """``encode``: one frame through Mimi's encoder; ``decode_step``: a whole duplex step
        (encode, temporal + depth transformers, decode); ``first_audio``: one frame of codes
        through Mimi's decoder; ``prefill``: respond()'s user turn and first reply frame. Each
        keeps its own state."""
        stepper = DuplexStepper(self, 1)
        handle = stepper.open({"seed": 0})
        rng = np.random.default_rng(0)
        frame = (0.1 * rng.standard_normal(FRAME_SAMPLES)).astype(np.float32)
        x = torch.from_numpy(frame).to(self.device, self.mimi.dtype)[None, None]
        encoding, decoding = self.mimi.streaming_encoder, self.mimi.streaming_decoder
        enc, dec = encoding.new_state(1), decoding.new_state(1)
        codes = torch.zeros(1, self.mimi.num_codebooks, 1, dtype=torch.long, device=self.device)

        def duplex_step() -> None:
            stepper.step([handle], [frame])

        def respond_prefill() -> None:
            reply = prepare_reply(self, audio, sample_rate, {"max_new_tokens": 1})
            next(iter(self._steppers.stream(reply)))

        return {
            Stage.ENCODE: torch.inference_mode()(lambda: encoding.step(enc, x)),
            Stage.PREFILL: respond_prefill,
            Stage.DECODE_STEP: duplex_step,
            Stage.FIRST_AUDIO: torch.inference_mode()(lambda: decoding.step(dec, codes)),
        }
