"""Hertz-dev against the reference code's own outputs (tests/data/hertz_dev_reference.npz: see its
``about``): Standard-Intelligence/hertz-dev@076c275 run on the tiny checkpoint (seed 0) in float64,
deterministic (argmax index, posterior mean, the most probable component's mean). Layer outputs,
logits, mixtures, the mono completion's FSQ indices and latents, the duplex server loop's indices,
latents and audio. If zoo.hertz_dev.random_weights's writer changes (TINY_FORMAT), regenerate the fixture
with the harness before bumping it."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SAMPLES

import zoo
from zoo.hertz_dev.codec import FRAME
from zoo.hertz_dev.random_weights import TINY_FORMAT
from zoo.hertz_dev.transformer import Rows, rope_tables

REF = dict(np.load(Path(__file__).parent / "data" / "hertz_dev_reference.npz"))
TIGHT = dict(rtol=0, atol=1e-10)  # float64 on both sides; the fixture's float32 audio: 1e-7


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert TINY_FORMAT == 1 and "TINY_FORMAT 1" in str(REF["about"])
    yield zoo.load("hertz-dev", random_weights="tiny", seed=0, device="cpu", dtype="float64")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def audio():
    return np.concatenate([sf.read(SAMPLES / f"0{i}.wav", dtype="float32")[0] for i in (1, 2, 3, 4)])


def t(array):
    return torch.from_numpy(np.asarray(array)).to(torch.float64)


def test_codec_and_quantizer(model, audio):
    with torch.inference_mode():
        mu, _ = model.codec.posterior(t(audio[: 15 * FRAME])[None, None])
        np.testing.assert_allclose(mu[0], REF["codec_mu"], **TIGHT)
        decoded = model.codec.decode(mu)[0, 0, :8000]
        np.testing.assert_allclose(decoded, REF["codec_audio_head"], rtol=0, atol=1e-7)
        embedding, indices = model.quantizer(mu)
    assert indices[0].tolist() == REF["quantizer_indices"].tolist()
    np.testing.assert_allclose(embedding[0], REF["quantizer_embedding"], **TIGHT)


def test_mono_layers_logits_and_mixture(model):
    main, resynth = model.networks("mono")
    prompt = t(REF["mono_prompt"])[None]
    rows = Rows.make([0], [0], prompt.size(1), "cpu")
    hooks = []
    with torch.inference_mode():
        (logits,) = main(prompt, main.new_cache(1, 16), rows, rope_tables(main.config.head_dim, 16, "cpu"),
                         (0,), hooks=hooks)
        np.testing.assert_allclose(torch.stack(hooks)[:, 0], REF["mono_main_layers"], **TIGHT)
        np.testing.assert_allclose(logits[0, REF["logit_probe"]], REF["mono_logits_probe"], **TIGHT)
        assert int(logits.argmax()) == int(REF["mono_logits_argmax"])
        hooks = []
        locs, scales, weights = resynth(prompt, logits.argmax(-1)[:, None], model.quantizer,
                                        resynth.new_caches(1, 16, 1), rows,
                                        rope_tables(resynth.config.head_dim, 16, "cpu"), (0,), hooks=hooks)
    np.testing.assert_allclose(torch.stack(hooks)[:, 0], REF["mono_resynth_layers"], **TIGHT)
    np.testing.assert_allclose(locs[0, 0], REF["mono_mixture_locs"], **TIGHT)
    np.testing.assert_allclose(scales[0, 0], REF["mono_mixture_scales"], **TIGHT)
    np.testing.assert_allclose(weights[0, 0], REF["mono_mixture_weights"], **TIGHT)


def test_mono_completion_indices_latents_and_audio(model, audio):
    """respond() on 8 frames = the reference's completion(prompt, gen_len=12) with its KV cache."""
    reply = model.start_reply(audio[: 8 * FRAME], 16000, {"temperature": 0, "max_new_tokens": 12})
    streamed = np.concatenate([c.audio for c in model._stream(reply)])
    np.testing.assert_allclose(reply.prompt_latents[0], REF["mono_prompt"], **TIGHT)
    assert reply.tokens == REF["mono_tokens"].tolist()
    np.testing.assert_allclose(torch.stack(reply.latents), REF["mono_latents"], rtol=0, atol=1e-9)
    rms = np.sqrt((streamed.astype(np.float64).reshape(-1, FRAME) ** 2).mean(1))
    np.testing.assert_allclose(rms, REF["mono_audio_rms"], rtol=1e-6)
    np.testing.assert_allclose(streamed[-4000:], REF["mono_audio_tail"], rtol=0, atol=1e-7)


def test_split_logits_and_mixtures_of_both_channels(model):
    main, resynth = model.networks("split")
    prompt = t(REF["split_prompt"])[None]
    rows = Rows.make([0], [0], prompt.size(1), "cpu")
    with torch.inference_mode():
        l1, l2 = main(prompt, main.new_cache(1, 16), rows, rope_tables(main.config.head_dim, 16, "cpu"), (0, 1))
        logits = torch.stack([l1[0], l2[0]])
        np.testing.assert_allclose(logits[:, REF["logit_probe"]], REF["split_logits_probe"], **TIGHT)
        assert logits.argmax(-1).tolist() == REF["split_logits_argmax"].tolist()
        tokens = logits.argmax(-1)[None]
        locs, scales, weights = resynth(prompt, tokens, model.quantizer, resynth.new_caches(1, 16, 2), rows,
                                        rope_tables(resynth.config.head_dim, 16, "cpu"), (0, 1))
    np.testing.assert_allclose(locs[:, 0], REF["split_mixture_locs"], **TIGHT)
    np.testing.assert_allclose(scales[:, 0], REF["split_mixture_scales"], **TIGHT)
    np.testing.assert_allclose(weights[:, 0], REF["split_mixture_weights"], **TIGHT)


def test_duplex_equals_the_reference_server_loop(model, audio):
    """60 steps (past the reference's 6 s re-encode / re-decode windows) of the server loop with
    no prompt file: the model channel's indices, latents and audio."""
    with model.duplex({"temperature": 0}, main_context=64, resynth_context=64) as session:
        session.stepper.engine.record_tokens = 100
        out = np.stack([session.step(audio[k * FRAME : (k + 1) * FRAME]).audio for k in range(60)])
        tokens = [x[0] for x in session.handle.slot.tokens]
        latents = torch.stack(session.handle.model_latents)
    assert tokens == REF["duplex_tokens"][:, 1].tolist()
    np.testing.assert_allclose(latents, REF["duplex_model_latents"][-8:], rtol=0, atol=1e-9)
    rms = np.sqrt((out.astype(np.float64) ** 2).mean(1))
    np.testing.assert_allclose(rms, REF["duplex_audio_rms"], rtol=1e-6)
    np.testing.assert_allclose(out[REF["duplex_frames"]], REF["duplex_audio_frames"], rtol=0, atol=1e-7)
