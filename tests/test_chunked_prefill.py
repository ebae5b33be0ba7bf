"""Chunked prefill (#14 item 6): a long prompt starts in parts between the running sessions' decode
steps. ``start_part`` in parts of any size leaves a job exactly as ``start`` does (Mini-Omni's
engine with one and two rows, shared prefix or not; GLM-4-Voice with history and sampling), and
the scheduler bounds the prompt positions prefilled between two steps, keeps arrival order,
frees the slot of a job cancelled between parts and keeps a failed part's error with its job."""
import threading

import numpy as np
import pytest
import soundfile as sf
from conftest import SAMPLES
from test_batched_prefill import (
    Job,
    Outcomes,
    decode,
    glm_replies,
    glm_tokens,
    glm_tokens_alone,
    hertz_frames,
    outputs_alone,
    sessions,
)
from test_batched_prefill import Stepper as WholeStepper

import zoo
from zoo.core.admission import Admissions
from zoo.core.scheduler import Scheduler
from zoo.core.types import ChunkedStarter
from zoo.mini_omni.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def tiny_omni32(one_thread):
    return zoo.load("mini-omni", random_weights="tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_glm32(one_thread):
    return zoo.load("glm-4-voice", random_weights="tiny", device="cpu", dtype="float32")


def in_parts(start_part, job, length, size):
    """Start ``job`` in parts of ``size`` positions; checks only the last part finishes it."""
    parts = -(-length // size)
    finished = [start_part(job, size) for _ in range(parts)]
    assert finished == [False] * (parts - 1) + [True]


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("size", [1, 2, 5])
def test_mini_omni_start_in_parts_equals_start(tiny_omni32, share_prefix, size):
    gpt = tiny_omni32.gpt
    expected = outputs_alone(tiny_omni32, share_prefix)
    engine = Engine(gpt, max_rows=7, share_prefix=share_prefix)
    batch = sessions(tiny_omni32)
    for s in batch:
        assert s.prompt_length > size
        rows_before = engine.free_rows
        assert engine.start_part(s, size) is False  # the first part takes the rows
        taken = [r for r in rows_before if r not in engine.free_rows]
        assert len(taken) == s.task.rows and engine.cache.lengths[taken[0]] == size and not s.outputs
        in_parts(engine.start_part, s, s.prompt_length - size, size)
        assert s.unfinished is None and len(s.outputs) == 1
        assert [engine.cache.lengths[r] for r in s.rows] == [s.prompt_length] * s.task.rows
    assert all(len(o) > 1 for o in expected)
    assert decode(engine, batch) == expected


def test_mini_omni_release_between_parts_frees_the_rows(tiny_omni32):
    engine = Engine(tiny_omni32.gpt, max_rows=2)
    session = sessions(tiny_omni32)[0]
    assert engine.start_part(session, 3) is False and engine.free_rows == []
    engine.release(session)
    assert engine.free_rows == [0, 1] and session.unfinished is None and session.done


def test_glm_start_in_parts_equals_start(tiny_glm32):
    model = tiny_glm32
    expected = glm_tokens_alone(model)
    stepper = model.stepper(4)
    assert isinstance(stepper, ChunkedStarter)
    jobs = glm_replies(model)
    for job, size in zip(jobs, (1, 5, 8, 3)):
        in_parts(stepper.start_part, job, stepper.prompt_length(job), size)
        assert stepper.engine.cache.lengths[job.slot] == len(job.prompt_ids)
    assert glm_tokens(stepper, jobs) == expected


def test_glm_a_prompt_too_long_fails_at_its_first_part(tiny_glm32):
    from test_batched_prefill import overflow
    stepper = tiny_glm32.stepper(1)
    job = overflow(tiny_glm32, tiny_glm32.prepare(text="hi", options={"temperature": 0}))
    with pytest.raises(ValueError, match="positions"):
        stepper.start_part(job, 4)
    stepper.release(job)
    assert stepper.engine.free_rows == [0]


@pytest.fixture(scope="module")
def tiny_hertz32(one_thread):
    return zoo.load("hertz-dev", random_weights="tiny", device="cpu")


@pytest.mark.parametrize("options", [{"temperature": 0}, {"seed": 7}], ids=["greedy", "sampled"])
def test_hertz_start_in_parts_equals_start(tiny_hertz32, options):
    """Hertz-dev's respond() prompt (continuous latents) started in parts of 1, 3, 5 and all 12
    latents gives the frames ``start`` gives: each part but the last is written with the latent
    after it, which the resynthesizer tells its last position, and nothing is drawn before the
    last part, so a sampled reply draws the same numbers in the same order."""
    from zoo.hertz_dev.reply import ReplyStepper

    audio, rate = sf.read(SAMPLES / "01.wav", dtype="float32")
    question, opts = audio[: int(1.5 * rate)], {"max_new_tokens": 8, **options}  # 12 latents

    def started(stepper, size=None):
        job = stepper.prepare(question, rate, opts)
        if size is None:
            stepper.start(job)
        else:
            in_parts(stepper.start_part, job, stepper.prompt_length(job), size)
        return job

    alone = ReplyStepper(tiny_hertz32, max_sessions=1, context=16)
    (expected_tokens, expected_sound), = hertz_frames(alone, [started(alone)])
    assert len(set(expected_tokens)) > 1
    for size in (1, 3, 5, 12):
        stepper = ReplyStepper(tiny_hertz32, max_sessions=1, context=16)
        assert isinstance(stepper, ChunkedStarter)
        job = started(stepper, size)
        assert job.prefilled == stepper.prompt_length(job) == 12 and job.slot.main_len == job.slot.resynth_len == 12
        (tokens, sound), = hertz_frames(stepper, [job])
        assert tokens == expected_tokens, size
        np.testing.assert_allclose(sound, expected_sound, atol=1e-4)


def test_hertz_a_prompt_too_long_fails_at_its_first_part(tiny_hertz32):
    from zoo.core.errors import AudioTooLong
    from zoo.hertz_dev.reply import ReplyStepper

    audio, rate = sf.read(SAMPLES / "01.wav", dtype="float32")
    stepper = ReplyStepper(tiny_hertz32, max_sessions=1, context=8)
    job = stepper.prepare(audio[: int(1.5 * rate)], rate, {"max_new_tokens": 4})
    with pytest.raises(AudioTooLong, match="the context holds 8"):
        stepper.start_part(job, 4)
    stepper.release(job)
    assert stepper.engines["mono"][0].free_rows == [0]


# -- the scheduler's budget ----------------------------------------------------------------------
class Prompted(Job):
    def __init__(self, number, length, steps=3, fails_at_part=None):
        super().__init__(number, steps)
        self.length, self.fails_at_part, self.parts, self.prefilled = length, fails_at_part, 0, 0


class PartStepper:
    """A stand-in ChunkedStarter recording what the scheduler asks: whole starts (with their
    prompt lengths), parts and steps; the first ``start`` holds the worker until ``hold`` is set,
    so that a whole queue builds up behind it."""

    def __init__(self):
        self.calls, self.released = [], []
        self.entered, self.hold = threading.Event(), threading.Event()

    def prompt_length(self, job):
        return job.length

    def start(self, job):
        self.calls.append(("start", job.number, job.length))
        self.entered.set()
        self.hold.wait(10)

    def start_many(self, jobs):
        self.calls.append(("start_many", [j.number for j in jobs], sum(j.length for j in jobs)))

    def start_part(self, job, positions):
        job.parts += 1
        if job.parts == job.fails_at_part:
            raise RuntimeError("this part's forward failed")
        self.calls.append(("part", job.number, positions))
        job.prefilled += positions
        assert job.prefilled <= job.length
        return job.prefilled == job.length

    def step(self, jobs):
        self.calls.append(("step", [j.number for j in jobs], 0))
        for job in jobs:
            job.left -= 1
            job.done = job.left <= 0

    def release(self, job):
        self.released.append(job.number)


def run(stepper, jobs, budget, cancel=None):
    """Job 0 starts first and holds the worker while the others queue; ``cancel``: the number of
    a job to cancel as soon as its first part is in."""
    outcomes = Outcomes(job.number for job in jobs)
    scheduler = Scheduler(stepper, max_sessions=len(jobs), prefill_positions=budget)
    tickets = {}
    if cancel is not None:  # cancelled from the worker thread, right after its first part
        original = stepper.start_part

        def start_part(job, positions):
            out = original(job, positions)
            if job.number == cancel:
                scheduler.cancel(tickets[cancel])
            return out
        stepper.start_part = start_part
    try:
        for job in jobs:
            tickets[job.number] = scheduler.submit(job, outcomes.deliver_to(job.number))
            assert stepper.entered.wait(10)
        stepper.hold.set()
        outcomes.wait(len(jobs) - (cancel is not None))  # a cancelled job's client hears nothing
    finally:
        scheduler.stop()
    return outcomes.items


def prefill_between_steps(calls):
    """Prompt positions prefilled between two decode steps, per gap."""
    gaps, spent = [], 0
    for kind, _, positions in calls:
        if kind == "step":
            gaps.append(spent)
            spent = 0
        else:
            spent += positions
    return gaps


def test_a_long_prompt_starts_in_parts_between_steps_and_keeps_arrival_order():
    stepper = PartStepper()
    jobs = [Prompted(0, 2, steps=12), Prompted(1, 10), Prompted(2, 3), Prompted(3, 6), Prompted(4, 1)]
    results = run(stepper, jobs, budget=4)
    calls = stepper.calls
    prefills = [(kind, number) for kind, number, _ in calls if kind != "step"]
    # job 2 does not fit what job 1's last part leaves, and waits: one job starts in parts at a time
    assert prefills == [("start", 0), ("part", 1), ("part", 1), ("part", 1), ("start", 2),
                        ("part", 3), ("part", 3), ("part", 3), ("start", 4)]
    assert [positions for kind, _, positions in calls if kind == "part"] == [4, 4, 2, 1, 4, 1]
    assert max(prefill_between_steps(calls)) <= 4  # the budget bounds every step's stall
    # the running session stepped between every two parts; the long job joined after its last
    steps = [i for i, call in enumerate(calls) if call[0] == "step"]
    parts = [i for i, call in enumerate(calls) if call[:2] == ("part", 1)]
    assert all(any(a < s < b for s in steps) for a, b in zip(parts, parts[1:]))
    def next_step(i):
        return next(call[1] for call in calls[i:] if call[0] == "step")
    assert 1 not in next_step(parts[1]) and 1 in next_step(parts[-1])
    assert all(results[n][-1] is None for n in range(5))


def test_a_job_cancelled_between_parts_frees_its_slot_and_the_rest_go_on():
    stepper = PartStepper()
    jobs = [Prompted(0, 1, steps=8), Prompted(1, 9), Prompted(2, 2)]
    results = run(stepper, jobs, budget=3, cancel=1)
    assert [c for c in stepper.calls if c[0] == "part"] == [("part", 1, 3)]  # no part after the cancel
    assert 1 in stepper.released and results[1] == []  # nothing delivered to a client that left
    assert results[2][-1] is None and results[0][-1] is None


def test_a_failed_part_ends_its_job_alone():
    stepper = PartStepper()
    jobs = [Prompted(0, 1, steps=8), Prompted(1, 9, fails_at_part=2), Prompted(2, 2)]
    results = run(stepper, jobs, budget=3)
    assert isinstance(results[1][-1], RuntimeError) and 1 in stepper.released
    assert results[0][-1] is None and results[2][-1] is None


def test_without_a_bound_or_a_chunked_stepper_jobs_join_whole():
    stepper = PartStepper()
    jobs = [Prompted(0, 2, steps=4), Prompted(1, 50), Prompted(2, 2)]
    run(stepper, jobs, budget=None)
    assert not [c for c in stepper.calls if c[0] == "part"]
    assert ("start_many", [1, 2], 52) in stepper.calls


@pytest.mark.parametrize("batch, positions", [(0, 8), (1, 0)])
def test_admission_bounds_must_be_positive(batch, positions):
    with pytest.raises(ValueError, match="must be >= 1"):
        Admissions(batch, positions, len)


# -- real models through the scheduler -----------------------------------------------------------
def scheduled(model, make_jobs, budget):
    """Each job's delivered text and audio, and the parts the stepper ran."""
    stepper = model.stepper(max_sessions=4)
    parts = []
    original = stepper.start_part

    def start_part(job, positions):
        parts.append(positions)
        return original(job, positions)
    stepper.start_part = start_part
    scheduler = Scheduler(stepper, max_sessions=4, prefill_positions=budget)
    jobs = make_jobs(stepper)
    outcomes = Outcomes(range(len(jobs)))
    try:
        for number, job in enumerate(jobs):
            scheduler.submit(job, outcomes.deliver_to(number))
        outcomes.wait(len(jobs), timeout=120)
    finally:
        scheduler.stop()
    outputs = list(outcomes.items.values())
    for items in outputs:
        assert items[-1] is None
    audio = [np.concatenate([c.audio for c in items[:-1]] + [np.zeros(0, np.float32)]) for items in outputs]
    return [("".join(c.text for c in items[:-1])) for items in outputs], audio, parts


@pytest.mark.parametrize("name", ["mini-omni", "glm-4-voice", "hertz-dev"])
def test_a_reply_started_in_parts_equals_one_started_whole(name, tiny64, question_wav, request):
    if name == "mini-omni":
        model = tiny64  # float64

        def make_jobs(stepper):
            return [stepper.prepare(str(question_wav[0]), None, {"max_new_tokens": n}) for n in (20, 12)]
    elif name == "glm-4-voice":
        model = request.getfixturevalue("tiny_glm32")

        def make_jobs(stepper):
            return glm_replies(model)[1:3]
    else:  # float64: its latents are continuous, so float32 rounding would grow from frame to frame
        model = zoo.load("hertz-dev", random_weights="tiny", device="cpu", dtype="float64")

        def make_jobs(stepper):
            return [stepper.prepare(str(question_wav[0]), None, {"max_new_tokens": n, "seed": n}) for n in (12, 8)]
    whole_text, whole_audio, whole_parts = scheduled(model, make_jobs, budget=None)
    text, audio, parts = scheduled(model, make_jobs, budget=5)
    assert not whole_parts and len(parts) > 4 and max(parts) <= 5
    assert text == whole_text and (any(whole_text) or name == "hertz-dev")  # Hertz-dev speaks no text
    for ours, theirs in zip(audio, whole_audio):
        assert ours.size == theirs.size > 0
        np.testing.assert_allclose(ours, theirs, atol=1e-5 if name == "glm-4-voice" else 1e-9)


def test_the_server_flags_set_the_bound(tiny64):
    import server
    from serving.service import Service

    assert server.parse_args(["--tiny"]).prefill_positions == 2048
    with pytest.raises(SystemExit):
        server.parse_args(["--tiny", "--prefill-positions", "-1"])
    for flag, bound in (("64", 64), ("0", None)):
        args = server.parse_args(["--tiny", "--prefill-positions", flag])
        service = Service(tiny64, 2, prefill_positions=args.prefill_positions or None)
        try:
            assert service.scheduler.prefill_positions == bound
        finally:
            service.close()
    whole = Scheduler(WholeStepper(), max_sessions=1, prefill_positions=64)
    assert whole.prefill_positions is None  # a stepper that cannot start a job in parts
    whole.stop()


@pytest.mark.parametrize("model", ["mini-omni", "hertz-dev"])
def test_the_stall_bench_runs_as_a_script(tmp_path, model):
    import json
    import subprocess
    import sys

    from conftest import REPO
    done = subprocess.run([sys.executable, "bench/prefill_stall.py", "--model", model, "--size", "tiny", "--bounds", "0",
                           "16", "--running", "2", "--warm-steps", "4", "--repeats", "1", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob(f"*_prefill_stall_{model}_tiny_cpu_float32.json")).read_text())
    whole, parts = result["runs"]
    assert whole["bound"] is None and parts["bound"] == 16
    assert whole["prompt_positions"] == parts["prompt_positions"] > 16 * 4
    assert whole["steps_while_prefilling"] <= 2 < parts["steps_while_prefilling"]


@pytest.mark.parametrize("name", ["mini-omni", "glm-4-voice", "hertz-dev"])
def test_a_part_of_no_position_is_refused_before_a_slot_is_taken(name, tiny_omni32, request):
    """``start_part(job, 0)`` is a caller's error (zoo.core.admission.part_end), raised before the
    job takes a slot: nothing is left to release."""
    if name == "mini-omni":
        engine, job = Engine(tiny_omni32.gpt, max_rows=2), sessions(tiny_omni32)[0]
        free = lambda: engine.free_rows  # noqa: E731
    else:
        model = request.getfixturevalue("tiny_glm32" if name == "glm-4-voice" else "tiny_hertz32")
        engine = model.stepper(1)
        audio, rate = sf.read(SAMPLES / "01.wav", dtype="float32")
        job = engine.prepare(audio[:rate], rate, {"max_new_tokens": 4})
        free = (lambda: engine.engine.free_rows) if name == "glm-4-voice" else (lambda: job.slot)
    before = free()
    with pytest.raises(ValueError, match="at least one position"):
        engine.start_part(job, 0)
    assert free() == before
