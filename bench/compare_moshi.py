"""Moshi beside its reference (kyutai-labs/moshi): the reference server's per-connection loop
(moshi/server.py: its Mimi and LMGen from its own loaders holding our seeded random weights, one
session at a time) against our duplex stepper, greedy on both sides (``LMGen(use_sampling=False)``,
``temperature=0``), the same speech (demos/samples/01.wav at 24 kHz, then silence) streamed one
80 ms frame at a time.

``--reference``: the root of a kyutai-labs/moshi checkout (its Python package is moshi/moshi). That
package pins older torch and numpy, so it is not installed: its code runs from the checkout with
this environment's torch, with torch.compile off (``NO_TORCH_COMPILE=1`` unless the environment
sets it; the reference compiles a few small functions otherwise) and, on CUDA, its own CUDA graphs.

A step is one frame's whole work: Mimi encode of the user's frame, the temporal transformer's step
with the depth transformer's codebooks, Mimi decode of Moshi's frame (the server's Opus and
websocket work is left out, as ours is). Frames go in back to back, not paced at 80 ms: TTFA is the
work from a fresh session's first frame to the first frame with Moshi's audio (the acoustic delay
makes that the second). Each row also says for how many answered frames, from the first, both
sides gave the same text token and audio codes (``agreeing_frames`` of ``answered_frames``).
Peak GPU memory: both models stay loaded (at full size the LM's weights are one shared copy), so
each row counts the weights once, both Mimis, and that side's caches (the reference's are freed
before ours are measured).
"""
from __future__ import annotations

import gc
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from comparison import Comparison, agreeing_prefix, duplex_step_ms, measure, sessions_at_real_time
from latency import QUESTION

import zoo
from zoo.core.audio import load_audio
from zoo.moshi.checkpoint import CONFIG_FILE, MIMI_FILE, MOSHI_FILE, TOKENIZER_FILE
from zoo.moshi.mimi import FRAME_SAMPLES, SAMPLE_RATE
from zoo.moshi.random_weights import MIMI_CONFIG_FILE

GREEDY = {"temperature": 0.0}


class ReferenceConnection:
    """The reference server's ``ServerState`` serving one connection at a time: ``connect`` is its
    handle_chat's resets, ``frame`` its recv_loop's work on one 80 ms frame."""

    def __init__(self, mimi, lm_gen, device: torch.device) -> None:
        self.mimi, self.lm_gen, self.device = mimi, lm_gen, device
        mimi.streaming_forever(1)
        lm_gen.streaming_forever(1)
        self.skip_frames = 1

    def connect(self) -> None:
        self.mimi.reset_streaming()
        self.lm_gen.reset_streaming()
        self.skip_frames = 1

    @torch.no_grad()  # the server runs under no_grad
    def frame(self, pcm: np.ndarray) -> tuple[list[int] | None, np.ndarray]:
        """-> (text token and Moshi's codebooks, or None at the acoustic delay's step; audio)."""
        codes = self.mimi.encode(torch.from_numpy(pcm).to(self.device)[None, None])
        if self.skip_frames:  # as the server: the first frame is the model's past, the encoder restarts
            self.mimi.reset_streaming()
            self.skip_frames -= 1
        tokens = self.lm_gen.step(codes)  # one frame in: one step (the server loops over codes' frames)
        if tokens is None:
            return None, np.zeros(0, np.float32)
        audio = self.mimi.decode(tokens[:, 1:]).cpu()[0, 0].numpy()
        return tokens[0, :, 0].tolist(), audio


def reference_modules(ours, root: Path, size: str, device: torch.device, dtype: torch.dtype):
    """The reference's Mimi and greedy LMGen on our weights, built by its own loaders."""
    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # read when its modules are imported
    sys.path.insert(0, str(root / "moshi"))
    from moshi.models import LMGen, loaders

    if size == "tiny":  # the published layout our model was loaded from, read as the server reads local files
        folder = Path(ours.source)
        info = loaders.CheckpointInfo.from_hf_repo(
            str(folder), folder / MOSHI_FILE, folder / MIMI_FILE, folder / TOKENIZER_FILE,
            config_path=folder / CONFIG_FILE, mimi_config_path=folder / MIMI_CONFIG_FILE)
        mimi, lm = info.get_mimi(device=device), info.get_moshi(device=device, dtype=dtype)
    else:
        # 7.7B: no 15 GB folder to write; its loaders' published configuration, filled with our
        # tensors under the published names (the LM's assigned, so the weights are shared, not copied)
        mimi = loaders.get_mimi(None, device=device, num_codebooks=ours.mimi.num_codebooks)
        mimi.load_state_dict(ours.mimi.state_dict())
        lm = loaders.get_moshi_lm(None, device="meta", dtype=dtype)
        lm.load_state_dict(ours.lm.state_dict(), assign=True)
    return mimi, LMGen(lm, use_sampling=False)


def speech_frames(count: int) -> list[np.ndarray]:
    audio = load_audio(QUESTION, target_rate=SAMPLE_RATE)
    audio = np.pad(audio, (0, max(0, count * FRAME_SAMPLES - audio.size)))
    return [audio[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES] for i in range(count)]


def compare_moshi(args, device: torch.device) -> list[dict]:
    ours = zoo.load("moshi", random_weights=args.size, device=str(device), dtype=args.dtype)
    frames = speech_frames(args.steps)
    outputs = {"reference": [], "omni-zoo": []}
    rows = [_reference_row(ours, frames[:args.steps], outputs["reference"], args, device)]
    gc.collect()  # its streaming state holds reference cycles: its caches go before our peak memory and sweep
    rows.append(_our_row(ours, frames[:args.steps], outputs["omni-zoo"], args, device))
    frame_ms = 1000 * FRAME_SAMPLES / SAMPLE_RATE
    rows[0]["sessions_at_real_time"] = int(rows[0]["step_ms_p50"] <= frame_ms)  # the server holds one session
    rows[1]["sessions_at_real_time"], rows[1]["batch_sweep"] = sessions_at_real_time(
        args.sessions, partial(duplex_step_ms, ours, args, device), frame_ms)
    answered = [(a, b) for a, b in zip(outputs["reference"], outputs["omni-zoo"]) if a is not None or b is not None]
    agreeing = agreeing_prefix([a for a, _ in answered], [b for _, b in answered])
    print(f"greedy outputs agree on {agreeing} of {len(answered)} answered frames", file=sys.stderr)
    for row in rows:
        row.update(agreeing_frames=agreeing, answered_frames=len(answered))
    return rows


def _reference_row(ours, frames, record: list, args, device: torch.device) -> dict:
    mimi, lm_gen = reference_modules(ours, args.reference, args.size, device, getattr(torch, args.dtype))
    connection = ReferenceConnection(mimi, lm_gen, device)
    return measure("reference", lambda: _reference_stream(connection, frames, record), connection, "frame",
                   ours.card.output_sample_rate, device, args)


def _reference_stream(connection: ReferenceConnection, frames, record: list):
    connection.connect()
    record.clear()  # every run is the same greedy stream: the last one is kept
    for frame in frames:
        tokens, audio = connection.frame(frame)
        record.append(tokens)
        yield audio


def _our_row(ours, frames, record: list, args, device: torch.device) -> dict:
    stepper = ours.duplex_stepper(1)  # held across sessions, as the server holds its state
    return measure("omni-zoo", lambda: _our_stream(stepper, frames, record), stepper, "step",
                   ours.card.output_sample_rate, device, args)


def _our_stream(stepper, frames, record: list):
    handle = stepper.open(GREEDY)
    record.clear()
    try:
        for frame in frames:
            audio = stepper.step([handle], [frame])[0]
            if isinstance(audio, Exception):
                raise audio
            record.append(None if handle.tokens is None else handle.tokens.tolist())
            # the acoustic delay's step answers 80 ms of silence (the duplex contract); the reference sends nothing
            yield audio if handle.tokens is not None else audio[:0]
    finally:
        stepper.close(handle)


COMPARISON = Comparison(markers=("moshi/moshi/models/lm.py",),
                        dependencies=("einops", "huggingface_hub", "safetensors", "sentencepiece"),
                        install="pip install --no-deps einops huggingface_hub safetensors sentencepiece (its "
                                "moshi package itself is not installed: it runs from the checkout)",
                        run=compare_moshi, dtypes=("float32", "bfloat16"))
