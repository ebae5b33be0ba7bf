"""Hertz-dev beside its reference (Standard-Intelligence/hertz-dev): one full-duplex session of 125 ms
frames on both sides, the same speech (demos/samples/01.wav, looped), the same seeded random weights.

Reference: its own networks (model.py's HertzDevModel in the two-speaker "split" configuration of
``get_hertz_dev_config``, tokenizer.py's WaveCodec) at our sizes, holding our state, driven as its
inference_server.py serves a connection without a prompt file: KV caches of 1024 positions, then
per frame ``next_audio_from_audio`` on (user frame, its own previous frame) with the server's
temperatures; with ``--dtype bfloat16`` the model is cast and run under autocast, as the server
does. Each step re-encodes and re-decodes up to the last 6 s (48 frames), so its step grows over a
session's first 48 frames and then stays: use ``--steps`` well above 48 (e.g. 160, 20 s). Left
out: the server's recording of the call (a growing concatenation kept for a wav file).

Ours: ``model.duplex_stepper``; a step is one session's ``DuplexStepper.step``; sessions at real
time from a batch sweep of that stepper (bench/duplex.py's ``step_times``). TTFA, both sides: a
session opened (caches ready, as the server's are before a connection) -> the model's audio for its
first frame, i.e. a fresh session's first step (both answer every frame).

Same weights: ``max_abs_diff_vs_ours`` in the reference's row, every network run once on both sides
deterministically (tiny float32: about 1e-6). Runtime patches, none in the checkout: its
``make_tokenizer`` (which downloads the published codec) returns a WaveCodec at our codec's sizes;
every ``from_pretrained`` is cleared; its codec's weight-normed layers get g = ||w||, v = w from our
folded weights (ours to a rounding). On CUDA in float32 the reference still runs its quantizer and
mixture head under its hard-coded bfloat16 autocast. One implementation at a time is on the device
while it is measured (peak memory is its own).
"""
from __future__ import annotations

import dataclasses
import gc
import sys
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import soundfile as sf
import torch
from comparison import Comparison, duplex_step_ms, measure, sessions_at_real_time
from latency import QUESTION

import zoo
from zoo.hertz_dev.codec import FRAME, NORM_STDDEV, SAMPLE_RATE, STRIDES
from zoo.hertz_dev.duplex import DuplexStepper
from zoo.hertz_dev.transformer import Rows, rope_tables

SEED = 0
TEMPS = (0.8, (0.4, 0.1))  # inference_server.py's TEMPS: (token, (categorical, gaussian)), our defaults
SERVER_CACHE = 1024  # the KV-cache length inference_server.py gives init_cache
CHECK_FRAMES = 8  # frames per channel of the deterministic same-weights check
FRAME_MS = 1000 * FRAME / SAMPLE_RATE


def reference_network(ours, path: Path, device: torch.device, dtype: torch.dtype):
    """The reference's HertzDevModel (split) at our sizes, holding our weights, eval, in ``dtype``."""
    sys.path.insert(0, str(path))
    import model as ref
    from tokenizer import GaussianZ, ResNetStack, WaveCodec

    main, resynth = ours.networks("split")
    m, r, q, c = main.config, resynth.config, ours.quantizer.config, ours.codec.config
    new = dataclasses.replace
    published = ref.get_hertz_dev_config(is_split=True)
    quantizer = new(published.quantizer_config, from_pretrained=None, dim=q.dim, ff_dim=q.ff_dim, input_dim=q.input_dim,
                    compressor_config=new(published.quantizer_config.compressor_config, dim=q.dim))
    vae = published.resynthesizer_config
    vae = new(vae, from_pretrained=None, quantizer_config=quantizer,
              io_config=new(vae.io_config, latent_dim=r.latent_dim, dim=r.dim, num_components=r.components),
              stack_config=new(vae.stack_config, layers=r.layers, dim=r.dim, ff_dim=r.ff_dim, n_head=r.n_head,
                               kv_heads=r.n_head))
    config = new(published, from_pretrained=None, dim=m.dim, vocab_size=m.vocab, latent_size=m.latent_dim,
                 quantizer_config=quantizer, resynthesizer_config=vae,
                 stack_config=new(published.stack_config, layers=m.layers, dim=m.dim, ff_dim=m.ff_dim, n_head=m.n_head))
    # make_tokenizer's own settings (weight norm, GaussianZ with bias, norm_stddev) at our codec's widths
    codec = WaveCodec.Config(
        resnet_config=ResNetStack.Config(input_channels=1, output_channels=1, encode_channels=c.encode_channels,
                                         decode_channel_multiplier=c.decode_multiplier, kernel_size=c.kernel_size,
                                         bias=True, channel_ratios=tuple(c.channel_ratios), strides=STRIDES, mode=None),
        use_weight_norm=True, norm_stddev=NORM_STDDEV,
        compressor_config=GaussianZ.Config(dim=None, latent_dim=c.latent_dim, bias=True, use_weight_norm=True))
    # built on the device: its random init of the full size takes minutes on a CPU, seconds on a GPU
    with torch.device(device), mock.patch.object(ref, "make_tokenizer", lambda device: codec().eval()):
        net = ref.HertzDevModel(config)
    net.load_state_dict(_reference_state(ours, main, resynth, net.state_dict()), strict=True)
    return net.eval().to(dtype)


def _reference_state(ours, main, resynth, wanted: dict) -> dict:
    """Our networks' states under the reference's names (ours are the published names; its codec
    keeps weight norm's g / v, which our loader folded into one weight)."""
    state = {**main.state_dict(), **{f"resynthesizer.{k}": v for k, v in resynth.state_dict().items()},
             **{f"resynthesizer.quantizer.{k}": v for k, v in ours.quantizer.state_dict().items()}}
    codec = ours.codec.state_dict()
    for key in wanted:
        if not key.startswith("audio_tokenizer."):
            continue
        name = key.removeprefix("audio_tokenizer.")
        layer, _, part = name.partition(".parametrizations.weight.")
        if part:
            w = codec[f"{layer}.weight"].float()
            norm = torch.linalg.vector_norm(w.flatten(1), dim=1).view(-1, *[1] * (w.dim() - 1))
            state[key] = norm if part == "original0" else w
        else:
            state[key] = codec[name]
    return state


class ReferenceSession:
    """inference_server.py's AudioProcessor for one connection, past its prompt: fresh caches, the
    model's previous frame (zeros at first) as the second channel of every input."""

    def __init__(self, net, device: torch.device, dtype: torch.dtype) -> None:
        self.net, self.device = net, device
        net.deinit_cache()
        net.init_cache(bsize=1, device=device, dtype=dtype, length=SERVER_CACHE)
        self.previous = torch.zeros(1, 1, FRAME, device=device, dtype=dtype)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step(self, frame: np.ndarray) -> np.ndarray:
        audio = torch.cat([torch.from_numpy(frame).to(self.device).reshape(1, 1, -1), self.previous], dim=1)
        with self.autocast, torch.inference_mode():
            self.previous = self.net.next_audio_from_audio(audio, temps=TEMPS)
        return self.previous.float().cpu().numpy().reshape(-1)


def _reference_run(net, frames, device, dtype):
    session = ReferenceSession(net, device, dtype)  # before the clock: ready when the connection opens
    return (session.step(frame) for frame in frames)


def _our_run(stepper: DuplexStepper, frames):
    handle = stepper.open({"seed": SEED})  # before the clock, as the reference's caches

    def replies():
        try:
            for frame in frames:
                yield stepper.step([handle], [frame])[0]
        finally:
            stepper.close(handle)

    return replies()


@torch.inference_mode()
def max_differences(ours, net, speech: np.ndarray, device, dtype) -> dict[str, float]:
    """Every network once on both sides, deterministic, the same input (two channels of speech):
    the codec's posterior means, both main-model heads' last logits, both mixtures' last means,
    the codec's decoded audio; the largest absolute difference of each."""
    main, resynth = ours.networks("split")
    x = torch.from_numpy(speech[: 2 * CHECK_FRAMES * FRAME].reshape(2, 1, -1)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    mu = ours.codec.posterior(x.to(dtype))[0]  # (2, T, 32)
    latents = torch.cat([mu[0], mu[1]], dim=-1)[None]  # (1, T, 64): user, model
    t = latents.size(1)
    rows = Rows.make([0], [0], t, device)
    logits = torch.stack(main(latents, main.new_cache(1, t), rows, rope_tables(main.config.head_dim, t, device), (0, 1)))
    tokens = logits.argmax(-1).T  # (1, 2)
    locs = resynth(latents, tokens, ours.quantizer, resynth.new_caches(1, t, 2), rows,
                   rope_tables(resynth.config.head_dim, t, device), (0, 1))[0][:, 0]
    net.deinit_cache()  # a whole-sequence forward, no cache
    with autocast:
        ref_mu = net.audio_tokenizer.latent_from_data(x, get_parameters=True)["mu"]
        ref_logits = torch.stack([out[:, -1] for out in net(latents)])
        mixtures = net.resynthesizer(latents, next_tokens=(tokens[:, :1], tokens[:, 1:]), temps=None)
        ref_audio = net.audio_tokenizer.data_from_latent(mu)
    pairs = {"codec_latents": (mu, ref_mu), "main_logits": (logits, ref_logits),
             "mixture_means": (locs, torch.stack([loc[0, -1] for loc, _, _ in mixtures])),
             "codec_audio": (ours.codec.decode(mu), ref_audio)}
    return {name: float(f"{(a.float() - b.float()).abs().max():.3g}") for name, (a, b) in pairs.items()}


def compare_hertz_dev(args, device: torch.device) -> list[dict]:
    if args.steps > SERVER_CACHE:
        raise SystemExit(f"--steps {args.steps}: the reference's caches hold {SERVER_CACHE} frames")
    dtype = getattr(torch, args.dtype)
    speech = np.resize(sf.read(QUESTION, dtype="float32")[0], max(args.steps, 2 * CHECK_FRAMES) * FRAME)
    frames = list(speech[: args.steps * FRAME].reshape(args.steps, FRAME))
    ours = zoo.load("hertz-dev", random_weights=args.size, seed=SEED, device=str(device), dtype=args.dtype)
    stepper = ours.duplex_stepper(1)  # one session's caches, kept for every run as a server keeps its slots
    mine = measure("omni-zoo", lambda: _our_run(stepper, frames), DuplexStepper, "step", SAMPLE_RATE, device, args)
    stepper = None  # its caches (and CUDA graphs) go before the reference is built
    mine["sessions_at_real_time"], mine["batch_sweep"] = sessions_at_real_time(
        args.sessions, partial(duplex_step_ms, ours, args, device), FRAME_MS)
    _release(device)  # the sweep's caches: room for the reference, built in float32 first as its server does

    reference = reference_network(ours, args.reference, device, dtype)
    differences = max_differences(ours, reference, speech, device, dtype)
    del ours  # the reference is measured alone on the device
    _release(device)
    torch.manual_seed(SEED)  # its draws use the global generator
    row = measure("reference", lambda: _reference_run(reference, frames, device, dtype), ReferenceSession, "step",
                  SAMPLE_RATE, device, args)
    row["sessions_at_real_time"] = int(row["step_ms_p50"] <= FRAME_MS)  # its server holds one session
    row["max_abs_diff_vs_ours"] = differences
    return [row, mine]


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


COMPARISON = Comparison(markers=("model.py",), dependencies=("einops", "tqdm", "requests", "huggingface_hub"),
                        install="pip install einops tqdm requests huggingface_hub (what its model.py imports; "
                                "torchaudio, fastapi and uvicorn serve its server, which is not run)",
                        run=compare_hertz_dev, dtypes=("float32", "bfloat16"))
