"""zoo.core.scheduler with Mini-Omni's stepper: sessions batched together give each session exactly
what it gets alone; cancellation and failures stay with their session."""
import threading

import numpy as np

from zoo.core.scheduler import Busy, Scheduler


def collect(scheduler, job):
    items, finished = [], threading.Event()

    def deliver(item):
        items.append(item)
        if item is None or isinstance(item, Exception):
            finished.set()

    ticket = scheduler.submit(job, deliver)
    return ticket, items, finished


def test_batched_sessions_equal_each_session_alone(tiny64, question_wav):
    audio = str(question_wav[0])
    lengths = [14, 22, 9, 30]
    alone = []
    for n in lengths:
        chunks = list(tiny64.respond(audio, options={"max_new_tokens": n}))
        alone.append((np.concatenate([c.audio for c in chunks]), "".join(c.text for c in chunks)))
    stepper = tiny64.stepper(max_sessions=4)
    scheduler = Scheduler(stepper, max_sessions=4)
    try:
        runs = [collect(scheduler, stepper.prepare(audio, None, {"max_new_tokens": n})) for n in lengths]
        for _, _, finished in runs:
            assert finished.wait(120)
        assert scheduler.steps < sum(lengths)  # they really shared steps
        for (_, items, _), (audio_alone, text_alone) in zip(runs, alone):
            assert items[-1] is None
            chunks = items[:-1]
            np.testing.assert_allclose(np.concatenate([c.audio for c in chunks]), audio_alone, atol=1e-9)
            assert "".join(c.text for c in chunks) == text_alone
        assert sorted(stepper.engine.free_rows) == list(range(8))
    finally:
        scheduler.stop()


def test_capacity_cancel_and_release(tiny64, question_wav):
    stepper = tiny64.stepper(max_sessions=2)
    scheduler = Scheduler(stepper, max_sessions=2)
    try:
        long_job = stepper.prepare(str(question_wav[0]), None, {"max_new_tokens": 1500})
        ticket, items, finished = collect(scheduler, long_job)
        collect(scheduler, stepper.prepare(str(question_wav[0]), None, {"max_new_tokens": 1500}))
        try:
            scheduler.submit(stepper.prepare(str(question_wav[0]), None, {}), lambda item: None)
            raise AssertionError("a third session was admitted")
        except Busy:
            pass
        scheduler.cancel(ticket)
        for _ in range(200):
            if scheduler.load < 2:
                break
            threading.Event().wait(0.05)
        assert scheduler.load == 1 and not finished.is_set()  # freed, and nobody is told
    finally:
        scheduler.stop()


def test_one_slot_steppers_reuse_when_idle_and_never_share_a_slot():
    from zoo.core.scheduler import OneSlotSteppers
    from zoo.core.types import Chunk

    made = []

    class CountingJob:
        def __init__(self, n):
            self.left, self.done, self.error = n, False, None

        def poll(self):
            return Chunk(text="x") if not self.done else None

    class OneSlot:
        def __init__(self):
            self.busy = False
            made.append(self)

        def start(self, job):
            assert not self.busy, "a one-slot stepper got a second job"
            self.busy = True

        def step(self, jobs):
            for job in jobs:
                job.left -= 1
                job.done = job.left == 0

        def release(self, job):
            self.busy = False

    pool = OneSlotSteppers(OneSlot)
    assert len(list(pool.stream(CountingJob(3)))) == 3
    first, second = pool.stream(CountingJob(2)), pool.stream(CountingJob(2))
    next(first), next(second)  # two replies in flight at once
    list(first), list(second)
    assert len(made) == 2  # the idle one was reused, the concurrent one got its own
    list(pool.stream(CountingJob(1)))
    assert len(made) == 2
