"""Hertz-dev generation on the tiny checkpoint: deterministic mode, seeds, respond() streaming
equal to a one-pass decode, duplex sessions (sliding contexts over 200 steps, batched slots equal
to single ones, prompts), option and frame validation, the global RNG left alone."""
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SAMPLES

import zoo
from zoo.hertz_dev.codec import FRAME

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def tiny_hertz(one_thread):
    return zoo.load("hertz-dev", random_weights="tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_hertz64(one_thread):
    return zoo.load("hertz-dev", random_weights="tiny", device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def speech():
    return np.concatenate([sf.read(SAMPLES / f"0{i}.wav", dtype="float32")[0] for i in (1, 2)])


def reply_audio(model, audio, options):
    return np.concatenate([c.audio for c in model.respond(audio, 16000, options)])


def test_respond_streams_max_new_tokens_frames(tiny_hertz, speech):
    chunks = list(tiny_hertz.respond(speech[:20000], 16000, {"max_new_tokens": 5, "seed": 3}))
    assert len(chunks) == 5
    for chunk in chunks:
        assert chunk.audio.dtype == np.float32 and chunk.audio.shape == (FRAME,) and chunk.text == ""
        assert np.abs(chunk.audio).max() <= 1.0 and chunk.audio.std() > 1e-3  # noise, not silence


def test_the_streamed_continuation_equals_a_one_pass_decode(tiny_hertz64, speech):
    """A prompt longer than the decoder's context (so the streaming decoder starts from the
    prompt's tail): the new frames equal the one-pass decode of prompt + continuation."""
    model = tiny_hertz64
    prompt_frames = model.codec.decoder_context() + 4
    reply = model.start_reply(speech[: prompt_frames * FRAME - 700], 16000, {"max_new_tokens": 6, "seed": 1})
    streamed = np.concatenate([c.audio for c in model._stream(reply)])
    assert reply.prompt_latents.shape == (1, prompt_frames, 32)  # front-padded to whole frames
    assert len(reply.latents) == 6 and streamed.size == 6 * FRAME
    everything = torch.cat([reply.prompt_latents, torch.stack(reply.latents)[None]], dim=1)
    with torch.inference_mode():
        one_pass = model.codec.decode(everything)[0, 0, prompt_frames * FRAME :].numpy()
    np.testing.assert_allclose(streamed, np.clip(one_pass, -1, 1), rtol=0, atol=1e-7)  # float32 chunks


def test_deterministic_mode_is_reproducible_and_ignores_the_seed(tiny_hertz, speech):
    a = reply_audio(tiny_hertz, speech[:16000], {"temperature": 0, "max_new_tokens": 4, "seed": 1})
    b = reply_audio(tiny_hertz, speech[:16000], {"temperature": 0, "max_new_tokens": 4, "seed": 1})
    c = reply_audio(tiny_hertz, speech[:16000], {"temperature": 0, "max_new_tokens": 4, "seed": 2})
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_sampling_is_seeded_and_seeds_differ(tiny_hertz, speech):
    options = {"max_new_tokens": 4, "temperature": 0.8}
    a = reply_audio(tiny_hertz, speech[:16000], {**options, "seed": 1})
    b = reply_audio(tiny_hertz, speech[:16000], {**options, "seed": 1})
    c = reply_audio(tiny_hertz, speech[:16000], {**options, "seed": 2})
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_each_temperature_only_moves_its_own_part(tiny_hertz64, speech):
    """Zero categorical and gaussian temperatures with a sampled token: the mixture part is
    deterministic, so the latents are component means of the sampled tokens' mixtures."""
    base = {"max_new_tokens": 3, "categorical_temp": 0.0, "gaussian_temp": 0.0, "temperature": 1.0}
    a = tiny_hertz64.start_reply(speech[:16000], 16000, {**base, "seed": 5})
    list(tiny_hertz64._stream(a))
    b = tiny_hertz64.start_reply(speech[:16000], 16000, {**base, "seed": 5})
    list(tiny_hertz64._stream(b))
    assert a.tokens == b.tokens and all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))


def test_the_global_rng_is_untouched(tiny_hertz, speech):
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    list(tiny_hertz.respond(speech[:8000], 16000, {"max_new_tokens": 2, "temperature": 1.0}))
    with tiny_hertz.duplex({"temperature": 1.0}, main_context=8, resynth_context=8) as session:
        for k in range(3):
            session.step(speech[k * FRAME : (k + 1) * FRAME])
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_options_are_validated(tiny_hertz):
    with pytest.raises(zoo.OptionsError):
        tiny_hertz.options({"gaussian_temp": -1})
    with pytest.raises(zoo.OptionsError):
        tiny_hertz.options({"nope": 1})
    options = tiny_hertz.options({})
    assert (options.temperature, options.categorical_temp, options.gaussian_temp) == (0.8, 0.4, 0.1)


# -- duplex ----------------------------------------------------------------------------------
def test_a_duplex_session_runs_200_steps_with_sliding_contexts(tiny_hertz, speech):
    """Tiny contexts (12 main, 20 resynthesizer positions) slide many times in 200 steps (25 s):
    each step returns 2000 samples, the caches never grow, the time per step stays flat."""
    session = tiny_hertz.duplex({"seed": 7}, main_context=12, resynth_context=20)
    stepper, slot = session.stepper, session.handle.slot
    memory = stepper.nbytes()
    times = []
    for k in range(200):
        frame = speech[(k * FRAME) % (speech.size - FRAME) :][:FRAME]
        start = time.perf_counter()
        chunk = session.step(frame)
        times.append(time.perf_counter() - start)
        assert chunk.audio.shape == (FRAME,) and chunk.audio.dtype == np.float32 and chunk.text == ""
        assert slot.main_len <= 12 and slot.resynth_len <= 20
    assert session.steps == 200 and slot.slides >= 200 // 12
    assert stepper.nbytes() == memory
    early, late = np.median(times[10:50]), np.median(times[150:])
    assert late < 3 * early + 0.02, (early, late)
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.step(speech[:FRAME])


def test_batched_duplex_slots_equal_single_sessions(tiny_hertz64, speech):
    """Two sessions stepped together in one stepper (b joins at step 2, a leaves after step 5)
    produce what each produces alone: per-slot caches, streaming states and generators."""
    frames_a = [speech[k * FRAME : (k + 1) * FRAME] for k in range(8)]
    frames_b = [speech[(k + 10) * FRAME : (k + 11) * FRAME] for k in range(8)]
    opts_a, opts_b = {"seed": 1}, {"seed": 2, "temperature": 0}

    def alone(options, frames):
        with tiny_hertz64.duplex(options, main_context=6, resynth_context=8) as session:
            return [session.step(f).audio for f in frames]

    expected_a, expected_b = alone(opts_a, frames_a[:6]), alone(opts_b, frames_b[:6])
    stepper = tiny_hertz64.duplex_stepper(3, main_context=6, resynth_context=8)
    a = stepper.open(opts_a)
    got_a, got_b = [], []
    for k in range(2):
        got_a += stepper.step([a], [frames_a[k]])
    b = stepper.open(opts_b)
    for k in range(2, 6):
        out = stepper.step([a, b], [frames_a[k], frames_b[k - 2]])
        got_a.append(out[0])
        got_b.append(out[1])
    row_a = a.slot.row
    stepper.close(a)
    for k in range(4, 6):
        got_b += stepper.step([b], [frames_b[k]])
    for got, expected in ((got_a, expected_a), (got_b, expected_b)):
        np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=0, atol=1e-6)
    with tiny_hertz64.duplex(main_context=6, resynth_context=8) as other:
        with pytest.raises(ValueError, match="opened by this stepper"):
            stepper.step([b, other.handle], [frames_b[0], frames_b[0]])
    c = stepper.open(opts_a)  # a freed slot is reused from a clean state
    assert c.slot.row == row_a
    np.testing.assert_allclose(stepper.step([c], [frames_a[0]])[0], expected_a[0], rtol=0, atol=1e-6)


def test_duplex_with_a_prompt(tiny_hertz, speech):
    stereo = np.stack([speech[:8000], speech[8000:16000]], axis=1)  # (samples, 2): user, model
    with tiny_hertz.duplex({"seed": 0}, prompt=stereo, sample_rate=16000, main_context=16) as session:
        assert session.handle.slot.main_len == 4  # the prompt's 4 frames are in the context
        assert session.step(speech[:FRAME]).audio.shape == (FRAME,)
    with pytest.raises(zoo.AudioInputError, match="at least one frame"):
        tiny_hertz.duplex(prompt=speech[:100], sample_rate=16000)


def test_duplex_frames_are_validated(tiny_hertz):
    with tiny_hertz.duplex(main_context=4, resynth_context=4) as session:
        with pytest.raises(zoo.AudioInputError, match="2000 samples"):
            session.step(np.zeros(1999, np.float32))
        with pytest.raises(zoo.AudioInputError, match="NaN"):
            session.step(np.full(2000, np.nan, np.float32))
        pcm = (np.arange(2000) % 100).astype(np.int16)  # int16 PCM is scaled, as elsewhere
        assert session.step(pcm).audio.shape == (FRAME,)


def test_batched_respond_through_the_scheduler(tiny_hertz, speech):
    """The scheduler's stepper: two replies in one batch equal the same replies alone."""
    from zoo.core.scheduler import Scheduler

    options = [{"max_new_tokens": 3, "seed": s} for s in (1, 2)]
    alone = [reply_audio(tiny_hertz, speech[:12000], o) for o in options]
    scheduler = Scheduler(tiny_hertz.stepper(2), max_sessions=2)
    results: dict[int, list] = {0: [], 1: []}
    finished = []
    try:
        for i, o in enumerate(options):
            job = scheduler.stepper.prepare(speech[:12000], 16000, tiny_hertz.options(o))
            scheduler.submit(job, lambda item, i=i: finished.append(i) if item is None else results[i].append(item))
        deadline = time.time() + 60
        while len(finished) < 2 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    for i in range(2):
        np.testing.assert_allclose(np.concatenate([c.audio for c in results[i]]), alone[i], rtol=0, atol=1e-5)


def test_mixture_draws_follow_the_reference_rule_per_slot_in_one_batch():
    """Engine._latents draws every slot's latents in one batched pass: each slot gets exactly the
    reference's temp_sample written out here (Gumbel-max over weights / categorical_temp with its
    own generator, then loc + scale * gaussian_temp * N(0, 1)), whatever its batch companions;
    zero temperatures give the most probable component's mean."""
    from zoo.hertz_dev.engine import Engine, Slot
    from zoo.hertz_dev.options import HertzOptions

    C, K, Z = 2, 5, 4
    g = torch.Generator().manual_seed(0)
    locs, scales = torch.randn(3, C, K, Z, generator=g), torch.rand(3, C, K, Z, generator=g) + 0.5
    weights = torch.randn(3, C, K, generator=g) * 3
    temps = [(0.4, 0.1), (0.0, 0.3), (2.0, 0.0)]

    def slot(i, seed):
        options = HertzOptions(categorical_temp=temps[i][0], gaussian_temp=temps[i][1])
        return Slot(row=i, options=options, generator=torch.Generator().manual_seed(seed), history=torch.zeros(1, Z))

    def reference(i, seed):
        generator = torch.Generator().manual_seed(seed)
        cat, gauss = temps[i]
        if cat > 0:
            gumbels = -torch.empty(C, K).exponential_(generator=generator).log()
            k = (weights[i] / cat + gumbels).argmax(dim=-1)
        else:
            k = weights[i].argmax(dim=-1)
        loc, scale = locs[i, torch.arange(C), k], scales[i, torch.arange(C), k]
        return loc + scale * gauss * torch.randn(C, Z, generator=generator) if gauss > 0 else loc

    batched = Engine._latents([slot(i, 10 + i) for i in range(3)], locs, scales, weights)
    for i in range(3):
        assert torch.equal(batched[i], reference(i, 10 + i))
        alone = Engine._latents([slot(i, 10 + i)], locs[i : i + 1], scales[i : i + 1], weights[i : i + 1])
        assert torch.equal(alone[0], batched[i])
