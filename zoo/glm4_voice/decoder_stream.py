"""GLM-4-Voice's ``"reference"`` decoder stream: ``flow_inference.AudioDecoder.token2wav`` driven
as ``web_demo.py`` drives it, number for number, with the networks in eval mode. (The web demo
never calls ``.eval()`` on them, so its flow encoder runs with its 0.1 dropout on: its users' audio
is this plus dropout noise; bench/compare_glm_4_voice.py found it.)

Each block is decoded with all earlier tokens as the prompt and all earlier returned mels as the
prompt mel (including the extra HiFT-cache frame each returned mel starts with), a 34-frame
Hamming cross-fade, a 1-frame/256-sample HiFT cache, and the last 256 samples of non-final blocks
dropped (they come back with the next block). Push the last block with ``finish(block)``, as the
reference does on ``<|user|>``. Its cost per block grows with the history, and ``finish()``
without a block (the reply hit the token limit) returns the held-back tail the reference would
lose.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parametrize

from ..core.streaming import StreamingState, one_row_only
from .decoder_noise import ReferenceRandomness

# flow_inference.AudioDecoder's streaming constants
REFERENCE_OVERLAP_FRAMES = 34  # int(5 tokens / 12.5 * 22050 / 256)
REFERENCE_CACHE_FRAMES = 1  # mel frames (and 256 source samples) carried into the next HiFT call


class DecoderStream(StreamingState):
    """The state of one utterance being decoded block by block by ``decoder`` (an AudioDecoder,
    which streams through zoo.core.streaming: ``decoder.step(stream, block)``,
    ``decoder.finish(stream, last_block)``). Not thread-safe; one per reply.

    ``push`` / ``finish`` are the same calls for code that holds just the stream, which then
    stays closed after ``finish`` (a handle for one utterance; ``reset`` reopens it)."""

    decoder: Any
    finished = False

    def push(self, tokens: Sequence[int]) -> np.ndarray:
        """Decode a block of tokens; returns the samples it makes final (np.float32, may be empty)."""
        return self.decoder.step(self, tokens)

    def finish(self, tokens: Sequence[int] = ()) -> np.ndarray:
        """Decode the last block (may be empty) and return every remaining sample."""
        audio = self.decoder.finish(self, tokens)
        self.finished = True
        return audio

    def reset(self, rows=None) -> None:
        one_row_only(rows, "a GLM-4-Voice decoder stream")
        self.finished = False
        self._start()

    def decode(self, tokens: Sequence[int], final: bool) -> np.ndarray:
        """One block through the stream (the decoder's ``step`` / ``finish``)."""
        if self.finished:
            raise RuntimeError("this decoder stream is finished")
        with torch.inference_mode():
            return self._decode(list(tokens), final)

    def _start(self) -> None:
        """Set the fields of a fresh stream."""
        raise NotImplementedError

    def _decode(self, tokens: list[int], final: bool) -> np.ndarray:
        raise NotImplementedError


def _numpy(audio: torch.Tensor) -> np.ndarray:
    return audio.reshape(-1).float().cpu().numpy()


class ReferenceStream(DecoderStream):
    """``token2wav`` + the ``web_demo.py`` loop, number for number."""

    def __init__(self, decoder, seed: int) -> None:
        self.decoder, self.seed = decoder, seed
        self.window = torch.from_numpy(np.hamming(2 * REFERENCE_OVERLAP_FRAMES))  # float64, as numpy gives it
        self._start()

    def _start(self) -> None:
        self.prompt_tokens: list[int] = []
        self.returned_mels: list[torch.Tensor] = []
        self.overlap: torch.Tensor | None = None  # the last 34 frames of the previous block, not vocoded
        self.cache_mel: torch.Tensor | None = None  # the last vocoded frame, vocoded again next time
        self.cache_source: torch.Tensor | None = None  # its 256 source samples

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
        mel = d.flow_pass(all_tokens, prompt_mel, noise).to(d.dtype)[:, :, prompt_mel.size(-1):]
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
