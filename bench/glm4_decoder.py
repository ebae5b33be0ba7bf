"""GLM-4-Voice audio decoder: the streaming modes against the one-pass decode (SNR) and the compute
time per block against the block's audio duration, with seeded random weights.

    python bench/glm4_decoder.py --size tiny                      # seconds, CPU
    python bench/glm4_decoder.py --size full --tokens 560         # the real cost (~40 min on 2 CPU cores)
    python bench/glm4_decoder.py --size full --device cuda --dtype bfloat16

For each block schedule (the reference web demo's 25, 50, 100, 150, 200 and our 10, 25, 50, ...)
and each mode ("reference": the reference's token2wav loop; "seamless": ours), the same random
tokens are streamed block by block (the last block partial, ended with ``finish``). Reported:

* samples: streamed total vs the one-pass length (the reference loses 256 per block after the first)
* SNR of the streamed audio vs ``one_pass`` (the reference's noise), in dB: waveform, and the
  magnitude spectrogram (STFT 1024/256, phase-blind); for "seamless" also the waveform and the mel
  against ``one_pass(randomness="stream")``, which uses the stream's own frame-indexed noise and so
  isolates what streaming changes from what a different noise draw changes
* per block: compute seconds (flow and vocoder), the block's audio seconds, RTF = compute / audio
* for scale: the SNR of a one-pass decode with another noise seed (an unrelated noise draw)

Random weights make the output noise: the flow's mel then depends on the noise about as much as on
the tokens, and the vocoder's harmonic phase integrates f0, so any mel difference drifts the
waveform; waveform SNRs near 0 dB are expected for every streaming scheme here. Writes
bench/results/<date>_glm4_decoder_<size>_<device>_<dtype>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from host import RESULTS, machine
from tqdm import tqdm

from zoo.glm4_voice.decoder import AudioDecoder, SeamlessStream
from zoo.glm4_voice.random_weights import random_decoder

TOKENS_PER_SECOND = 12.5


def snr(x: np.ndarray, y: np.ndarray) -> float:
    """10 log10(|y|^2 / |x - y|^2) in dB, y the reference."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = min(x.shape[-1], y.shape[-1])
    x, y = x[..., :n], y[..., :n]
    return float(10 * np.log10((y**2).sum() / max(((x - y) ** 2).sum(), 1e-300)))


def spectral_snr(x: np.ndarray, y: np.ndarray) -> float:
    def magnitude(a):
        a = torch.from_numpy(np.asarray(a, np.float32))
        return torch.stft(a, 1024, 256, window=torch.hann_window(1024), return_complex=True).abs().numpy()

    n = min(len(x), len(y))
    return snr(magnitude(x[:n]), magnitude(y[:n]))


def blocks_of(tokens: list[int], sizes) -> list[list[int]]:
    blocks, start = [], 0
    while start < len(tokens):
        size = sizes[min(len(blocks), len(sizes) - 1)]
        blocks.append(tokens[start : start + size])
        start += size
    return blocks


class Timer:
    """Seconds spent in the flow passes (replayed CUDA graphs or plain calls: the decoder's
    ``flow_pass``, wrapped on the instance) and in a whole block."""

    def __init__(self, decoder: AudioDecoder) -> None:
        self.device, self.flow_seconds = decoder.device, 0.0
        self.graphs = forward = decoder.flow_pass  # zoo.core.graphs.ShapeGraphs

        def timed(*args):
            self.sync()
            start = time.perf_counter()
            out = forward(*args)
            self.sync()
            self.flow_seconds += time.perf_counter() - start
            return out

        decoder.flow_pass = timed

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def run_stream(decoder: AudioDecoder, timer: Timer, tokens, sizes, mode: str, progress) -> dict:
    stream = decoder.new_state(mode)
    committed = []
    if isinstance(stream, SeamlessStream):  # record the mel it commits (for the mel SNR)
        push = stream.vocoder.push

        def recording(mel, final):
            committed.append(mel[0].float().cpu().numpy())
            return push(mel, final)

        stream.vocoder.push = recording
    blocks = blocks_of(tokens, sizes)
    chunks, rows = [], []
    for i, block in enumerate(blocks):
        final = i == len(blocks) - 1
        timer.flow_seconds = 0.0
        timer.sync()
        start = time.perf_counter()
        audio = stream.finish(block) if final else stream.push(block)
        timer.sync()
        seconds = time.perf_counter() - start
        audio_seconds = len(block) / TOKENS_PER_SECOND
        rows.append(dict(block=i, tokens=len(block), final=final, samples=len(audio), audio_s=audio_seconds,
                         compute_s=seconds, flow_s=timer.flow_seconds, vocoder_s=seconds - timer.flow_seconds,
                         rtf=seconds / audio_seconds))
        chunks.append(audio)
        progress.update(1)
    return dict(audio=np.concatenate(chunks), blocks=rows, mel=np.concatenate(committed, axis=-1) if committed else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    parser.add_argument("--tokens", type=int, default=560, help="speech tokens to decode (560 = 44.8 s of audio)")
    parser.add_argument("--seed", type=int, default=0, help="weights and tokens")
    parser.add_argument("--modes", default="reference,seamless")
    parser.add_argument("--schedules", default="25,50,100,150,200;10,25,50,100,150,200",
                        help="block schedules, ';'-separated")
    parser.add_argument("--repeats", type=int, default=1,
                        help="streams per schedule and mode, the last one reported (CUDA graphs: a flow shape is "
                             "captured the second time it is seen, so from the third stream on every block replays)")
    parser.add_argument("--eager-too", action="store_true",
                        help="also stream without CUDA graphs: eager_blocks and the largest sample difference")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    parser.add_argument("--no-seed-baseline", action="store_true",
                        help="skip the one pass with another noise seed (the SNR of an unrelated noise draw)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(torch.get_num_threads())
    decoder = random_decoder(args.size, device=device, dtype=dtype, seed=args.seed)
    timer = Timer(decoder)
    tokens = [int(t) for t in np.random.default_rng(args.seed).integers(0, 16384, args.tokens)]
    schedules = {name: tuple(int(n) for n in name.split(",")) for name in args.schedules.split(";")}
    modes = args.modes.split(",")
    out = args.out or RESULTS / f"{date.today()}_glm4_decoder_{args.size}_{device.type}_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    streams = args.repeats + args.eager_too
    total = 2 + (not args.no_seed_baseline) + sum(len(blocks_of(tokens, s)) for s in schedules.values()) * len(modes) * streams
    results = dict(machine=machine() if device.type == "cpu" else torch.cuda.get_device_name(device),
                   device=str(device), dtype=args.dtype, size=args.size, tokens=args.tokens,
                   audio_seconds=args.tokens / TOKENS_PER_SECOND, torch=torch.__version__,
                   threads=torch.get_num_threads(), date=str(date.today()), graphs=timer.graphs.enabled,
                   repeats=args.repeats, runs=[])
    with tqdm(total=total, unit="decode", desc=f"glm4 decoder {args.size} {args.device} {args.dtype}") as progress:
        one_pass = {}
        for randomness in ("reference", "stream"):
            timer.sync()
            start = time.perf_counter()
            audio, mel = decoder.one_pass(tokens, randomness=randomness, return_mel=True)
            timer.sync()
            one_pass[randomness] = dict(audio=audio, mel=mel, compute_s=time.perf_counter() - start)
            progress.update(1)
        if not args.no_seed_baseline:  # what a different noise draw alone does to the SNR
            audio, mel = decoder.one_pass(tokens, seed=decoder.seed + 1, return_mel=True)
            results["other_seed_vs_one_pass_db"] = snr(audio, one_pass["reference"]["audio"])
            results["other_seed_vs_one_pass_spectral_db"] = spectral_snr(audio, one_pass["reference"]["audio"])
            results["other_seed_vs_one_pass_mel_db"] = snr(mel, one_pass["reference"]["mel"])
            progress.update(1)
        results["one_pass"] = dict(samples=len(one_pass["reference"]["audio"]),
                                   compute_s=one_pass["reference"]["compute_s"],
                                   stream_randomness_vs_reference_db=snr(one_pass["stream"]["audio"], one_pass["reference"]["audio"]),
                                   stream_randomness_vs_reference_mel_db=snr(one_pass["stream"]["mel"], one_pass["reference"]["mel"]))
        for name, sizes in schedules.items():
            for mode in modes:
                for _ in range(args.repeats):
                    run = run_stream(decoder, timer, tokens, sizes, mode, progress)
                audio, reference = run["audio"], one_pass["reference"]["audio"]
                row = dict(schedule=name, mode=mode, samples=len(audio), one_pass_samples=len(reference),
                           snr_db=snr(audio, reference), spectral_snr_db=spectral_snr(audio, reference),
                           blocks=run["blocks"])
                if args.eager_too:
                    with timer.graphs.eager():
                        eager = run_stream(decoder, timer, tokens, sizes, mode, progress)
                    row["eager_blocks"] = eager["blocks"]
                    row["max_abs_vs_eager"] = float(np.abs(audio - eager["audio"]).max()) if len(audio) else 0.0
                if run["mel"] is not None:
                    row["snr_vs_stream_one_pass_db"] = snr(audio, one_pass["stream"]["audio"])
                    row["spectral_snr_vs_stream_one_pass_db"] = spectral_snr(audio, one_pass["stream"]["audio"])
                    row["mel_snr_vs_stream_one_pass_db"] = snr(run["mel"], one_pass["stream"]["mel"])
                results["runs"].append(row)
                out.write_text(json.dumps(dict(results, complete=False), indent=1))  # a long run keeps what it has
    print(f"\n{results['machine']}, {args.dtype}, {args.size} size, {args.tokens} tokens ({results['audio_seconds']:.1f} s); "
          f"one pass {results['one_pass']['compute_s']:.2f} s compute, {results['one_pass']['samples']} samples")
    if "other_seed_vs_one_pass_db" in results:
        print(f"one pass with seed {decoder.seed + 1} vs seed {decoder.seed}: {results['other_seed_vs_one_pass_db']:.2f} dB wave, "
              f"{results['other_seed_vs_one_pass_spectral_db']:.2f} dB spectral, {results['other_seed_vs_one_pass_mel_db']:.2f} dB mel")
    print(f"one pass with the stream's noise vs the reference's noise: {results['one_pass']['stream_randomness_vs_reference_db']:.2f} dB "
          f"(mel {results['one_pass']['stream_randomness_vs_reference_mel_db']:.2f} dB)")
    for row in results["runs"]:
        extra = ""
        if "mel_snr_vs_stream_one_pass_db" in row:
            extra = (f" | vs one pass with its noise: {row['snr_vs_stream_one_pass_db']:.2f} dB wave, "
                     f"{row['spectral_snr_vs_stream_one_pass_db']:.2f} dB spectral, {row['mel_snr_vs_stream_one_pass_db']:.2f} dB mel")
        print(f"{row['mode']:9s} {row['schedule']:21s} samples {row['samples']} / {row['one_pass_samples']}  "
              f"SNR {row['snr_db']:.2f} dB wave, {row['spectral_snr_db']:.2f} dB spectral{extra}")
        for label, blocks in (("", row["blocks"]), ("eager ", row.get("eager_blocks", []))):
            for b in blocks:
                print(f"    {label}block {b['block']}: {b['tokens']:3d} tokens ({b['audio_s']:.2f} s audio) -> "
                      f"{b['samples']:7d} samples; compute {b['compute_s']:.3f} s (flow {b['flow_s']:.3f} s, "
                      f"vocoder {b['vocoder_s']:.3f} s), RTF {b['rtf']:.3f}")
        if "max_abs_vs_eager" in row:
            print(f"    largest sample difference, graphs vs eager: {row['max_abs_vs_eager']:.3g}")
    if device.type == "cuda":  # the captured graphs keep their own buffers: what they cost shows here
        results["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results["graphs_kept"] = len(timer.graphs.graphs)
    out.write_text(json.dumps(dict(results, complete=True), indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
