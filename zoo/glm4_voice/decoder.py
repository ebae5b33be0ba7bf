"""GLM-4-Voice's audio decoder: speech tokens (12.5 Hz, 16384 codes) -> 22050 Hz audio, from the
published ``THUDM/glm-4-voice-decoder`` folder (``config.yaml``, ``flow.pt``, ``hift.pt``) unchanged.

    decoder = AudioDecoder.load(folder, device="cpu", dtype=torch.float32)
    audio = decoder.one_pass(tokens)            # np.float32, mel_frames(len(tokens)) * 256 samples

    # zoo.core.streaming
    stream = decoder.new_state()                # mode="seamless" (default) or "reference"
    for block in blocks:                        # e.g. 10, 25, 50, 100, 150, 200, 200, ... tokens
        play(decoder.step(stream, block))       # the new samples this block makes final
    play(decoder.finish(stream, last_block))    # the last (possibly partial or empty) block and the tail

``one_pass`` is the reference's ``AudioDecoder.token2wav(tokens, finalize=True)`` without a prompt:
the flow (``flow.py``) and the vocoder (``hift.py``) each run once over the whole sequence.

Streaming modes (``stream(mode)``): ``"seamless"`` (default; bounded cost per block, no lost
samples, close to ``one_pass``: decoder_seamless.py) and ``"reference"`` (the reference web
demo's stream, number for number: decoder_stream.py). Where the noise comes from, and how it
stays off torch's global RNG: decoder_noise.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize

from ..core.checkpoints import load_strict
from ..core.errors import WeightsNotFound
from ..core.graphs import ShapeGraphs
from ..core.streaming import StreamingModule, one_row_only
from .decoder_config import DecoderConfig, read_config
from .decoder_noise import ReferenceRandomness, StreamRandomness
from .decoder_seamless import SeamlessOptions, SeamlessStream, SeamlessVocoder
from .decoder_stream import DecoderStream, ReferenceStream
from .flow import MaskedDiffWithXvec, mel_frames
from .hift import HiFTGenerator, module_to_published_keys, published_to_module_keys, source_dtype

DECODER_FILES = ("config.yaml", "flow.pt", "hift.pt")
DEFAULT_SEED = 42  # the reference reseeds torch with 42 on every decoder call


def build_modules(config: DecoderConfig, device=None) -> tuple[MaskedDiffWithXvec, HiFTGenerator]:
    with torch.device(device or "cpu"):
        return MaskedDiffWithXvec(config.flow), HiFTGenerator(config.hift)


def hift_published_state(hift: HiFTGenerator) -> dict:
    """The vocoder's state dict under the published (legacy weight-norm) names."""
    return module_to_published_keys(hift.state_dict())


class AudioDecoder(StreamingModule[DecoderStream, Sequence[int], np.ndarray]):
    def __init__(self, flow: MaskedDiffWithXvec, hift: HiFTGenerator, seed: int = DEFAULT_SEED, *,
                 graphs: bool | None = None) -> None:
        self.flow, self.hift, self.seed = flow.eval(), hift.eval(), seed
        weight = flow.encoder_proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        # every flow pass (tokens, prompt mel, noise -> mel) goes through here: on a GPU a block's
        # encoder and ten estimator passes replay as one CUDA graph per shape (``graphs``: default
        # on CUDA) instead of thousands of launches; the block schedule repeats the shapes
        self.flow_pass = ShapeGraphs(self.flow, device=self.device, capture=graphs)
        self.sample_rate = hift.config.sampling_rate
        self.samples_per_frame = hift.samples_per_frame
        self.mel_channels = flow.config.output_size
        self.harmonics = hift.config.nb_harmonics + 1
        self.state_dtype = source_dtype(self.dtype)

    @classmethod
    def load(cls, folder: str | Path, device=None, dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED,
             graphs: bool | None = None) -> AudioDecoder:
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
        return cls(flow.to(device=device, dtype=dtype), hift.to(device=device, dtype=dtype), seed, graphs=graphs)

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
            mel = self.flow_pass(tokens, self._empty_mel(), rnd.flow_noise(self.mel_channels, frames, self.dtype)).to(self.dtype)
            phases = rnd.phases(self.harmonics, self.state_dtype)
            noise = rnd.source_noise(self.harmonics, frames * self.samples_per_frame, self.state_dtype)
            with parametrize.cached():
                audio, _ = self.hift(mel, phases, noise)
        elif randomness == "stream":
            rnd = self._stream_randomness(seed)
            mel = self.flow_pass(tokens, self._empty_mel(), rnd.flow.frames(0, frames)).to(self.dtype)
            vocoder = SeamlessVocoder(self.hift, rnd, lookahead=0)
            audio = vocoder.push(mel, final=True)
        else:
            raise ValueError(f"randomness must be 'reference' or 'stream', not {randomness!r}")
        audio = audio[0].float().cpu().numpy()
        return (audio, mel[0].to(self.state_dtype).cpu().numpy()) if return_mel else audio

    def _stream_randomness(self, seed: int) -> StreamRandomness:
        return StreamRandomness(seed, self.device, self.mel_channels, self.harmonics, self.samples_per_frame,
                                self.state_dtype)

    # -- zoo.core.streaming: tokens in blocks -> np.float32 audio --------------------------------
    def new_state(self, mode: str = "seamless", *, seed: int | None = None, **options) -> DecoderStream:
        """A fresh stream (an utterance): ``step(stream, block)`` per block, then
        ``finish(stream, last_block)``. ``options`` are :class:`SeamlessOptions` fields (seamless
        mode only)."""
        seed = self.seed if seed is None else seed
        if mode == "reference":
            if options:
                raise ValueError(f"the reference stream takes no options, got {sorted(options)}")
            return ReferenceStream(self, seed)
        if mode == "seamless":
            return SeamlessStream(self, seed, replace(SeamlessOptions(), **options))
        raise ValueError(f"mode must be 'seamless' or 'reference', not {mode!r}")

    def step(self, state: DecoderStream, piece: Sequence[int], *, rows=None) -> np.ndarray:
        """Decode a block; returns the samples it makes final (may be empty)."""
        one_row_only(rows, "the GLM-4-Voice decoder")
        return state.decode(piece, final=False)

    def finish(self, state: DecoderStream, piece: Sequence[int] | None = None, *, rows=None) -> np.ndarray:
        """Decode the last block (may be empty) and return every remaining sample; the stream is
        then fresh."""
        one_row_only(rows, "the GLM-4-Voice decoder")
        audio = state.decode(() if piece is None else piece, final=True)
        state.reset()
        return audio
