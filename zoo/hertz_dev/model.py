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

Batched serving (for server.py):

    stepper = model.duplex_stepper(max_sessions=8)           # one set of caches for 8 sessions
    a = stepper.open(options, prompt=None)                    # DuplexHandle (a session slot)
    b = stepper.open(options)
    outs = stepper.step([a, b], [frame_a, frame_b])           # one batched forward for both: per
                                                              #   handle a (2000,) float32 array, or
                                                              #   the Exception that ended (and
                                                              #   closed) that session alone
    stepper.close(a)                                          # frees the slot at once

``step`` runs codec encode, main model, resynthesizer and codec decode for every handle given in
one batched call each; handles join (``open``) and leave (``close``) between steps; any subset of
the open handles may step together. A stepper is not thread-safe: call it from one worker thread.
``model.duplex()`` is a one-slot stepper. ``model.stepper(max_sessions)`` is the same for
``respond()`` (zoo.core.scheduler protocol). Memory: the KV caches take 2 GiB per session slot in
bfloat16 at the default contexts (``main_context`` x 0.5 MiB + ``resynth_context`` x 128 KiB);
smaller contexts cost proportionally less (``stepper.nbytes()`` says what is held). Per step, only
the model channel's output head and resynthesizer path are computed: the reference also predicts
the user's channel and throws it away (so its random draws differ from ours; the deterministic
mode is identical). Measured on an H200, bfloat16, random full-size weights: a step takes about
35 ms for 1 session, 42 ms for 8, 64 ms for 32 (real time is 125 ms); a context slide adds ~75 ms
once per 512 steps for that session.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..core.audio import AudioSource, load_audio, read_audio, resample
from ..core.checkpoints import read_state_dict
from ..core.devices import pick_device, pick_dtype
from ..core.errors import AudioInputError, AudioTooLong, OptionsError, WeightsNotFound
from ..core.scheduler import OneSlotSteppers, isolate
from ..core.types import Chunk, ModelCard, Options, Stage, VoiceModel
from .checkpoint import (
    CODEC_FILE, QUANTIZER_FILE, VARIANT_FILES, build_codec, build_main, build_quantizer, build_resynth,
    resolve,
)
from .codec import FRAME, SAMPLE_RATE, WaveCodec, sample_posterior
from .engine import Engine, Slot
from .transformer import MAIN_CONTEXT, RESYNTH_CONTEXT, HertzLM, LatentQuantizer, Resynthesizer

CARD = ModelCard(
    name="hertz-dev",
    title="Hertz-dev",
    description="Audio-only full-duplex base model (Standard Intelligence): continues or converses in raw "
                "audio, 125 ms frames, no text. Trained on 20M hours of speech (~50% English).",
    input_sample_rate=SAMPLE_RATE,
    output_sample_rate=SAMPLE_RATE,
    languages=("en", "es", "zh"),
    parameters="6.6B main transformer + 1.6B resynthesizer per set (mono / two-speaker) + 94M codec + 50M quantizer",
    hardware="a CUDA GPU with 20 GB+ for one network set in bfloat16 (RTX 4090 in the reference); CPU only for tiny",
    components={"checkpoint": "si-pbc/hertz-dev"},
    max_input_seconds=240.0,
    duplex=True,
    frame_samples=FRAME,
    multi_turn=False,
    text_input=False,
    # the reference server's live protocol (WS /audio; its /set_temperature knob's parameters ->
    # our options), so its inference_client.py works unchanged
    protocols={"data-url-live": {"token_temp": "temperature", "categorical_temp": "categorical_temp",
                                 "gaussian_temp": "gaussian_temp"}},
)

Networks = tuple[HertzLM, Resynthesizer]


@dataclass
class HertzOptions(Options):
    """Defaults are the reference server's temperatures ``TEMPS = (0.8, (0.4, 0.1))``;
    ``max_new_tokens`` counts 125 ms frames (160 = the notebook's 20 s). No top-k / top-p in the
    reference (they apply to the token draw when set)."""

    # 2048 frames (256 s): the reference generates at most one main context (2048 latents, prompt
    # included); replies beyond it would run on slid contexts the model never saw in training, and
    # the cap bounds how long one request holds a session slot.
    MAX_NEW_TOKENS: ClassVar[int] = MAIN_CONTEXT

    temperature: float = 0.8  # token temperature; 0 = deterministic everywhere
    top_k: int | None = None
    top_p: float = 1.0
    max_new_tokens: int = 160
    seed: int = 0
    categorical_temp: float = 0.4  # mixture component choice (0: the most probable)
    gaussian_temp: float = 0.1  # component noise (0: its mean)
    pure_audio_ablation: bool = False  # respond(): the optional no-text-init main model (syrup)

    def validate(self) -> "HertzOptions":
        super().validate()
        for name in ("categorical_temp", "gaussian_temp"):
            if not 0.0 <= getattr(self, name) <= 10.0:
                raise OptionsError(f"{name} must be in [0, 10], got {getattr(self, name)}")
        return self


# -- respond(): half-duplex continuation ---------------------------------------------------------
class Reply:
    """One continuation being generated (a zoo.core.scheduler Job). After (or while) streaming,
    ``prompt_latents`` (1, P, 32) and ``latents`` (list of (32,) tensors) hold what was fed and
    generated, ``tokens`` the sampled FSQ indices."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor, options: HertzOptions) -> None:
        self.mu, self.logvar, self.options = mu, logvar, options
        self.variant = "ablation" if options.pure_audio_ablation else "mono"
        self.max_frames = options.max_new_tokens
        self.prompt_latents: torch.Tensor | None = None
        self.latents: list[torch.Tensor] = []
        self.pending: list[np.ndarray] = []
        self.slot: Slot | None = None
        self.done = False

    @property
    def tokens(self) -> list[int]:
        return [t[0] for t in self.slot.tokens] if self.slot is not None else []

    @property
    def error(self) -> Exception | None:
        return self.slot.error if self.slot is not None else None

    def poll(self) -> Chunk | None:
        if not self.pending:
            return None
        audio, self.pending = np.concatenate(self.pending), []
        return Chunk(audio=audio)


class ReplyStepper:
    """Batched ``respond()`` for zoo.core.scheduler: one engine (KV caches for ``max_sessions``)
    and one streaming-decoder bank per network set, built when first needed."""

    def __init__(self, model: "HertzDev", max_sessions: int, context: int = MAIN_CONTEXT) -> None:
        self.model, self.max_sessions, self.context = model, max_sessions, context
        self.engines: dict[str, tuple[Engine, Any]] = {}

    def _engine(self, variant: str):
        if variant not in self.engines:
            main, resynth = self.model.networks(variant)
            engine = Engine(main, resynth, self.model.quantizer, self.max_sessions, main_context=self.context,
                            resynth_context=self.context, out_channels=(0,), record_tokens=1 << 16)
            self.engines[variant] = (engine, self.model.codec.decoder_state(self.max_sessions))
        return self.engines[variant]

    def prepare(self, audio: AudioSource, sample_rate: int | None, options, history=None) -> Reply:
        """``history`` is not used: Hertz-dev continues the audio it is given. Loads the networks
        of the reply's set if needed (e.g. ``pure_audio_ablation``'s): prepare runs off the
        scheduler thread, so loading stalls no other session; ``start`` then only builds caches."""
        job = self.model.start_reply(audio, sample_rate, options)
        self.model.networks(job.variant)
        return job

    @torch.inference_mode()
    def start(self, job: Reply) -> None:
        """Prefill the prompt, seed the streaming decoder with its last latents, emit frame 1."""
        engine, decoder = self._engine(job.variant)
        job.slot = engine.open(job.options)
        z = job.mu if job.slot.deterministic else sample_posterior(job.mu, job.logvar, job.slot.generator)
        job.prompt_latents = z
        nxt = engine.advance([job.slot], z)
        rows = torch.tensor([job.slot.row], device=engine.device)
        decoder.reset(rows)
        part = decoder.take(rows)
        self.model.codec.decode(z[:, -self.model.codec.decoder_context():], part)  # left context only
        decoder.put(rows, part)
        self._emit(job.variant, [job], nxt)

    @torch.inference_mode()
    def step(self, jobs: list[Reply]) -> None:
        for variant in {j.variant for j in jobs}:
            group = [j for j in jobs if j.variant == variant and not j.done]
            if group:
                engine, _ = self._engine(variant)
                last = torch.stack([j.latents[-1] for j in group])[:, None]
                self._emit(variant, group, engine.advance([j.slot for j in group], last))

    def _emit(self, variant: str, jobs: list[Reply], nxt: torch.Tensor) -> None:
        engine, decoder = self._engine(variant)
        rows = torch.tensor([j.slot.row for j in jobs], device=engine.device)
        part = decoder.take(rows)
        audio = self.model.codec.decode(nxt, part)[:, 0]
        decoder.put(rows, part)
        out = audio.float().clamp(-1, 1).cpu().numpy()
        for job, z, a in zip(jobs, nxt[:, 0], out):
            if job.error is not None:  # its draw failed in this step: this frame is not its output
                job.done = True
                continue
            job.latents.append(z)
            job.pending.append(a)
            if len(job.latents) >= job.max_frames:
                job.done = True

    def release(self, job: Reply) -> None:
        if job.slot is not None and job.variant in self.engines:
            self.engines[job.variant][0].close(job.slot)
        job.done = True


# -- duplex() ----------------------------------------------------------------------------------
@dataclass
class DuplexHandle:
    """One duplex session's slot in a DuplexStepper."""

    slot: Slot
    owner: int = 0  # id() of the stepper that opened it
    steps: int = 0
    closed: bool = False
    model_latents: list[torch.Tensor] = field(default_factory=list)  # last few, for inspection

    @property
    def options(self) -> Options:
        return self.slot.options


class DuplexStepper:
    """Duplex sessions over one set of caches: ``open`` / ``step(handles, frames)`` / ``close``.
    Per slot: main-model and resynthesizer KV rows, a streaming encoder state per channel, a
    streaming decoder state, the model's previous output frame and a generator."""

    def __init__(self, model: "HertzDev", max_sessions: int, *, main_context: int = MAIN_CONTEXT,
                 resynth_context: int = RESYNTH_CONTEXT, keep: float = 0.75) -> None:
        main, resynth = model.networks("split")
        self.model, self.codec = model, model.codec
        self.engine = Engine(main, resynth, model.quantizer, max_sessions, main_context=main_context,
                             resynth_context=resynth_context, out_channels=(1,), keep=keep, record_tokens=8)
        self.device, self.dtype = self.engine.device, self.engine.dtype
        self.encoders = self.codec.encoder_state(2 * max_sessions)  # row 2r: user, 2r + 1: model
        self.decoders = self.codec.decoder_state(max_sessions)
        self.previous = torch.zeros(max_sessions, FRAME, dtype=self.dtype, device=self.device)
        self.max_sessions = max_sessions

    def nbytes(self) -> int:
        """Device memory held for all slots (KV caches, histories excluded)."""
        return self.engine.nbytes() + self.encoders.nbytes() + self.decoders.nbytes()

    def open(self, options: HertzOptions | Mapping[str, Any] | None = None, prompt: AudioSource | None = None,
             sample_rate: int | None = None) -> DuplexHandle:
        opts = self.model.options(options)
        prompt_audio = self.model._duplex_prompt(prompt, sample_rate) if prompt is not None else None
        if prompt_audio is not None and prompt_audio.shape[-1] // FRAME > self.engine.main_context:
            raise AudioInputError(f"the prompt is longer than the {self.engine.main_context}-frame context")
        handle = DuplexHandle(self.engine.open(opts), owner=id(self))
        rows = torch.tensor([handle.slot.row], device=self.device)
        self.encoders.reset(torch.stack([2 * rows, 2 * rows + 1]).T.reshape(-1))
        self.decoders.reset(rows)
        self.previous[rows] = 0
        if prompt_audio is not None:
            try:
                self._prefill(handle, prompt_audio)
                if handle.slot.error is not None:  # its own draws failed on the prompt
                    raise handle.slot.error
            except BaseException:
                self.close(handle)
                raise
        return handle

    @torch.inference_mode()
    def _prefill(self, handle: DuplexHandle, audio: np.ndarray) -> None:
        """The reference server's prompt: both channels encoded, prefilled; the model's first
        latent is decoded (fresh decoder, as the reference) and becomes its next input frame."""
        rows = torch.tensor([handle.slot.row], device=self.device)
        x = torch.from_numpy(audio).to(self.device, self.dtype)[:, None]  # (2, 1, N)
        latents = self._encode([handle], rows, x)  # (1, P, 64)
        nxt = self.engine.advance([handle.slot], latents)
        self._decode(rows, nxt)

    def _encode(self, handles: list[DuplexHandle], rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x (2B, 1, N) rows (user, model) per slot -> latents (B, N / 2000, 64)."""
        enc_rows = torch.stack([2 * rows, 2 * rows + 1]).T.reshape(-1)
        part = self.encoders.take(enc_rows)
        mu, logvar = self.codec.posterior(x, part)
        self.encoders.put(enc_rows, part)
        z = []
        for i, h in enumerate(handles):
            m, lv = mu[2 * i : 2 * i + 2], logvar[2 * i : 2 * i + 2]
            latent = m  # also the placeholder of a session whose draw fails
            if not h.slot.deterministic:
                with isolate(h.slot):
                    latent = sample_posterior(m, lv, h.slot.generator)
            z.append(latent)
        z = torch.stack(z)  # (B, 2, T, 32)
        return torch.cat([z[:, 0], z[:, 1]], dim=-1)

    def _decode(self, rows: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        part = self.decoders.take(rows)
        audio = self.codec.decode(nxt, part)[:, 0]  # (B, 2000)
        self.decoders.put(rows, part)
        self.previous[rows] = audio
        return audio

    @torch.inference_mode()
    def step(self, handles: Sequence[DuplexHandle], frames: Sequence[Any]) -> list[np.ndarray | Exception]:
        """One 125 ms step for every handle: its user frame in, the model's next frame out, or the
        Exception that ended that session (a bad frame, its own sampling failed): its handle is
        closed and the others' frames are what they would be without it. Calling it wrongly
        (closed or foreign handles) or a failure of the batched networks raises for all."""
        if len(handles) != len(frames):
            raise ValueError(f"{len(handles)} sessions but {len(frames)} frames")
        if any(h.closed for h in handles):
            raise RuntimeError("a closed duplex session cannot step")
        if any(h.owner != id(self) for h in handles) or len({h.slot.row for h in handles}) != len(handles):
            raise ValueError("every handle must be a distinct session opened by this stepper")
        if not handles:
            return []
        user_frames = []
        for h, f in zip(handles, frames):
            frame = np.zeros(FRAME, np.float32)  # the placeholder of a refused frame
            with isolate(h.slot):
                frame = user_frame(f)
            user_frames.append(frame)
        user = torch.from_numpy(np.stack(user_frames)).to(self.device, self.dtype)
        rows = torch.tensor([h.slot.row for h in handles], device=self.device)
        x = torch.stack([user, self.previous[rows]], dim=1).reshape(-1, 1, FRAME)
        latents = self._encode(list(handles), rows, x)
        nxt = self.engine.advance([h.slot for h in handles], latents)  # (B, 1, 32)
        audio = self._decode(rows, nxt)
        outputs: list[np.ndarray | Exception] = []
        for h, z, frame in zip(handles, nxt[:, 0], audio.float().clamp(-1, 1).cpu().numpy()):
            if h.slot.error is not None:
                self.close(h)
                outputs.append(h.slot.error)
                continue
            h.steps += 1
            h.model_latents.append(z)
            del h.model_latents[:-8]
            outputs.append(frame)
        return outputs

    def close(self, handle: DuplexHandle) -> None:
        if not handle.closed:
            self.engine.close(handle.slot)
            handle.closed = True


class DuplexSession:
    """``model.duplex()``: one session on a one-slot DuplexStepper of its own."""

    def __init__(self, stepper: DuplexStepper, handle: DuplexHandle) -> None:
        self.stepper, self.handle = stepper, handle

    @property
    def steps(self) -> int:
        return self.handle.steps

    def step(self, frame: np.ndarray) -> Chunk:
        """A refused frame raises and the session goes on; any other failure ends it."""
        (out,) = self.stepper.step([self.handle], [user_frame(frame)])
        if isinstance(out, Exception):
            raise out
        return Chunk(audio=out)

    def close(self) -> None:
        self.stepper.close(self.handle)

    def __enter__(self) -> "DuplexSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def user_frame(frame: Any) -> np.ndarray:
    """One duplex input frame -> (2000,) float32; int PCM is scaled, anything else is refused."""
    array = np.asarray(frame)
    if array.dtype.kind == "i":
        array = array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
    elif array.dtype.kind != "f":
        raise AudioInputError(f"a duplex frame must hold numbers, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False).reshape(-1)
    if array.size != FRAME:
        raise AudioInputError(f"a duplex frame is {FRAME} samples at {SAMPLE_RATE} Hz, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise AudioInputError("the frame contains NaN or infinite samples")
    return array


# -- the model ---------------------------------------------------------------------------------
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
             checkpoint: str | os.PathLike | None = None) -> "HertzDev":
        """Codec and quantizer now; the mono / split networks when first used. ``checkpoint``: a
        folder holding the published files, or a hub repo id (default si-pbc/hertz-dev).
        ``dtype`` defaults to bfloat16 on CUDA (as the reference), float32 on CPU."""
        device = pick_device(device)
        dtype = pick_dtype(dtype, default=torch.bfloat16 if device.type == "cuda" else torch.float32)
        source = checkpoint or CARD.components["checkpoint"]
        _check_local_folder(source)
        folder = resolve(source, (CODEC_FILE, QUANTIZER_FILE))
        codec = build_codec(read_state_dict(folder / CODEC_FILE), dtype=dtype, device=device)
        quantizer = build_quantizer(read_state_dict(folder / QUANTIZER_FILE), dtype=dtype, device=device)

        def networks(variant: str) -> Networks:
            main_file, resynth_file = VARIANT_FILES[variant]
            where = resolve(source, (main_file, resynth_file))
            main = build_main(read_state_dict(where / main_file), dtype=dtype, device=device, file=main_file)
            resynth = build_resynth(read_state_dict(where / resynth_file), dtype=dtype, device=device, file=resynth_file)
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
               sample_rate: int | None = None, main_context: int = MAIN_CONTEXT,
               resynth_context: int = RESYNTH_CONTEXT) -> DuplexSession:
        stepper = DuplexStepper(self, 1, main_context=main_context, resynth_context=resynth_context)
        return DuplexSession(stepper, stepper.open(options, prompt=prompt, sample_rate=sample_rate))

    def duplex_stepper(self, max_sessions: int, *, main_context: int = MAIN_CONTEXT,
                       resynth_context: int = RESYNTH_CONTEXT, keep: float = 0.75) -> DuplexStepper:
        return DuplexStepper(self, max_sessions, main_context=main_context, resynth_context=resynth_context, keep=keep)

    def _duplex_prompt(self, prompt: AudioSource, sample_rate: int | None) -> np.ndarray:
        """A prompt -> (2, N) float32 at 16 kHz, whole frames (the end trimmed, as the
        reference server); stereo is (user, model), mono is used for both."""
        data, rate = read_audio(prompt, sample_rate, max_seconds=self.card.max_input_seconds)
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 1:
            data = np.stack([data, data])
        elif data.ndim == 2:
            data = data.T if data.shape[0] > data.shape[1] else data
            data = np.stack([data[0], data[-1]])
        else:
            raise AudioInputError(f"a prompt must be 1-D or 2-D audio, got shape {data.shape}")
        if not np.all(np.isfinite(data)):
            raise AudioInputError("the prompt contains NaN or infinite samples")
        if data.shape[1] / rate > self.card.max_input_seconds:  # an array given as (channels, samples)
            raise AudioTooLong(f"the prompt is {data.shape[1] / rate:.1f} s; "
                                  f"at most {self.card.max_input_seconds:g} s")
        data = np.stack([resample(channel, rate, SAMPLE_RATE) for channel in data])
        frames = data.shape[1] // FRAME
        if frames < 1:
            raise AudioInputError(f"a prompt needs at least one frame ({FRAME} samples at {SAMPLE_RATE} Hz)")
        return np.ascontiguousarray(data[:, : frames * FRAME])

    # -- benchmarks ---------------------------------------------------------------------------
    def benchmark_stages(self, audio: np.ndarray, sample_rate: int) -> dict[str, Callable[[], object]]:
        """One call per stage, for bench/latency.py. Frame stages of a duplex session (the split
        networks): ``encode`` (both channels' 2000 samples through the codec), ``decode_step`` (a
        whole duplex frame), ``first_audio`` (one latent through the codec decoder), and of its
        parts ``main_step`` and ``resynth_step`` (one position each); ``prefill``: the mono prompt
        of respond() (encode + prefill + first frame). Each keeps its own state; KV positions wrap
        at 512 to stay mid-context."""
        stepper = DuplexStepper(self, 1, main_context=MAIN_CONTEXT, resynth_context=RESYNTH_CONTEXT)
        handle = stepper.open({"seed": 0})
        engine = stepper.engine
        slot = handle.slot
        rng = np.random.default_rng(0)
        frame = (0.1 * rng.standard_normal(FRAME)).astype(np.float32)
        x = torch.from_numpy(np.stack([frame, frame])).to(self.device, self.dtype)[:, None]
        latents = torch.zeros(1, 1, engine.width, dtype=self.dtype, device=self.device)
        tokens = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        enc_state = self.codec.encoder_state(2)
        dec_state = self.codec.decoder_state(1)
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
            Stage.ENCODE: torch.inference_mode()(lambda: self.codec.posterior(x, enc_state)),
            Stage.PREFILL: respond_prefill,
            Stage.DECODE_STEP: duplex_frame,
            Stage.FIRST_AUDIO: torch.inference_mode()(lambda: self.codec.decode(z, dec_state)),
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
