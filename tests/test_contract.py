"""What every model of the zoo must do, whatever it is: run over ``zoo.names()``, so a model added
to the registry is covered without a test of its own."""
import threading

import numpy as np
import pytest

import zoo

QUESTION = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
SHORT = {"max_new_tokens": 12}


@pytest.fixture(scope="module", params=zoo.names())
def model(request, _tiny_cache):
    return zoo.load(request.param, random_weights="tiny", device="cpu")


def reply(model) -> tuple[np.ndarray, str]:
    chunks = list(model.respond(QUESTION, 16000, SHORT))
    audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0, np.float32)
    return audio, "".join(c.text for c in chunks)


def test_concurrent_in_process_replies_equal_a_reply_alone(model):
    """What the in-process Gradio page does: several replies on one loaded model at once. Each
    must get its own slot and come out exactly as it does alone."""
    alone = reply(model)
    assert alone[0].size, "a reply with audio is needed for the comparison"
    results, errors = [None] * 4, []
    start = threading.Barrier(4)

    def run(i: int) -> None:
        try:
            start.wait(timeout=30)
            results[i] = reply(model)
        except Exception as err:  # noqa: BLE001 - reported below with the thread's number
            errors.append((i, err))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for audio, text in results:
        assert text == alone[1]
        np.testing.assert_array_equal(audio, alone[0])


def test_every_model_times_the_shared_benchmark_stages(model):
    stages = model.benchmark_stages(QUESTION, 16000)
    assert set(zoo.Stage) <= set(stages)
    for stage in zoo.Stage:
        stages[stage]()
        stages[stage]()  # each stage can be timed again and again


def test_the_latency_bench_runs_for_every_model(model, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "bench/latency.py", "--model", model.card.name, "--size", "tiny",
                           "--device", "cpu", "--repeats", "1", "--reply-steps", "40", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {s.value for s in zoo.Stage} <= set(result["stages"])
    assert model.card.name in (tmp_path / "latency.md").read_text()


@pytest.mark.parametrize("name", zoo.names())
def test_the_latency_bench_measures_an_image_question_for_cards_that_take_one(name, tmp_path):
    """``bench/latency.py --image``: card-driven. A model whose card says image_input is measured
    with and without the image in one run; any other model refuses the flag before loading."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "bench/latency.py", "--model", name, "--size", "tiny", "--device", "cpu",
                           "--repeats", "1", "--reply-steps", "12", "--out", str(tmp_path),
                           "--image", "demos/images/red_circle.png"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if not zoo.card(name).image_input:
        assert done.returncode == 2 and "does not take images" in done.stderr, done.stderr[-2000:]
        return
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*_image.json")).read_text())
    for case in (result, result["with_image"]):
        assert case["ttfa_ms"]["median"] > 0 and case["reply_step_ms"]["n"] > 0
        assert case["ttfa_breakdown_ms"]["prepare"] > 0
    assert result["with_image"]["image_size"] == [320, 240]
    assert {"image_encode", "image_prefill"} <= set(result["stages"])
    assert f"{name} + image" in (tmp_path / "latency.md").read_text()


# -- the card ---------------------------------------------------------------------------------------
def test_the_card_is_consistent_and_readable_without_loading(model):
    import dataclasses
    import json

    name = model.card.name
    card = zoo.card(name)  # no weights loaded for this
    assert card == model.card
    assert card.name == name and card.title and card.description
    assert card.input_sample_rate > 0 and card.output_sample_rate > 0 and card.max_input_seconds > 0
    assert card.components and all("/" in repo for repo in card.components.values())  # hub repo ids
    if card.duplex:
        assert card.frame_samples and card.frame_samples > 0
    options = {f.name for f in dataclasses.fields(model.options_class)}
    for protocol, knobs in card.protocols.items():
        assert set(knobs.values()) <= options, f"{protocol} sets options {name} does not have"
    assert json.loads(json.dumps(card.to_dict()))["name"] == name  # what /v1/models sends


# -- options ----------------------------------------------------------------------------------------
def test_a_base_options_is_converted_to_the_models_own(model):
    options = model.options(zoo.Options(temperature=0.0, max_new_tokens=12, seed=3))
    assert type(options) is model.options_class
    assert (options.temperature, options.max_new_tokens, options.seed) == (0.0, 12, 3)
    chunks = list(model.respond(QUESTION, 16000, zoo.Options(temperature=0.0, max_new_tokens=12)))
    assert chunks


@pytest.mark.parametrize("bad", [{"temperature": "hot"}, {"temperature": float("nan")}, {"seed": -1},
                                 {"max_new_tokens": 0}, {"no_such_option": 1}, {"top_p": 0.0}])
def test_bad_options_are_refused_by_name_before_any_work(model, bad):
    with pytest.raises(zoo.OptionsError, match=next(iter(bad))):
        next(iter(model.respond(QUESTION, 16000, bad)))


def test_random_weight_replies_are_capped_to_a_few_seconds_unless_asked(model):
    """A first try with random weights must not wait minutes for noise; the card's token rate
    turns the cap in seconds into the model's own token limit, and a caller's limit wins."""
    from zoo.cli import noise_notice

    cap = model.default_max_new_tokens
    assert cap == round(zoo.RANDOM_REPLY_SECONDS * model.card.reply_tokens_per_second)
    assert model.options().max_new_tokens == cap and model.options({"max_new_tokens": 5}).max_new_tokens == 5
    audio = np.concatenate([c.audio for c in model.respond(QUESTION, 16000)])
    assert 0 < audio.size / model.card.output_sample_rate <= zoo.RANDOM_REPLY_SECONDS + 1.0
    assert f"max_new_tokens={cap}" in noise_notice(model)


# -- replies -----------------------------------------------------------------------------------------
def test_chunks_carry_mono_float32_audio_in_range_and_text(model):
    chunks = list(model.respond(QUESTION, 16000, SHORT))
    assert chunks and any(c.audio.size for c in chunks)
    for chunk in chunks:
        assert chunk.audio.dtype == np.float32 and chunk.audio.ndim == 1
        assert np.all(np.abs(chunk.audio) <= 1.0) and np.all(np.isfinite(chunk.audio))
        assert isinstance(chunk.text, str)
    if not model.card.text_output:  # an audio-only card never sends text
        assert all(chunk.text == "" for chunk in chunks)
    if not model.card.text_input:
        with pytest.raises(zoo.UnsupportedError):
            next(iter(model.respond_text("hello", SHORT)))


def test_an_image_goes_only_to_a_model_whose_card_takes_one(model):
    """respond(image=) and the serving path (prepare_job) read the card: a model without vision
    refuses an image before any work; a model with vision answers about it and refuses a bad one."""
    from zoo.core.types import prepare_job

    image = np.zeros((24, 40, 3), np.uint8)
    image[:, 20:] = (200, 30, 30)
    if model.card.image_input:
        chunks = list(model.respond(QUESTION, 16000, SHORT, image=image))
        assert any(c.audio.size for c in chunks)
        with pytest.raises(zoo.ImageInputError):
            next(iter(model.respond(QUESTION, 16000, SHORT, image=b"not an image")))
        assert prepare_job(model.stepper(1), model.card, QUESTION, 16000, SHORT, None, image) is not None
    else:
        with pytest.raises(zoo.UnsupportedError, match="image"):
            next(iter(model.respond(QUESTION, 16000, SHORT, image=image)))
        with pytest.raises(zoo.UnsupportedError, match="image"):
            prepare_job(model.stepper(1), model.card, QUESTION, 16000, SHORT, None, image)


@pytest.fixture(scope="module", params=zoo.names())
def model64(request, _tiny_cache):
    return zoo.load(request.param, random_weights="tiny", device="cpu", dtype="float64")


def test_batched_stepper_output_equals_each_reply_alone(model64):
    """Two sessions of different lengths and seeds in one batched stepper (what the server runs)
    give what each gives alone through respond()."""
    questions = [(QUESTION, {"max_new_tokens": 16, "seed": 1}), (QUESTION[:9000] * 2, {"max_new_tokens": 12, "seed": 2})]
    alone = [list(model64.respond(audio, 16000, options)) for audio, options in questions]
    stepper = model64.stepper(2)
    jobs = [stepper.prepare(audio, 16000, model64.options(options)) for audio, options in questions]
    batched = [[] for _ in jobs]
    for job in jobs:
        stepper.start(job)
    while True:
        for job, out in zip(jobs, batched):
            chunk = job.poll()
            if chunk is not None:
                out.append(chunk)
            assert job.error is None
        live = [job for job in jobs if not job.done]
        if not live:
            break
        stepper.step(live)
    for job in jobs:
        stepper.release(job)
    for one, many in zip(alone, batched):
        assert "".join(c.text for c in many) == "".join(c.text for c in one)
        np.testing.assert_allclose(np.concatenate([c.audio for c in many]),
                                   np.concatenate([c.audio for c in one]), rtol=0, atol=1e-9)


# -- duplex ------------------------------------------------------------------------------------------
def test_duplex_when_the_card_says_so(model):
    if not model.card.duplex:
        with pytest.raises(zoo.UnsupportedError):
            model.duplex()
        return
    frame = np.zeros(model.card.frame_samples, np.float32)
    answer = model.card.frame_samples * model.card.output_sample_rate // model.card.input_sample_rate
    with model.duplex(zoo.Options(temperature=0.0)) as session:
        outputs = [session.step(frame) for _ in range(3)]
    for out in outputs:
        assert out.audio.dtype == np.float32 and out.audio.shape == (answer,)


@pytest.mark.parametrize("name", [n for n in zoo.names() if zoo.card(n).duplex])
def test_a_duplex_stepper_refuses_a_session_past_its_rows_and_reuses_a_closed_row_fresh(name, _tiny_cache):
    """Every duplex model's stepper: sessions past its rows are one clear error; a closed session's
    row goes to the next one (the lowest free row first), which then answers as a session of a
    fresh stepper does, nothing of the closed one left in its caches or codec states."""
    model = zoo.load(name, random_weights="tiny", device="cpu")
    rng = np.random.default_rng(0)
    frames = [(0.1 * rng.standard_normal(model.card.frame_samples)).astype(np.float32) for _ in range(3)]
    options = {"seed": 3}

    def run(stepper, handle) -> list[np.ndarray]:
        return [stepper.step([handle], [frame])[0] for frame in frames]

    fresh = model.duplex_stepper(1)
    expected = run(fresh, fresh.open(options))
    stepper = model.duplex_stepper(2)
    first, second = stepper.open(options), stepper.open(options)
    with pytest.raises(RuntimeError, match="too many sessions"):
        stepper.open(options)
    for frame in frames:  # both talk, so the first's row holds state when it closes
        stepper.step([first, second], [frame, frame[::-1].copy()])
    row = stepper.row(first)
    stepper.close(first)
    again = stepper.open(options)
    assert stepper.row(again) == row
    for got, want in zip(run(stepper, again), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in zoo.names() if zoo.card(n).duplex])
def test_the_duplex_bench_times_graph_and_eager_steps_for_every_duplex_model(name, tmp_path):
    """``python bench/duplex.py`` as bench/gpu.sh runs it (as a script, from the repository root):
    card-driven, the default steps (CUDA graphs on a GPU) beside exact eager ones (--eager-too)."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "bench/duplex.py", "--model", name, "--size", "tiny", "--device", "cpu",
                           "--dtype", "float32", "--sessions", "1", "2", "--steps", "2", "--eager-too",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob(f"*_{name}_duplex_tiny_cpu_float32.json")).read_text())
    assert [r["sessions"] for r in result["rows"]] == [1, 2]
    assert all(r["step_ms"] > 0 and r["eager_step_ms"] > 0 for r in result["rows"])
    # on CPU both are eager: the same seeds and frames give the same audio
    assert all(r["max_abs_vs_eager"] == 0.0 for r in result["rows"])
    assert result["frame_ms"] == 1000 * zoo.card(name).frame_samples / zoo.card(name).input_sample_rate
