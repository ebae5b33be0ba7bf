"""GLM-4-Voice's audio decoder: speech tokens (12.5 Hz, 16384 codes) -> 22050 Hz audio, from the
published ``THUDM/glm-4-voice-decoder`` folder (``config.yaml``, ``flow.pt``, ``hift.pt``) unchanged.

    decoder = AudioDecoder.load(folder, device="cpu", dtype=torch.float32)
    audio = decoder.one_pass(tokens)            # np.float32, mel_frames(len(tokens)) * 256 samples

    stream = decoder.stream()                   # mode="seamless" (default) or "reference"
    for block in blocks:                        # e.g. 10, 25, 50, 100, 150, 200, 200, ... tokens
        play(stream.push(block))                # the new samples this block makes final
    play(stream.finish(last_block))             # the last (possibly partial or empty) block and the tail

``one_pass`` is the reference's ``AudioDecoder.token2wav(tokens, finalize=True)`` without a prompt:
the flow (``flow.py``) and the vocoder (``hift.py``) each run once over the whole sequence.

Streaming modes:

``"reference"``
    ``flow_inference.AudioDecoder.token2wav`` driven as ``web_demo.py`` drives it: each block is
    decoded with all earlier tokens as the prompt and all earlier returned mels as the prompt mel
    (including the extra HiFT-cache frame each returned mel starts with), a 34-frame Hamming
    cross-fade, a 1-frame/256-sample HiFT cache, and the last 256 samples of non-final blocks
    dropped (they come back with the next block). Push the last block with ``finish(block)``,
    as the reference does on ``<|user|>``. Its cost per block grows with the history, and
    ``finish()`` without a block (the reply hit the token limit) returns the held-back tail the
    reference would lose.

``"seamless"`` (default)
    Bounded cost per block, no lost samples (total = ``one_pass`` length), close to ``one_pass``:

    * flow: each block is decoded together with a bounded left context of earlier tokens
      (``context_tokens``, rounded down to whole 10-token encoder blocks so the block-causal
      mask lines up as in one pass). The last ``holdback_frames`` mel frames stay provisional:
      the next block regenerates them with more right context, and the first
      ``crossfade_frames`` of them are blended from the old to the new version (linear,
      summing to 1). ``prompt=True`` also conditions the flow on the committed mel of the context
      frames, as the reference does.
    * vocoder: committed mel is vocoded with ``receptive_field_frames`` (27) of mel before what
      is emitted and ``vocoder_lookahead_frames`` (8) after it; the source (sine harmonics)
      carries its phase and its cached samples across blocks, so the chunked vocoding equals one
      vocoder pass over the same mel (exactly with a 27-frame lookahead, to -55 dB with 8).
    * randomness: the noise is indexed by frame / sample (drawn in fixed chunks), so a frame
      gets the same noise whichever block produces it; ``one_pass(tokens, randomness="stream")``
      decodes with exactly this noise, which isolates the streaming error from the noise.
      (The reference's noise, ``randn(1, 80, frames)`` after ``torch.manual_seed(42)``, depends on
      the total length, which a stream does not know.)

Randomness never touches torch's global RNG: each decode uses local ``torch.Generator``s, seeded
with ``seed`` (42 by default, the reference's ``torch.manual_seed(42)`` on every call). In
``"reference"`` randomness they yield the reference's numbers in its order: the flow noise
``randn_like(mu)`` (network dtype), then the vocoder's initial harmonic phases (``rand``, CPU
generator) and its source noise (``randn``); the reference's last draw (a noise branch whose value
is never used) is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn.utils import parametrize

from ..core.checkpoints import load_strict
from ..core.errors import WeightsNotFound
from .decoder_config import DecoderConfig, read_config
from .flow import MaskedDiffWithXvec, mel_frames
from .hift import HiFTGenerator, module_to_published_keys, published_to_module_keys, receptive_field_frames, source_dtype

DECODER_FILES = ("config.yaml", "flow.pt", "hift.pt")
SAMPLE_RATE = 22050
DEFAULT_SEED = 42  # the reference reseeds torch with 42 on every decoder call

# flow_inference.AudioDecoder's streaming constants
REFERENCE_OVERLAP_FRAMES = 34  # int(5 tokens / 12.5 * 22050 / 256)
REFERENCE_CACHE_FRAMES = 1  # mel frames (and 256 source samples) carried into the next HiFT call


# -- loading ------------------------------------------------------------------------------------


def build_modules(config: DecoderConfig, device=None) -> tuple[MaskedDiffWithXvec, HiFTGenerator]:
    with torch.device(device or "cpu"):
        return MaskedDiffWithXvec(config.flow), HiFTGenerator(config.hift)


def hift_published_state(hift: HiFTGenerator) -> dict:
    """The vocoder's state dict under the published (legacy weight-norm) names."""
    return module_to_published_keys(hift.state_dict())


# -- randomness ---------------------------------------------------------------------------------


def _uniform_phases(generator: torch.Generator, harmonics: int, dtype: torch.dtype) -> torch.Tensor:
    """``Uniform(-pi, pi).sample((1, H, 1))`` with the fundamental's phase set to 0 (SineGen)."""
    low, high = torch.tensor(-np.pi, dtype=dtype), torch.tensor(np.pi, dtype=dtype)
    rand = torch.rand((1, harmonics, 1), generator=generator, dtype=dtype, device=generator.device)
    phases = low.to(rand.device) + rand * (high - low).to(rand.device)
    phases[:, 0] = 0
    return phases


class ReferenceRandomness:
    """The numbers one reference decoder call draws after ``torch.manual_seed(seed)``, in order."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device).manual_seed(seed)
        # manual_seed seeds the CPU and the CUDA generators; the phases come from the CPU one
        self.cpu = self.generator if device.type == "cpu" else torch.Generator().manual_seed(seed)

    def flow_noise(self, channels: int, frames: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn((1, channels, frames), generator=self.generator, device=self.device, dtype=dtype)

    def phases(self, harmonics: int, dtype: torch.dtype) -> torch.Tensor:
        return _uniform_phases(self.cpu, harmonics, dtype).to(self.device)

    def source_noise(self, harmonics: int, samples: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn((1, harmonics, samples), generator=self.generator, device=self.device, dtype=dtype)


class ChunkedNoise:
    """An endless standard-normal sequence laid out as (rows, per_frame) per frame, drawn
    ``chunk`` frames at a time: the values of a frame do not depend on how callers slice."""

    def __init__(self, generator: torch.Generator, rows: int, per_frame: int, dtype: torch.dtype, chunk: int = 64) -> None:
        self.generator, self.rows, self.per_frame, self.dtype, self.chunk = generator, rows, per_frame, dtype, chunk
        self.first = 0  # frame index of cache[:, 0]
        self.cache = torch.empty(rows, 0, device=generator.device, dtype=dtype)

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """(1, rows, (stop - start) * per_frame)."""
        if start < self.first:
            raise RuntimeError(f"noise for frame {start} was already released (kept from frame {self.first})")
        while self.first + self.cache.size(1) // self.per_frame < stop:
            block = torch.randn((self.chunk, self.rows, self.per_frame), generator=self.generator,
                                device=self.generator.device, dtype=self.dtype)
            self.cache = torch.cat([self.cache, block.permute(1, 0, 2).reshape(self.rows, -1)], dim=1)
        a, b = (start - self.first) * self.per_frame, (stop - self.first) * self.per_frame
        return self.cache[None, :, a:b]

    def release(self, before: int) -> None:
        """Forget the frames before ``before`` (streams call this to keep memory bounded)."""
        drop = max(0, min(before - self.first, self.cache.size(1) // self.per_frame))
        self.cache = self.cache[:, drop * self.per_frame :]
        self.first += drop


class StreamRandomness:
    """Frame-indexed noise for streaming: flow noise per mel frame, source noise per sample and
    one set of initial harmonic phases, from two generators seeded ``seed`` and ``seed + 1``."""

    def __init__(self, seed: int, device: torch.device, channels: int, harmonics: int, samples_per_frame: int,
                 state_dtype: torch.dtype) -> None:
        flow_generator = torch.Generator(device).manual_seed(seed)
        source_generator = torch.Generator(device).manual_seed(seed + 1)
        self.phases = _uniform_phases(source_generator, harmonics, state_dtype)
        self.flow = ChunkedNoise(flow_generator, channels, 1, state_dtype)
        self.source = ChunkedNoise(source_generator, harmonics, samples_per_frame, state_dtype)


# -- the decoder --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeamlessOptions:
    """Knobs of the ``"seamless"`` stream (see the module docstring)."""

    context_tokens: int = 20  # earlier tokens decoded again with each block (<= this + 9, block-aligned)
    holdback_frames: int = 34  # mel frames left provisional at the end of a block (the reference's 5-token overlap)
    crossfade_frames: int = 16  # of those, frames blended from the old to the regenerated version
    prompt: bool = False  # also condition the flow on the committed mel of the context frames
    # mel frames the vocoder waits for after the last frame it emits: the f0 predictor reaches 5
    # frames, and the phase carried to the next block needs exact f0 (8: -55 dB at the seams on
    # the tiny checkpoint; receptive_field_frames (27) makes the chunks equal one pass exactly)
    vocoder_lookahead_frames: int = 8


class AudioDecoder:
    def __init__(self, flow: MaskedDiffWithXvec, hift: HiFTGenerator, seed: int = DEFAULT_SEED) -> None:
        self.flow, self.hift, self.seed = flow.eval(), hift.eval(), seed
        weight = flow.encoder_proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.sample_rate = hift.config.sampling_rate
        self.samples_per_frame = hift.samples_per_frame
        self.mel_channels = flow.config.output_size
        self.harmonics = hift.config.nb_harmonics + 1
        self.state_dtype = source_dtype(self.dtype)

    @classmethod
    def load(cls, folder: str | Path, device=None, dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED) -> "AudioDecoder":
        """``folder`` holds the published files: config.yaml, flow.pt, hift.pt."""
        folder = Path(folder)
        missing = [name for name in DECODER_FILES if not (folder / name).is_file()]
        if missing:
            raise WeightsNotFound(f"{folder}: missing {', '.join(missing)} (the THUDM/glm-4-voice-decoder files: "
                                  f"{', '.join(DECODER_FILES)}); download that repository or pass its folder")
        config = read_config(folder / "config.yaml")
        flow, hift = build_modules(config, device="meta")
        hint = f"the published layout for {folder / 'config.yaml'}"
        load_strict(flow, folder / "flow.pt", hint)
        load_strict(hift, folder / "hift.pt", hint, rename=published_to_module_keys, published=module_to_published_keys)
        device = torch.device(device or "cpu")
        return cls(flow.to(device=device, dtype=dtype), hift.to(device=device, dtype=dtype), seed)

    def num_samples(self, n_tokens: int) -> int:
        """Samples ``one_pass`` returns for ``n_tokens`` tokens."""
        return mel_frames(n_tokens, self.flow.config.input_frame_rate) * self.samples_per_frame

    def _tokens(self, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1).to(self.device)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.flow.config.vocab_size):
            raise ValueError(f"speech token ids must be in [0, {self.flow.config.vocab_size})")
        return tokens

    def _empty_mel(self) -> torch.Tensor:
        return torch.zeros(1, self.mel_channels, 0, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def one_pass(self, tokens: Sequence[int] | torch.Tensor, *, seed: int | None = None, randomness: str = "reference",
                 return_mel: bool = False):
        """All tokens through the flow and the vocoder at once -> np.float32 audio at 22050 Hz
        (and the mel (80, frames) if ``return_mel``: float64 in float64 runs, else float32).
        ``randomness="reference"`` draws the reference's noise (``token2wav(..., finalize=True)``);
        ``"stream"`` the frame-indexed noise of a seamless stream with the same seed."""
        seed = self.seed if seed is None else seed
        tokens = self._tokens(tokens)
        frames = self.flow.mel_frames(tokens.size(1))
        if frames == 0:
            audio, mel = np.zeros(0, np.float32), np.zeros((self.mel_channels, 0), np.float32)
            return (audio, mel) if return_mel else audio
        if randomness == "reference":
            rnd = ReferenceRandomness(seed, self.device)
            mel = self.flow(tokens, self._empty_mel(), rnd.flow_noise(self.mel_channels, frames, self.dtype)).to(self.dtype)
            phases = rnd.phases(self.harmonics, self.state_dtype)
            noise = rnd.source_noise(self.harmonics, frames * self.samples_per_frame, self.state_dtype)
            with parametrize.cached():
                audio, _ = self.hift(mel, phases, noise)
        elif randomness == "stream":
            rnd = self._stream_randomness(seed)
            mel = self.flow(tokens, self._empty_mel(), rnd.flow.frames(0, frames)).to(self.dtype)
            vocoder = SeamlessVocoder(self.hift, rnd, lookahead=0)
            audio = vocoder.push(mel, final=True)
        else:
            raise ValueError(f"randomness must be 'reference' or 'stream', not {randomness!r}")
        audio = audio[0].float().cpu().numpy()
        return (audio, mel[0].to(self.state_dtype).cpu().numpy()) if return_mel else audio

    def _stream_randomness(self, seed: int) -> StreamRandomness:
        return StreamRandomness(seed, self.device, self.mel_channels, self.harmonics, self.samples_per_frame,
                                self.state_dtype)

    def stream(self, mode: str = "seamless", *, seed: int | None = None, **options) -> "DecoderStream":
        """A streaming decode: ``push(tokens)`` per block, then ``finish(last_tokens)``.
        ``options`` are :class:`SeamlessOptions` fields (seamless mode only)."""
        seed = self.seed if seed is None else seed
        if mode == "reference":
            if options:
                raise ValueError(f"the reference stream takes no options, got {sorted(options)}")
            return ReferenceStream(self, seed)
        if mode == "seamless":
            return SeamlessStream(self, seed, replace(SeamlessOptions(), **options))
        raise ValueError(f"mode must be 'seamless' or 'reference', not {mode!r}")


# -- streams ------------------------------------------------------------------------------------


class DecoderStream:
    """One utterance being decoded block by block. Not thread-safe; one per reply."""

    finished = False

    def push(self, tokens: Sequence[int]) -> np.ndarray:
        """Decode a block of tokens; returns the samples it makes final (np.float32, may be empty)."""
        self._check_open()
        with torch.inference_mode():
            return self._decode(list(tokens), final=False)

    def finish(self, tokens: Sequence[int] = ()) -> np.ndarray:
        """Decode the last block (may be empty) and return every remaining sample."""
        self._check_open()
        self.finished = True
        with torch.inference_mode():
            return self._decode(list(tokens), final=True)

    def _check_open(self) -> None:
        if self.finished:
            raise RuntimeError("this decoder stream is finished")

    def _decode(self, tokens: list[int], final: bool) -> np.ndarray:
        raise NotImplementedError


def _numpy(audio: torch.Tensor) -> np.ndarray:
    return audio.reshape(-1).float().cpu().numpy()


class ReferenceStream(DecoderStream):
    """``token2wav`` + the ``web_demo.py`` loop, number for number."""

    def __init__(self, decoder: AudioDecoder, seed: int) -> None:
        self.decoder, self.seed = decoder, seed
        self.prompt_tokens: list[int] = []
        self.returned_mels: list[torch.Tensor] = []
        self.overlap: torch.Tensor | None = None  # the last 34 frames of the previous block, not vocoded
        self.cache_mel: torch.Tensor | None = None  # the last vocoded frame, vocoded again next time
        self.cache_source: torch.Tensor | None = None  # its 256 source samples
        self.window = torch.from_numpy(np.hamming(2 * REFERENCE_OVERLAP_FRAMES))  # float64, as numpy gives it

    def _decode(self, tokens: list[int], final: bool) -> np.ndarray:
        d = self.decoder
        if not tokens:
            if not final:
                return np.zeros(0, np.float32)
            return _numpy(self._flush())
        rnd = ReferenceRandomness(self.seed, d.device)
        prompt_mel = torch.cat(self.returned_mels, dim=-1) if self.returned_mels else d._empty_mel()
        all_tokens = d._tokens(self.prompt_tokens + tokens)
        frames = d.flow.mel_frames(all_tokens.size(1))
        noise = rnd.flow_noise(d.mel_channels, frames, d.dtype)
        mel = d.flow(all_tokens, prompt_mel, noise).to(d.dtype)[:, :, prompt_mel.size(-1):]
        if self.overlap is not None:
            mel = self._fade(mel, self.overlap)
        source_cache = None
        if self.cache_mel is not None:
            mel, source_cache = torch.cat([self.cache_mel, mel], dim=2), self.cache_source
        if final:
            audio, _ = self._vocode(rnd, mel, source_cache)
            self.overlap = self.cache_mel = self.cache_source = None
        else:
            if mel.size(-1) <= REFERENCE_OVERLAP_FRAMES:
                raise ValueError(f"a {len(tokens)}-token block is too short for the reference stream, which holds back "
                                 f"{REFERENCE_OVERLAP_FRAMES} mel frames of every non-final block (use 6 tokens or more, "
                                 f"or the seamless stream)")
            self.overlap, mel = mel[:, :, -REFERENCE_OVERLAP_FRAMES:], mel[:, :, :-REFERENCE_OVERLAP_FRAMES]
            audio, source = self._vocode(rnd, mel, source_cache)
            self.cache_mel = mel[:, :, -REFERENCE_CACHE_FRAMES:]
            self.cache_source = source[:, :, -REFERENCE_CACHE_FRAMES * d.samples_per_frame :]
            audio = audio[:, : -REFERENCE_CACHE_FRAMES * d.samples_per_frame]
        # web_demo.py: the prompt mel is the concatenation of what token2wav returned
        self.returned_mels.append(mel)
        self.prompt_tokens += tokens
        return _numpy(audio)

    def _vocode(self, rnd: ReferenceRandomness, mel: torch.Tensor, source_cache):
        d = self.decoder
        phases = rnd.phases(d.harmonics, d.state_dtype)
        noise = rnd.source_noise(d.harmonics, mel.size(-1) * d.samples_per_frame, d.state_dtype)
        with parametrize.cached():
            return d.hift(mel, phases, noise, source_cache)

    def _fade(self, mel: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """fade_in_out: new[:34] * w[:34] + old[-34:] * w[34:] (computed in float64, as numpy's
        window promotes it). A block shorter than 34 frames (the reference would fail) fades what
        it has."""
        n = min(REFERENCE_OVERLAP_FRAMES, mel.size(-1))
        w = self.window.to(mel.device)
        faded = mel[..., :n].double() * w[:n] + old[..., -REFERENCE_OVERLAP_FRAMES:][..., :n].double() * \
            w[REFERENCE_OVERLAP_FRAMES : REFERENCE_OVERLAP_FRAMES + n]
        mel = mel.clone()
        mel[..., :n] = faded.to(mel.dtype)
        return mel

    def _flush(self) -> torch.Tensor:
        """No final block (the reply ended without ``<|user|>``): vocode the held-back frames as a
        final call with no new mel would (the reference has no such path and loses them)."""
        d = self.decoder
        if self.overlap is None:
            return torch.zeros(1, 0)
        mel = torch.cat([self.cache_mel, self.overlap], dim=2)
        audio, _ = self._vocode(ReferenceRandomness(self.seed, d.device), mel, self.cache_source)
        self.overlap = self.cache_mel = self.cache_source = None
        return audio


class SeamlessVocoder:
    """Chunked HiFT that equals one pass over the concatenated mel: each call vocodes the newly
    committed mel with ``context`` frames of mel before what it emits (default: the receptive
    field) and ``lookahead`` frames after it (held back until the next call or the end), the
    cached source of the emitted frames on the left, and the harmonic phase carried in float64."""

    def __init__(self, hift: HiFTGenerator, rnd: StreamRandomness, lookahead: int | None = None,
                 context: int | None = None) -> None:
        self.hift, self.rnd = hift, rnd
        self.context = receptive_field_frames(hift.config) if context is None else context
        self.lookahead = self.context if lookahead is None else lookahead
        self.spf = hift.samples_per_frame
        self.mel: torch.Tensor | None = None  # committed mel from frame self.mel_start on
        self.mel_start = 0
        self.emitted = 0  # frames whose samples are out
        self.source: torch.Tensor | None = None  # source samples of the emitted frames kept as left context
        self.cycles = None  # (1, H, 1) float64: harmonic phase (cycles) at the start of frame self.emitted

    def push(self, mel: torch.Tensor, final: bool) -> torch.Tensor:
        """Append committed mel (1, 80, n); returns the samples that are now final (1, k*256)."""
        h = self.hift
        self.mel = mel if self.mel is None else torch.cat([self.mel, mel], dim=2)
        end = self.mel_start + self.mel.size(-1)  # committed frames
        target = end if final else end - self.lookahead
        if target <= self.emitted:
            return mel.new_zeros(1, 0)
        start = max(self.mel_start, self.emitted - self.context)
        window = self.mel[:, :, start - self.mel_start :]
        with parametrize.cached():
            f0 = h.f0_predictor(window)[:, self.emitted - start :]
            frequencies = h.harmonic_frequencies(f0).double()
            carry = 0 if self.cycles is None else self.cycles
            cycles = (carry + torch.cumsum(frequencies, dim=-1)) % 1
            noise = self.rnd.source.frames(self.emitted, end)
            new_source = h.source(f0, cycles.to(source_dtype(window.dtype)), self.rnd.phases, noise)
            left = self.source[:, :, (start - self.emitted) * self.spf :] if self.source is not None and start < self.emitted \
                else new_source[:, :, :0]
            source = torch.cat([left, new_source], dim=2)
            audio = h.filter(window, source)
        done = (target - self.emitted) * self.spf
        out = audio[:, (self.emitted - start) * self.spf : (target - start) * self.spf]
        self.cycles = cycles[:, :, done - 1 : done]
        keep_from = max(start, target - self.context)
        self.source = source[:, :, (keep_from - start) * self.spf : (target - start) * self.spf]
        self.emitted = target
        self.rnd.source.release(target)
        drop = max(0, target - self.context - self.mel_start)
        self.mel, self.mel_start = self.mel[:, :, drop:], self.mel_start + drop
        return out


class SeamlessStream(DecoderStream):
    def __init__(self, decoder: AudioDecoder, seed: int, options: SeamlessOptions) -> None:
        self.decoder, self.options = decoder, options
        if options.crossfade_frames > options.holdback_frames:
            raise ValueError("crossfade_frames cannot exceed holdback_frames")
        self.rnd = decoder._stream_randomness(seed)
        self.vocoder = SeamlessVocoder(decoder.hift, self.rnd, lookahead=options.vocoder_lookahead_frames)
        self.tokens: list[int] = []  # the tail of the tokens, from token self.token_start on
        self.token_start = 0
        self.n_tokens = 0
        self.committed: torch.Tensor = decoder._empty_mel()  # committed mel kept as context, from frame committed_start
        self.committed_start = 0
        self.provisional: torch.Tensor = decoder._empty_mel()  # frames after the committed ones, from the last block

    @property
    def committed_end(self) -> int:
        return self.committed_start + self.committed.size(-1)

    def _decode(self, tokens: list[int], final: bool) -> np.ndarray:
        d, o = self.decoder, self.options
        self.tokens += tokens
        self.n_tokens += len(tokens)
        total_frames = d.flow.mel_frames(self.n_tokens)
        committed_end = self.committed_end
        if tokens and total_frames > committed_end:
            mel = self._generate(committed_end, total_frames)
            commit = total_frames if final else max(committed_end, total_frames - o.holdback_frames)
            new, self.provisional = mel[:, :, : commit - committed_end], mel[:, :, commit - committed_end :]
        elif final:  # no new tokens: the held-back frames become final as they are
            new, self.provisional = self.provisional, d._empty_mel()
        else:
            return np.zeros(0, np.float32)
        self.committed = torch.cat([self.committed, new], dim=2)
        audio = self.vocoder.push(new, final)
        self._trim()
        return _numpy(audio)

    def _window_start(self, committed_end: int, total_frames: int) -> int:
        """The first token of the flow window: ``context_tokens`` before the token at the commit
        point, rounded down to a whole encoder block (so the block-causal mask lines up as in one
        pass), and far enough back that the window's frames reach the first uncommitted frame."""
        d, o = self.decoder, self.options
        block = d.flow.config.encoder_block_size
        commit_token = min(self.n_tokens, committed_end * self.n_tokens // max(total_frames, 1))
        first = max(0, (commit_token - o.context_tokens) // block * block)
        while first > 0 and total_frames - d.flow.mel_frames(self.n_tokens - first) > committed_end:
            first -= block
        return max(first, 0)

    def _generate(self, committed_end: int, total_frames: int) -> torch.Tensor:
        """Mel for global frames [committed_end, total_frames) from a window of tokens."""
        d, o = self.decoder, self.options
        first = self._window_start(committed_end, total_frames)
        if first < self.token_start:
            raise RuntimeError(f"token {first} was already released (kept from {self.token_start})")
        window_tokens = d._tokens(self.tokens[first - self.token_start :])
        window_frames = d.flow.mel_frames(window_tokens.size(1))
        offset = total_frames - window_frames  # global index of the window's first frame
        if offset > committed_end:
            raise RuntimeError("the token window does not reach back to the commit point")
        known = committed_end - offset  # window frames already committed
        prompt = self.committed[:, :, offset - self.committed_start :] if o.prompt else d._empty_mel()
        noise = self.rnd.flow.frames(offset, total_frames)
        mel = d.flow(window_tokens, prompt, noise).to(d.dtype)[:, :, known:]
        # blend the provisional frames of the previous block into their regenerated version
        n = min(o.crossfade_frames, self.provisional.size(-1), mel.size(-1))
        if n:
            ramp = (torch.arange(n, device=mel.device, dtype=torch.float64) + 0.5) / n
            blended = self.provisional[..., :n].double() * (1 - ramp) + mel[..., :n].double() * ramp
            mel = torch.cat([blended.to(mel.dtype), mel[..., n:]], dim=2)
        return mel

    def _trim(self) -> None:
        """Keep only the tokens, mel and noise the next window can reach (the commit point only
        moves forward, so the next window starts about where this one would)."""
        d = self.decoder
        total_frames = d.flow.mel_frames(self.n_tokens)
        # one block of slack: the frame<->token rounding can move the next window back a block
        block = d.flow.config.encoder_block_size
        first = max(0, self._window_start(self.committed_end, total_frames) - block)
        if first > self.token_start:
            self.tokens = self.tokens[first - self.token_start :]
            self.token_start = first
        # a window starting at token `first` starts at frame >= mel_frames(first) (floor is superadditive)
        keep_frames = d.flow.mel_frames(first)
        if keep_frames > self.committed_start:
            self.committed = self.committed[:, :, keep_frames - self.committed_start :]
            self.committed_start = keep_frames
        self.rnd.flow.release(keep_frames)
