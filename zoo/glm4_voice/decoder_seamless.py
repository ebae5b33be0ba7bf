"""GLM-4-Voice's ``"seamless"`` decoder stream (the default): bounded cost per block, no lost
samples (total = ``one_pass`` length), close to ``one_pass``.

* flow: each block is decoded together with a bounded left context of earlier tokens
  (``context_tokens``, rounded down to whole 10-token encoder blocks so the block-causal mask
  lines up as in one pass). The last ``holdback_frames`` mel frames stay provisional: the next
  block regenerates them with more right context, and the first ``crossfade_frames`` of them are
  blended from the old to the new version (linear, summing to 1). ``prompt=True`` also
  conditions the flow on the committed mel of the context frames, as the reference does.
* vocoder: committed mel is vocoded with ``receptive_field_frames`` (27) of mel before what is
  emitted and ``vocoder_lookahead_frames`` (8) after it; the source (sine harmonics) carries its
  phase and its cached samples across blocks, so the chunked vocoding equals one vocoder pass
  over the same mel (exactly with a 27-frame lookahead, to -55 dB with 8).
* randomness: frame-indexed (``decoder_noise.StreamRandomness``), so
  ``one_pass(tokens, randomness="stream")`` decodes with exactly this noise, which isolates the
  streaming error from the noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils import parametrize

from .decoder_noise import StreamRandomness
from .decoder_stream import DecoderStream, _numpy
from .hift import HiFTGenerator, receptive_field_frames, source_dtype


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
    def __init__(self, decoder, seed: int, options: SeamlessOptions) -> None:
        if options.crossfade_frames > options.holdback_frames:
            raise ValueError("crossfade_frames cannot exceed holdback_frames")
        self.decoder, self.seed, self.options = decoder, seed, options
        self._start()

    def _start(self) -> None:
        decoder = self.decoder
        self.rnd = decoder._stream_randomness(self.seed)
        self.vocoder = SeamlessVocoder(decoder.hift, self.rnd, lookahead=self.options.vocoder_lookahead_frames)
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
        mel = d.flow_pass(window_tokens, prompt, noise).to(d.dtype)[:, :, known:]
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
