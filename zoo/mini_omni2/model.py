"""Mini-Omni2 behind the zoo interface: Mini-Omni (zoo.mini_omni: the LLM engine, the batch trick,
SNAC streaming, the Whisper front end, typed questions) plus an image with the spoken question,
as the reference's run_vision_AA_batch_stream (CLIP ViT-B/32 features, the ImageQA layout)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from ..core.audio import AudioSource
from ..core.checkpoints import resolve_files
from ..core.devices import pick_device
from ..core.errors import OptionsError, WeightsNotFound
from ..core.image import load_image
from ..core.types import Chunk, ModelCard
from ..mini_omni import whisper
from ..mini_omni.codec import CODEC_FILES, Codec, load_snac
from ..mini_omni.engine import Session
from ..mini_omni.gpt import QUANTIZED, precision
from ..mini_omni.model import (
    CHECKPOINT_FILES,
    WHISPER_FILE,
    MiniOmni,
    MiniOmniOptions,
    Reply,
    ReplyStepper,
    _whisper_file,
    load_gpt,
    load_whisper_encoder,
)
from .clip import CLIP_FILE, VisionTransformer, load_vision, preprocess
from .gpt import VisionGPT, VisionGPTConfig
from .prompts import AUDIO_START, IMAGE_TASK, IMAGE_TOKENS, image_audio_question

CARD = ModelCard(
    name="mini-omni2",
    title="Mini-Omni2",
    description="Speech (and optionally an image) in, streamed speech and text out (Qwen2-0.5B + "
                "Whisper-small encoder + CLIP ViT-B/32 + SNAC 24 kHz); English.",
    input_sample_rate=whisper.SAMPLE_RATE,
    output_sample_rate=24000,
    languages=("en",),
    parameters="0.5B LLM (541M unique params, 2.8 GB fp32 file) + Whisper-small encoder (88M) + "
               "CLIP ViT-B/32 vision tower (88M) + SNAC (20M)",
    quantizations=QUANTIZED,
    hardware="CPU works (slow); any CUDA GPU with 4 GB+ for real time",
    download_size="≈ 3.7 GB: lit_model.pth 2.8 GB (fp32) + Whisper small.pt 0.46 GB (fp16) + CLIP ViT-B-32.pt "
                  "0.34 GB (TorchScript archive, fp16) + SNAC ≈ 0.08 GB",
    components={"checkpoint": "gpt-omni/mini-omni2", "codec": "hubertsiuzdak/snac_24khz"},
    max_input_seconds=30.0,
    reply_tokens_per_second=24000 / 2048,  # one SNAC frame (7 codes, 2048 samples) per step
    multi_turn=False,
    text_input=True,
    image_input=True,
    # the reference server answers /chat in multipart (audio and text parts), and its clients
    # parse that: serving/protocols/chat.py does so by default for this card
    protocols={"chat-multipart": {}},
    paper="https://arxiv.org/abs/2410.11190",
    license="MIT (code: github.com/gpt-omni/mini-omni2; weights: the same license on the hub)",
)


class VisionReplyStepper(ReplyStepper):
    """Mini-Omni's batched stepper; a question with an image gets the ImageQA prompt."""

    model: MiniOmni2

    def prepare(self, audio: AudioSource, sample_rate: int | None, options, history=None, image=None) -> Reply:
        if image is None:
            return super().prepare(audio, sample_rate, options, history)
        return self.model.start_session(IMAGE_TASK.name, audio=audio, sample_rate=sample_rate, options=options,
                                        image=image)[1]


class MiniOmni2(MiniOmni):
    card = CARD
    options_class = MiniOmniOptions

    def __init__(self, gpt: VisionGPT, encoder: whisper.AudioEncoder, vision: VisionTransformer, codec: Codec,
                 tokenizer: Tokenizer) -> None:
        if vision.dims.tokens != IMAGE_TOKENS:  # the prompt layout has exactly 50 image slots
            raise WeightsNotFound(f"the CLIP vision tower gives {vision.dims.tokens} tokens; Mini-Omni2 takes {IMAGE_TOKENS}")
        self.vision = vision
        super().__init__(gpt, encoder, codec, tokenizer)

    @classmethod
    def load(
        cls,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        checkpoint: str | os.PathLike | None = None,
        codec: str | os.PathLike | None = None,
    ) -> MiniOmni2:
        device = pick_device(device)
        dtype, quantized = precision(dtype)
        ckpt = resolve_files(checkpoint or CARD.components["checkpoint"], CHECKPOINT_FILES, component="checkpoint",
                             optional=(WHISPER_FILE, CLIP_FILE))
        codec_dir = resolve_files(codec or CARD.components["codec"], CODEC_FILES, component="codec")
        gpt = load_gpt(ckpt, VisionGPTConfig, VisionGPT).placed(device, dtype, quantized)
        encoder = load_whisper_encoder(_whisper_file(ckpt)).to(device=device, dtype=dtype).eval()
        vision = load_vision(_clip_file(ckpt)).to(device=device, dtype=dtype).eval()
        snac = load_snac(codec_dir, dtype, device)
        tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        return cls(gpt, encoder, vision, Codec(snac), tokenizer)

    # -- the zoo interface --------------------------------------------------------------------
    def respond(
        self,
        audio: AudioSource,
        sample_rate: int | None = None,
        options: MiniOmniOptions | Mapping[str, Any] | None = None,
        history: Sequence[Any] | None = None,
        image: Any = None,
    ) -> Iterator[Chunk]:
        """Answer a spoken question, about ``image`` if one is given (the reference server's
        ImageQA_A + ImageQA_AT batch), else as Mini-Omni (A1A2 + A1T2). Single-turn: ``history``
        is accepted and not used."""
        if image is None:
            return self.generate("A1A2+A1T2", audio=audio, sample_rate=sample_rate, options=options)
        return self.generate(IMAGE_TASK.name, audio=audio, sample_rate=sample_rate, options=options, image=image)

    def stepper(self, max_sessions: int) -> VisionReplyStepper:
        return VisionReplyStepper(self, max_sessions)

    def start_session(self, task: str, *, audio=None, sample_rate=None, text=None, options=None,
                      image=None) -> tuple[Session, Reply]:
        if task != IMAGE_TASK.name:
            if image is not None:
                raise OptionsError(f"task {task} takes no image; the image task is {IMAGE_TASK.name}")
            return super().start_session(task, audio=audio, sample_rate=sample_rate, text=text, options=options)
        opts = self.options(options)
        if audio is None or image is None:
            raise OptionsError(f"task {task} needs audio and an image")
        pixels = self.encode_image(image)  # a bad image is refused before the audio is decoded
        features = self.encode_audio(audio, sample_rate)
        prompt = image_audio_question(features.size(1))
        room = self.gpt.config.block_size - prompt.size(-1)
        session = Session(IMAGE_TASK, prompt, features, opts, max_outputs=min(opts.max_new_tokens, room),
                          audio_start=AUDIO_START, image_features=pixels)
        return session, Reply(session, self.tokenizer, self.codec, opts)

    def image_pixels(self, image: Any) -> torch.Tensor:
        """Any image -> CLIP's input (1, 3, 224, 224), float32 as the reference's transform."""
        return preprocess(load_image(image), self.vision.dims.input_resolution)[None]

    def encode_image(self, image: Any) -> torch.Tensor:
        """Any image -> CLIP features (1, 50, 512): every token, as the reference's CLIP fork."""
        weight = self.vision.conv1.weight
        with torch.inference_mode():
            return self.vision(self.image_pixels(image).to(weight.device, weight.dtype))

    def benchmark_stages(self, audio: np.ndarray, sample_rate: int) -> dict[str, Callable[[], object]]:
        """Mini-Omni's stages, and the image path: CLIP encoding and the prefill of an image question."""
        stages = super().benchmark_stages(audio, sample_rate)
        image = np.full((224, 224, 3), 128, np.uint8)
        session_args = self.start_session(IMAGE_TASK.name, audio=audio, sample_rate=sample_rate, image=image)[0]
        engine_session = dict(task=IMAGE_TASK, prompt=session_args.prompt, features=session_args.features,
                              options=session_args.options, max_outputs=self.gpt.config.block_size,
                              audio_start=AUDIO_START, image_features=session_args.image_features)
        stepper = self.stepper(1)

        def image_prefill() -> None:
            session = Session(**engine_session)
            stepper.engine.start(session)
            stepper.engine.release(session)

        stages["image_encode"] = lambda: self.encode_image(image)
        stages["image_prefill"] = image_prefill
        return stages


def _clip_file(ckpt: Path) -> Path:
    """ViT-B-32.pt: in the checkpoint folder (as the reference looks first), else the clip
    package's download folder (where the reference's clip.load("ViT-B/32") keeps it)."""
    if (ckpt / CLIP_FILE).is_file():
        return ckpt / CLIP_FILE
    cache = Path.home() / ".cache" / "clip" / CLIP_FILE
    if cache.is_file():
        return cache
    raise WeightsNotFound(
        f"CLIP ViT-B/32: no {CLIP_FILE} in {ckpt} or {cache.parent}; put OpenAI's ViT-B-32.pt (the file the "
        f"clip package downloads for 'ViT-B/32') in the checkpoint folder"
    )
