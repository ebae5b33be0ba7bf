"""Hertz-dev (Standard-Intelligence/hertz-dev) behind the zoo interface.

Hertz-dev is an audio-only base model: 16 kHz audio, one 32-dim latent per 2000 samples (125 ms).
Per frame the main transformer predicts the next latent's 15-bit FSQ index, the resynthesizer
turns it into the next continuous latent (a Gaussian mixture), and the codec decodes it.

Which networks: the published files hold two network sets. ``respond()`` uses the mono one
(inference_caraway_112000.pt + inference_whip_72000.pt; with ``pure_audio_ablation=True`` the
optional inference_syrup_110000.pt main model), ``duplex()`` the two-speaker "split" one
(inference_scion_54000.pt + inference_care_50000.pt). ``zoo.load`` loads the codec and the FSQ
quantizer (shared) at once and each set the first time it is used (``preload("mono", "split")``
loads them up front, e.g. at server start).

Half duplex, ``respond(audio)``: the user's audio is the prompt (mono, front-padded with zeros to
whole frames, encoded once, prefilled), the reply is its continuation: ``max_new_tokens`` new
frames of 2000 samples, streamed one Chunk per frame (text is always ""). The audio of the new
frames is decoded with the prompt's latents as left context, so it equals a one-pass decode of
prompt + continuation for those samples. Beyond the reference's 2048-frame total the context
slides instead of stopping.

Full duplex, ``session = model.duplex(options)``; ``chunk = session.step(frame)``: ``frame`` is
2000 float32 samples of the user's audio at 16 kHz (channel 1), the chunk holds the model's next
2000 samples (channel 2). No start-up delay: at step k the model's own input is its output of step
k - 1 (2000 zeros at step 0), re-encoded, as the reference server does. ``prompt=`` (a wav or an
array; stereo = (user, model), mono is duplicated) seeds the session as the reference server's
prompt file. Sessions run for unbounded time: the contexts (2048 main, 8192 resynthesizer
positions) slide, rebuilding the KV caches from the last 3/4 of the context when full.

Batched serving of both (one set of KV caches for many sessions): ``model.stepper(max_sessions)``
for ``respond()`` (reply.py, the zoo.core.scheduler protocol) and
``model.duplex_stepper(max_sessions)`` (duplex.py); ``model.duplex()`` is a one-slot duplex
stepper.

Sampling follows the reference (``next_latent`` / ``temp_sample``): token ``temperature``
(softmax draw), ``categorical_temp`` (Gumbel-max mixture component), ``gaussian_temp`` (component
noise); defaults are the reference server's (0.8, 0.4, 0.1). ``temperature=0`` (any temperature
below zoo.core.sampling.MIN_TEMPERATURE) is deterministic: the codec encoder's posterior mean, the
main model's argmax index, the mixture's most probable component's mean. All randomness comes from
a torch.Generator per session seeded with ``Options.seed`` (the global RNG is never used).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.audio import AudioSource, load_audio
from ..core.checkpoints import read_state_dict
from ..core.devices import pick_device
from ..core.duplex import OneSlotDuplex
from ..core.errors import OptionsError, WeightsNotFound
from ..core.quantize import QUANTIZED, device_precision
from ..core.scheduler import OneSlotSteppers
from ..core.types import Chunk, ModelCard, Stage, VoiceModel
from .checkpoint import (
    CODEC_FILE,
    QUANTIZER_FILE,
    VARIANT_FILES,
    build_codec,
    build_main,
    build_quantizer,
    build_resynth,
    resolve,
)
from .codec import FRAME, SAMPLE_RATE, WaveCodec
from .duplex import SERVER_CONTEXT, DuplexStepper
from .options import HertzOptions
from .quantizer import LatentQuantizer
from .reply import Reply, ReplyStepper
from .transformer import HertzLM, Resynthesizer

CARD = ModelCard(
    name="hertz-dev",
    title="Hertz-dev",
    description="Audio-only full-duplex base model (Standard Intelligence): continues or converses in raw "
                "audio, 125 ms frames, no text. Trained on 20M hours of speech (~50% English).",
    input_sample_rate=SAMPLE_RATE,
    output_sample_rate=SAMPLE_RATE,
    languages=("en", "es", "zh"),
    parameters="6.6B main transformer + 1.6B resynthesizer per set (mono / two-speaker) + 94M codec + 50M quantizer",
    quantizations=QUANTIZED,
    hardware="a CUDA GPU with 20 GB+ for one network set in bfloat16 (RTX 4090 in the reference); dtype int8 / int4 "
             "for smaller cards (one set's weights ≈ 8.7 / 4.9 GB, computed); CPU only for tiny",
    components={"checkpoint": "si-pbc/hertz-dev"},
    download_size="≈ 33 GB, computed: two network sets of ≈ 16.4 GB each (6.6B + 1.6B in bf16; the mono set "
                  "answers respond(), the two-speaker set duplex()) + codec and quantizer ≈ 0.6 GB (fp32)",
    max_input_seconds=240.0,
    reply_tokens_per_second=SAMPLE_RATE / FRAME,  # one 125 ms frame per step
    duplex=True,
    frame_samples=FRAME,
    text_output=False,
    multi_turn=False,
    text_input=False,
    # the reference server's live protocol (WS /audio; its /set_temperature knob's parameters ->
    # our options), so its inference_client.py works unchanged
    protocols={"data-url-live": {"token_temp": "temperature", "categorical_temp": "categorical_temp",
                                 "gaussian_temp": "gaussian_temp"}},
    paper="https://si.inc/hertz-dev/ (the authors' write-up; no paper)",
    license="Apache-2.0 (code: github.com/Standard-Intelligence/hertz-dev, and weights)",
    measured_ttfa="42 ms for a 3 s prompt (respond()) on one H200 "
                  "(bfloat16, random full-size weights, 2026-11-27: bench/results/2026-11-27_h200_gpu.md)",
)

Networks = tuple[HertzLM, Resynthesizer]


class HertzDev(VoiceModel):
    card = CARD
    options_class = HertzOptions

    def __init__(self, codec: WaveCodec, quantizer: LatentQuantizer, networks: Callable[[str], Networks], *,
                 source: str = "") -> None:
        self.codec, self.quantizer = codec, quantizer
        self._build_networks = networks
        self._networks: dict[str, Networks] = {}
        self._lock = threading.Lock()
        self._steppers = OneSlotSteppers(lambda: ReplyStepper(self, 1))
        self.source = source
        weight = quantizer.input.weight
        self.device, self.dtype = weight.device, weight.dtype

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
             checkpoint: str | os.PathLike | None = None) -> HertzDev:
        """Codec and quantizer now; the mono / split networks when first used. ``checkpoint``: a
        folder holding the published files, or a hub repo id (default si-pbc/hertz-dev).
        ``dtype`` defaults to bfloat16 on CUDA (as the reference), float32 on CPU; "int8" / "int4"
        pack the two transformers' blocks (zoo.core.quantize), everything computing in bfloat16."""
        device = pick_device(device)
        dtype, quantized = device_precision(dtype, device)
        source = checkpoint or CARD.components["checkpoint"]
        _check_local_folder(source)
        folder = resolve(source, (CODEC_FILE, QUANTIZER_FILE))
        codec = build_codec(read_state_dict(folder / CODEC_FILE), dtype=dtype, device=device)
        quantizer = build_quantizer(read_state_dict(folder / QUANTIZER_FILE), dtype=dtype, device=device)

        def networks(variant: str) -> Networks:
            main_file, resynth_file = VARIANT_FILES[variant]
            where = resolve(source, (main_file, resynth_file))
            main = build_main(read_state_dict(where / main_file), dtype=dtype, device=device, file=main_file,
                              quantized=quantized)
            resynth = build_resynth(read_state_dict(where / resynth_file), dtype=dtype, device=device,
                                    file=resynth_file, quantized=quantized)
            if main.config.split != (variant == "split") or resynth.config.split != (variant == "split"):
                raise WeightsNotFound(f"{main_file} / {resynth_file} in {where} are not the {variant} networks")
            return main, resynth

        return cls(codec, quantizer, networks, source=str(source))

    def networks(self, variant: str) -> Networks:
        """(main model, resynthesizer) of ``variant`` ("mono", "split" or "ablation"), loaded on
        first use (thread-safe)."""
        if variant not in VARIANT_FILES:
            raise OptionsError(f"unknown network set {variant!r}; one of {sorted(VARIANT_FILES)}")
        with self._lock:
            if variant not in self._networks:
                self._networks[variant] = self._build_networks(variant)
            return self._networks[variant]

    def preload(self, *variants: str) -> None:
        """Load network sets now (default: mono and split), e.g. before serving."""
        for variant in variants or ("mono", "split"):
            self.networks(variant)

    # -- half duplex ------------------------------------------------------------------------
    def respond(self, audio: AudioSource, sample_rate: int | None = None,
                options: HertzOptions | Mapping[str, Any] | None = None,
                history: Sequence[Any] | None = None) -> Iterator[Chunk]:
        """Continue ``audio``: ``max_new_tokens`` frames of 2000 samples, one Chunk each. Hertz-dev
        is a base model trained on single streams: ``history`` is accepted and not used."""
        return self._stream(self.start_reply(audio, sample_rate, options))

    def start_reply(self, audio: AudioSource, sample_rate: int | None = None, options=None) -> Reply:
        """Validate and encode the prompt (posterior mean and log-variance); no model work yet."""
        opts = self.options(options)
        wav = load_audio(audio, sample_rate, target_rate=SAMPLE_RATE, max_seconds=self.card.max_input_seconds)
        wav = np.pad(wav, (-wav.size % FRAME, 0))  # front-pad to whole frames: the reply starts where the user stopped
        x = torch.from_numpy(wav).to(self.device, self.dtype)[None, None]
        with torch.inference_mode():
            mu, logvar = self.codec.posterior(x)
        return Reply(mu, logvar, opts)

    def stepper(self, max_sessions: int) -> ReplyStepper:
        return ReplyStepper(self, max_sessions)

    def _stream(self, reply: Reply) -> Iterator[Chunk]:
        return self._steppers.stream(reply)

    # -- full duplex --------------------------------------------------------------------------
    def duplex(self, options: HertzOptions | Mapping[str, Any] | None = None, *, prompt: AudioSource | None = None,
               sample_rate: int | None = None, main_context: int = SERVER_CONTEXT,
               resynth_context: int = SERVER_CONTEXT) -> OneSlotDuplex:
        stepper = DuplexStepper(self, 1, main_context=main_context, resynth_context=resynth_context)
        return OneSlotDuplex(stepper, stepper.open(options, prompt=prompt, sample_rate=sample_rate))

    def duplex_stepper(self, max_sessions: int, *, main_context: int = SERVER_CONTEXT,
                       resynth_context: int = SERVER_CONTEXT, keep: float = 0.75,
                       graphs: bool | None = None) -> DuplexStepper:
        return DuplexStepper(self, max_sessions, main_context=main_context, resynth_context=resynth_context, keep=keep,
                             graphs=graphs)

    # -- benchmarks ---------------------------------------------------------------------------
    def benchmark_stages(self, audio: np.ndarray, sample_rate: int) -> dict[str, Callable[[], object]]:
        """One call per stage, for bench/latency.py. Frame stages of a duplex session (the split
        networks): ``encode`` (both channels' 2000 samples through the codec), ``decode_step`` (a
        whole duplex frame), ``first_audio`` (one latent through the codec decoder), and of its
        parts ``main_step`` and ``resynth_step`` (one position each); ``prefill``: the mono prompt
        of respond() (encode + prefill + first frame). Each keeps its own state; KV positions wrap
        at 512 to stay mid-context."""
        stepper = DuplexStepper(self, 1)
        handle = stepper.open({"seed": 0})
        engine = stepper.engine
        slot = handle.slot
        rng = np.random.default_rng(0)
        frame = (0.1 * rng.standard_normal(FRAME)).astype(np.float32)
        x = torch.from_numpy(np.stack([frame, frame])).to(self.device, self.dtype)[:, None]
        latents = torch.zeros(1, 1, engine.width, dtype=self.dtype, device=self.device)
        tokens = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        encoding, decoding = self.codec.streaming_encoder, self.codec.streaming_decoder
        enc_state, dec_state = encoding.new_state(2), decoding.new_state(1)
        z = torch.zeros(1, 1, self.codec.config.latent_dim, dtype=self.dtype, device=self.device)

        def wrap() -> None:
            if slot.main_len >= 512 or slot.resynth_len >= 512:
                slot.main_len = slot.resynth_len = 0

        @torch.inference_mode()
        def main_step() -> None:
            wrap()
            engine.main_step([slot], latents)

        @torch.inference_mode()
        def resynth_step() -> None:
            wrap()
            engine.resynth_step([slot], latents, tokens)

        @torch.inference_mode()
        def duplex_frame() -> None:
            wrap()
            stepper.step([handle], [frame])

        def respond_prefill() -> None:
            reply = self.start_reply(audio, sample_rate, {"max_new_tokens": 1})
            next(iter(self._stream(reply)))

        return {
            Stage.ENCODE: torch.inference_mode()(lambda: encoding.step(enc_state, x)),
            Stage.PREFILL: respond_prefill,
            Stage.DECODE_STEP: duplex_frame,
            Stage.FIRST_AUDIO: torch.inference_mode()(lambda: decoding.step(dec_state, z)),
            "main_step": main_step,
            "resynth_step": resynth_step,
        }


def _check_local_folder(source) -> None:
    """A local folder must hold the codec, the quantizer and at least one complete network set
    (one clear error up front instead of at the first reply)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return
    present = {p.name for p in path.iterdir()}
    sets = [v for v, files in VARIANT_FILES.items() if set(files) <= present]
    if {CODEC_FILE, QUANTIZER_FILE} <= present and sets:
        return
    needed = [CODEC_FILE, QUANTIZER_FILE, *VARIANT_FILES["mono"], *VARIANT_FILES["split"]]
    missing = [f for f in needed if f not in present]
    raise WeightsNotFound(
        f"checkpoint: folder {path} lacks {missing} (hertz-dev needs {CODEC_FILE}, {QUANTIZER_FILE} and the mono "
        f"{list(VARIANT_FILES['mono'])} and/or two-speaker {list(VARIANT_FILES['split'])} files of si-pbc/hertz-dev, "
        f"as published). Download them on a machine with network access and pass the folder with `--checkpoint DIR` "
        f"(zoo.load(..., checkpoint=DIR)), or use `--tiny` (random_weights='tiny') for a random-weight smoke test."
    )
