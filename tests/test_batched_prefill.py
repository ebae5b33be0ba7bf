"""Batched prefill of new arrivals (#14 item 6): Mini-Omni's ``start_many`` gives each session the
tokens ``start`` gives it alone (float32; prompts of different lengths and tasks padded into one
forward), and the scheduler admits a burst in groups of ``prefill_batch`` interleaved with the
running sessions' decode steps, a failure staying with its session (or its batch)."""
import threading

import pytest
import torch

import zoo
from zoo.core.scheduler import Scheduler
from zoo.core.types import BatchStarter, Chunk
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


@pytest.mark.parametrize("share_prefix", [True, False])
def test_start_many_equals_one_start_each(tiny_omni32, share_prefix):
    gpt = tiny_omni32.gpt
    alone = Engine(gpt, max_rows=7)
    one_by_one = sessions(tiny_omni32)
    for s in one_by_one:
        alone.start(s)
    expected = decode(alone, one_by_one)
    engine = Engine(gpt, max_rows=9, share_prefix=share_prefix)
    batch = sessions(tiny_omni32, too_long=True)
    engine.start_many(batch)
    assert isinstance(batch[2].error, ValueError) and batch[2].done and batch[2].rows is None
    assert all(s.error is None for i, s in enumerate(batch) if i != 2)
    assert all(len(o) > 1 for o in expected)
    assert decode(engine, batch) == expected


# -- the scheduler's admission ------------------------------------------------------------------
class Job:
    def __init__(self, number, steps=3, bad=False):
        self.number, self.left, self.bad = number, steps, bad
        self.done, self.error = False, None

    def poll(self):
        return None if self.done else Chunk(text=str(self.number))


class Stepper:
    """Records what the scheduler asks: starts, batched starts and steps."""

    def __init__(self, hold: threading.Event | None = None, fail_batch: bool = False):
        self.calls, self.hold, self.fail_batch = [], hold, fail_batch
        self.entered = threading.Event()

    def start(self, job):
        self.calls.append(("start", [job.number]))
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(10)

    def start_many(self, jobs):
        self.calls.append(("start_many", [j.number for j in jobs]))
        if self.fail_batch:
            raise RuntimeError("the batched forward failed")
        for job in jobs:
            if job.bad:
                job.error, job.done = ValueError("prompt too long"), True

    def step(self, jobs):
        self.calls.append(("step", [j.number for j in jobs]))
        for job in jobs:
            job.left -= 1
            job.done = job.left <= 0

    def release(self, job):
        pass


def burst(stepper, jobs, prefill_batch=8):
    """The first job starts alone and holds the worker while the others arrive."""
    results = {job.number: [] for job in jobs}
    done = threading.Semaphore(0)

    def deliver_to(number):
        def deliver(item):
            results[number].append(item)
            if item is None or isinstance(item, Exception):
                done.release()
        return deliver

    scheduler = Scheduler(stepper, max_sessions=len(jobs), prefill_batch=prefill_batch)
    try:
        for job in jobs:
            scheduler.submit(job, deliver_to(job.number))
            assert stepper.entered.wait(10)  # the first one is being started: the rest queue up
        if stepper.hold is not None:
            stepper.hold.set()
        for _ in jobs:
            assert done.acquire(timeout=10)
    finally:
        scheduler.stop()
    return results


def test_a_burst_joins_in_batches_between_decode_steps():
    hold = threading.Event()
    stepper = Stepper(hold)
    assert isinstance(stepper, BatchStarter)
    jobs = [Job(n, bad=n == 5) for n in range(20)]
    results = burst(stepper, jobs)
    joins = [numbers for kind, numbers in stepper.calls if kind.startswith("start")]
    assert joins[0] == [0] and sorted(sum(joins, [])) == list(range(20))
    assert all(len(numbers) <= 8 for numbers in joins)
    assert joins[1:] == [list(range(1, 9)), list(range(9, 17)), list(range(17, 20))]
    kinds = [kind for kind, _ in stepper.calls]
    for i, kind in enumerate(kinds[:-1]):  # the running sessions step between two admissions
        if kind.startswith("start") and i > 0:
            assert kinds[i - 1] == "step"
    assert isinstance(results[5][-1], ValueError)  # only the job that could not start fails
    assert all(results[n][-1] is None for n in range(20) if n != 5)


def test_a_failed_batched_prefill_fails_its_batch_only():
    hold = threading.Event()
    stepper = Stepper(hold, fail_batch=True)
    results = burst(stepper, [Job(n) for n in range(4)], prefill_batch=2)
    assert results[0][-1] is None  # started alone, before the burst
    assert all(isinstance(results[n][-1], RuntimeError) for n in (1, 2))  # one batch of two
    assert results[3][-1] is None  # the next group (of one) starts on its own


def test_prefill_batch_must_be_positive():
    with pytest.raises(ValueError):
        Scheduler(Stepper(), max_sessions=1, prefill_batch=0)
