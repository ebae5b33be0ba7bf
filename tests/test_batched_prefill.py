"""Batched prefill of new arrivals (#14 item 6): ``start_many`` gives each session the tokens
``start`` gives it alone (float32; prompts of different lengths padded into one forward), for
Mini-Omni (tasks of one and two rows) and GLM-4-Voice (multi-turn prompts; ``SlotEngine.prefill_many``
beside slots with history), and the scheduler admits a burst in groups of ``prefill_batch``
interleaved with the running sessions' decode steps, a failure staying with its session (or its
batch)."""
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SAMPLES, Deliveries

import zoo
from zoo.core.scheduler import Scheduler
from zoo.core.types import BatchStarter, Chunk
from zoo.glm4_voice.engine import SlotEngine
from zoo.mini_omni.engine import Engine, Session
from zoo.mini_omni.prompts import TASKS, audio_question, text_question

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread

STEPS = 10


@pytest.fixture(scope="module")
def tiny_omni32(one_thread):
    return zoo.load("mini-omni", random_weights="tiny", device="cpu", dtype="float32")


def sessions(model, too_long=False):
    """Audio questions of three lengths (two rows each) and a typed one (one row)."""
    generator = torch.Generator().manual_seed(3)
    opts = model.options({"temperature": 0})
    dim = model.gpt.config.whisper_adapter_dim
    out = []
    for n in (9, 15, 4):
        task = TASKS["A1A2+A1T2"]
        out.append(Session(task, audio_question(task, n), torch.randn(1, n, dim, generator=generator), opts,
                           max_outputs=STEPS + 1))
    out.insert(1, Session(TASKS["T1A2"], text_question(TASKS["T1A2"], [11, 12, 13]), None, opts,
                          max_outputs=STEPS + 1))
    if too_long:
        n = model.gpt.config.block_size
        out.insert(2, Session(TASKS["A1A2+A1T2"], audio_question(TASKS["A1A2+A1T2"], n), torch.zeros(1, n, dim),
                              opts, max_outputs=STEPS))
    return out


def decode(engine, batch):
    live = [s for s in batch if not s.done]
    for _ in range(STEPS):
        engine.step(live)
    return [s.outputs for s in batch if s.error is None]


def outputs_alone(model, share_prefix=None):
    """``decode`` of ``sessions``, each started alone."""
    alone = Engine(model.gpt, max_rows=7, share_prefix=share_prefix)
    one_by_one = sessions(model)
    for s in one_by_one:
        alone.start(s)
    return decode(alone, one_by_one)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_start_many_equals_one_start_each(tiny_omni32, share_prefix):
    gpt = tiny_omni32.gpt
    expected = outputs_alone(tiny_omni32)
    engine = Engine(gpt, max_rows=9, share_prefix=share_prefix)
    batch = sessions(tiny_omni32, too_long=True)
    engine.start_many(batch)
    assert isinstance(batch[2].error, ValueError) and batch[2].done and batch[2].rows is None
    assert all(s.error is None for i, s in enumerate(batch) if i != 2)
    assert all(len(o) > 1 for o in expected)
    assert decode(engine, batch) == expected


# -- GLM-4-Voice ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_glm32(one_thread):
    return zoo.load("glm-4-voice", random_weights="tiny", device="cpu", dtype="float32")


def glm_replies(model, too_long=False):
    """Typed questions of three lengths, one continuing a conversation, one sampled (seeded)."""
    greedy = {"temperature": 0, "max_new_tokens": 4 * STEPS}
    history = [{"user": "hello there", "spoken": False, "assistant": "hi! how can I help you today?"}]
    out = [model.prepare(text="hi", options=greedy),
           model.prepare(text="what is the weather like today in a big city by the sea?", options=greedy),
           model.prepare(text="and then?", options=greedy, history=history),
           model.prepare(text="tell me a story", options={"seed": 5, "max_new_tokens": 4 * STEPS})]
    if too_long:
        out.insert(2, overflow(model, model.prepare(text="a question too long for the context", options=greedy)))
    return out


def overflow(model, job):
    """``job`` with a prompt longer than the model's context (``prepare`` would refuse it)."""
    job.prompt_ids = job.prompt_ids * (model.max_context // len(job.prompt_ids) + 1)
    return job


def glm_tokens(stepper, jobs):
    """Each started job's ids: the prefill's, then ``STEPS`` steps' (text and audio ids)."""
    live = [job for job in jobs if job.error is None]
    tokens = [[job.token] for job in live]
    for _ in range(STEPS):
        stepper.step(live)
        for ids, job in zip(tokens, live):
            ids.append(job.token)
            job.poll()
    for job in jobs:
        stepper.release(job)
    return tokens


def glm_tokens_alone(model):
    """``glm_tokens`` of each of ``glm_replies``, started alone on a stepper of its own."""
    expected = []
    for job in glm_replies(model):
        stepper = model.stepper(1)
        stepper.start(job)
        expected += glm_tokens(stepper, [job])
    return expected


def test_glm_start_many_equals_one_start_each(tiny_glm32):
    model = tiny_glm32
    expected = glm_tokens_alone(model)
    stepper = model.stepper(5)
    batch = glm_replies(model, too_long=True)
    assert len({len(job.prompt_ids) for job in batch}) == len(batch)
    stepper.start_many(batch)
    assert isinstance(batch[2].error, ValueError) and "positions" in str(batch[2].error) and batch[2].done
    assert all(job.error is None for i, job in enumerate(batch) if i != 2)
    ids = sum(expected, [])
    assert any(i < model.tokenizer.audio_offset for i in ids) and any(i >= model.tokenizer.audio_offset for i in ids)
    assert glm_tokens(stepper, batch) == expected
    assert stepper.engine.free_rows == list(range(5))


def assert_same_logits(batched, alone):
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.argmax(-1), alone.argmax(-1))


def test_glm_prefill_many_equals_one_prefill_each(tiny_glm32):
    """A slot with history (multi-turn: its new ids start at its length) beside fresh ones, in a
    non-contiguous order; the next step then reads each slot's own context, not the padding."""
    generator = torch.Generator().manual_seed(1)
    history, *prompts = (torch.randint(0, 168960, (n,), generator=generator).tolist() for n in (9, 5, 12, 3))
    engines = [SlotEngine(tiny_glm32.llm, slots=3, max_len=64) for _ in range(2)]
    for engine in engines:
        assert [engine.acquire() for _ in range(3)] == [0, 1, 2]
        engine.prefill(1, history)
    slots = [1, 2, 0]
    alone = torch.stack([engines[0].prefill(slot, ids) for slot, ids in zip(slots, prompts)])
    assert_same_logits(engines[1].prefill_many(slots, prompts), alone)
    assert [engine.cache.lengths for engine in engines] == [[3, 14, 12]] * 2
    nxt = torch.tensor([7, 8, 9])
    assert_same_logits(engines[1].step(slots, nxt), engines[0].step(slots, nxt))


def test_glm_prefill_many_pads_no_slot_past_its_context(tiny_glm32):
    """Padding to the longest would run the slot near the limit past it: that slot is prefilled
    on its own. A slot whose own ids do not fit fails the call before anything is written."""
    engines = [SlotEngine(tiny_glm32.llm, slots=2, max_len=16) for _ in range(2)]
    for engine in engines:
        assert [engine.acquire() for _ in range(2)] == [0, 1]
        engine.prefill(0, list(range(1, 13)))  # 4 positions left
    prompts = [[20, 21, 22], list(range(30, 40))]
    alone = torch.stack([engines[0].prefill(slot, ids) for slot, ids in enumerate(prompts)])
    with pytest.raises(ValueError, match="needs 5 more positions; 4 are left"):
        engines[1].prefill_many([0, 1], [prompts[0] + [23, 24], prompts[1]])
    assert engines[1].cache.lengths == [12, 0]
    assert_same_logits(engines[1].prefill_many([0, 1], prompts), alone)
    assert engines[1].cache.lengths == [15, 10]


# -- the scheduler's admission ------------------------------------------------------------------
class Job:
    def __init__(self, number, steps=3, bad=False):
        self.number, self.left, self.bad = number, steps, bad
        self.done, self.error = False, None

    def poll(self):
        return None if self.done else Chunk(text=str(self.number))


class Stepper:
    """A stand-in model: each job runs for its ``steps`` steps; a bad job cannot start."""

    def __init__(self, fail_batch: bool = False):
        self.fail_batch = fail_batch

    def start(self, job):
        pass

    def start_many(self, jobs):
        if self.fail_batch:
            raise RuntimeError("the batched forward failed")
        for job in jobs:
            if job.bad:
                job.error, job.done = ValueError("prompt too long"), True

    def step(self, jobs):
        for job in jobs:
            job.left -= 1
            job.done = job.left <= 0

    def release(self, job):
        pass


class Recorder:
    """A stepper as the scheduler drives it, recording the jobs' numbers in what it is asked
    (starts, batched starts, steps); a start waits for ``hold`` (set by ``burst`` once the rest of
    a burst has arrived)."""

    def __init__(self, stepper):
        self.stepper, self.calls = stepper, []
        self.entered, self.hold = threading.Event(), threading.Event()

    def start(self, job):
        self.calls.append(("start", [job.number]))
        self.entered.set()
        self.hold.wait(10)
        self.stepper.start(job)

    def start_many(self, jobs):
        self.calls.append(("start_many", [j.number for j in jobs]))
        self.stepper.start_many(jobs)

    def step(self, jobs):
        self.calls.append(("step", [j.number for j in jobs]))
        self.stepper.step(jobs)

    def release(self, job):
        self.stepper.release(job)


class Outcomes:
    """What each job's client received (``items`` by job number); ``wait`` for ``count`` jobs
    to have had their last delivery (None or an Exception), ``timeout`` seconds each."""

    def __init__(self, numbers):
        self.items = {number: [] for number in numbers}
        self._ended = threading.Semaphore(0)

    def deliver_to(self, number):
        def deliver(item):
            self.items[number].append(item)
            if item is None or isinstance(item, Exception):
                self._ended.release()
        return deliver

    def wait(self, count, timeout=10):
        for _ in range(count):
            assert self._ended.acquire(timeout=timeout)


def burst(stepper: Recorder, jobs, prefill_batch=8):
    """The first job starts alone and holds the worker while the others arrive."""
    outcomes = Outcomes(job.number for job in jobs)
    scheduler = Scheduler(stepper, max_sessions=len(jobs), prefill_batch=prefill_batch)
    try:
        for job in jobs:
            scheduler.submit(job, outcomes.deliver_to(job.number))
            assert stepper.entered.wait(10)  # the first one is being started: the rest queue up
        stepper.hold.set()
        outcomes.wait(len(jobs))
    finally:
        scheduler.stop()
    return outcomes.items


def glm_burst(model, count, bad):
    """Typed questions, greedy, 3 ids each; job ``bad``'s prompt does not fit the context."""
    jobs = []
    for number in range(count):
        job = model.prepare(text=f"question number {number}", options={"temperature": 0, "max_new_tokens": 3})
        if number == bad:
            overflow(model, job)
        job.number = number
        jobs.append(job)
    return jobs


@pytest.mark.parametrize("model", ["stand-in", "glm-4-voice"])
def test_a_burst_joins_in_batches_between_decode_steps(model, request):
    if model == "stand-in":
        stepper, jobs = Stepper(), [Job(n, bad=n == 5) for n in range(20)]
    else:
        glm = request.getfixturevalue("tiny_glm32")
        stepper, jobs = glm.stepper(20), glm_burst(glm, 20, bad=5)
    assert isinstance(stepper, BatchStarter)
    recorder = Recorder(stepper)
    results = burst(recorder, jobs)
    joins = [numbers for kind, numbers in recorder.calls if kind.startswith("start")]
    assert joins[0] == [0] and sorted(sum(joins, [])) == list(range(20))
    assert all(len(numbers) <= 8 for numbers in joins)
    assert joins[1:] == [list(range(1, 9)), list(range(9, 17)), list(range(17, 20))]
    kinds = [kind for kind, _ in recorder.calls]
    for i, kind in enumerate(kinds[:-1]):  # the running sessions step between two admissions
        if kind.startswith("start") and i > 0:
            assert kinds[i - 1] == "step"
    assert isinstance(results[5][-1], ValueError)  # only the job that could not start fails
    assert all(results[n][-1] is None for n in range(20) if n != 5)


def test_a_failed_batched_prefill_fails_its_batch_only():
    recorder = Recorder(Stepper(fail_batch=True))
    results = burst(recorder, [Job(n) for n in range(4)], prefill_batch=2)
    assert results[0][-1] is None  # started alone, before the burst
    assert all(isinstance(results[n][-1], RuntimeError) for n in (1, 2))  # one batch of two
    assert results[3][-1] is None  # the next group (of one) starts on its own


@pytest.fixture(scope="module")
def tiny_hertz32(one_thread):
    return zoo.load("hertz-dev", random_weights="tiny", device="cpu")


def hertz_frames(stepper, jobs, steps=4):
    """Each job's tokens and audio after its start and ``steps`` batched steps."""
    for _ in range(steps):
        stepper.step([j for j in jobs if not j.done])
    return [(j.tokens, np.concatenate([c.audio for c in iter(j.poll, None)])) for j in jobs]


@pytest.fixture
def hertz_prefills(monkeypatch):
    """(batch, length) of every Hertz-dev engine advance that prefills (more than one latent)."""
    from zoo.hertz_dev.engine import Engine as HertzEngine

    prefills, advance = [], HertzEngine.advance

    def recording(engine, slots, latents):
        if latents.size(1) > 1:
            prefills.append(tuple(latents.shape[:2]))
        return advance(engine, slots, latents)

    monkeypatch.setattr(HertzEngine, "advance", recording)
    return prefills


def test_hertz_start_many_prefills_prompts_of_one_length_together_and_equals_one_start_each(tiny_hertz32,
                                                                                            hertz_prefills):
    """Replies whose prompts have one length share one prefill forward; each gets the frames it
    gets started alone (greedy); a prompt too long for the context fails alone."""
    from zoo.hertz_dev.reply import ReplyStepper


    audio, rate = sf.read(SAMPLES / "01.wav", dtype="float32")
    lengths = (1.0, 1.5, 1.0, 1.9)  # seconds: prompts of 8, 12, 8 and 16 latents; the context holds 12
    opts = {"temperature": 0, "max_new_tokens": 8}

    def jobs(stepper):
        return [stepper.prepare(audio[: int(s * rate)], rate, opts) for s in lengths]

    batched = ReplyStepper(tiny_hertz32, max_sessions=4, context=12)
    together = jobs(batched)
    batched.start_many(together)
    assert sorted(hertz_prefills) == [(1, 12), (2, 8)]  # the two 1 s prompts in one forward
    assert "the context holds 12" in str(together[3].error) and together[3].done
    got = hertz_frames(batched, together[:3])
    for job, (tokens, sound) in zip(together[:3], got):
        alone = ReplyStepper(tiny_hertz32, max_sessions=1, context=12)
        (mine,) = [jobs(alone)[lengths.index(job_length(job))]]
        alone.start(mine)
        (expected_tokens, expected_sound), = hertz_frames(alone, [mine])
        assert tokens == expected_tokens
        np.testing.assert_allclose(sound, expected_sound, atol=1e-4)


def test_hertz_duplex_sessions_opening_together_share_the_prompts_prefill(tiny_hertz32, hertz_prefills):
    """A burst of duplex sessions opening with the server's prompt: one prefill forward for all
    (BatchOpener.open_many); a session with bad options gets its error in its place; each other
    session's frames are those it gets opened alone."""
    from zoo.core.errors import OptionsError

    audio, rate = sf.read(SAMPLES / "01.wav", dtype="float32")
    prompt = audio[:rate]  # 1 s: 8 frames
    frames = (0.1 * np.random.default_rng(0).standard_normal((4, 2000))).astype(np.float32)

    def run(stepper, handles):
        return [stepper.step(handles, [f] * len(handles)) for f in frames]

    stepper = tiny_hertz32.duplex_stepper(3, main_context=16, resynth_context=16)
    greedy = {"temperature": 0}
    opened = stepper.open_many([greedy, {"gaussian_temp": -1}, greedy], prompt=prompt, sample_rate=rate)
    assert hertz_prefills == [(2, 8)] and isinstance(opened[1], OptionsError)
    together = run(stepper, [opened[0], opened[2]])
    alone_stepper = tiny_hertz32.duplex_stepper(1, main_context=16, resynth_context=16)
    alone = run(alone_stepper, [alone_stepper.open(greedy, prompt=prompt, sample_rate=rate)])
    for got in ([t[0] for t in together], [t[1] for t in together]):
        np.testing.assert_allclose(np.stack(got), np.stack([a[0] for a in alone]), atol=1e-4)


def test_the_duplex_scheduler_opens_a_burst_together_with_its_prompt(tiny_hertz32, monkeypatch):
    """Arrivals of one tick are opened in one ``open_many`` with the scheduler's prompt; each
    gets its frames."""

    from zoo.core.scheduler import DuplexScheduler

    audio, rate = sf.read(SAMPLES / "01.wav", dtype="float32")
    stepper = tiny_hertz32.duplex_stepper(3, main_context=16, resynth_context=16)
    calls, open_many = [], stepper.open_many
    monkeypatch.setattr(stepper, "open_many", lambda options, **kw: calls.append(len(options)) or open_many(options, **kw))
    hub = DuplexScheduler(stepper, 3, 2000, prompt=(audio[:rate], rate), warm_up=False)
    deliveries = Deliveries(3)
    try:
        tickets = [hub.reserve(tiny_hertz32.options({"seed": i}), deliveries.to(i)) for i in range(3)]
        with hub._cv:  # the three first frames arrive before the worker's next tick
            for ticket in tickets:
                hub.push(ticket, np.zeros(2000, np.float32))
        for _ in tickets:
            assert deliveries.arrived.acquire(timeout=60)
    finally:
        hub.stop()
    assert calls == [3]
    assert all(len(g) == 1 and isinstance(g[0], np.ndarray) and g[0].shape == (2000,) for g in deliveries.got)


def job_length(job) -> float:
    return {8: 1.0, 12: 1.5}[job.prompt_latents.size(1)]


def test_prefill_batch_must_be_positive():
    with pytest.raises(ValueError):
        Scheduler(Stepper(), max_sessions=1, prefill_batch=0)
