"""A failure while serving one session ends that session only: its client gets the error, and the
other sessions of its batch go on bit-identically to a run where it was cancelled at that step
(zoo.core.isolation.isolate; the reply Scheduler; Hertz-dev's DuplexStepper and the duplex hub)."""
import threading

import numpy as np
import pytest
from conftest import Deliveries

import zoo
from zoo.core.sampling import UnusableLogits
from zoo.core.scheduler import Scheduler
from zoo.core.types import Chunk

VICTIM_SEED = 666  # the session whose draws fail is the one seeded with this
WAIT_S = 120


class FailingRows:
    """Replaces a module's ``sample_rows``: from the ``after + 1``-th call with a session drawing
    with the victim's generator on, that session comes back unusable (as NaN logits would); every
    draw is the real one."""

    def __init__(self, real, after: int) -> None:
        self.real, self.after, self.calls = real, after, 0

    def __call__(self, logits, sessions):
        tokens, unusable = self.real(logits, sessions)
        victims = [i for i, s in enumerate(sessions) if s.generator is not None and s.generator.initial_seed() == VICTIM_SEED]
        if victims:
            self.calls += 1
            if self.calls > self.after:
                unusable = unusable.clone()
                unusable[victims] = True
        return tokens, unusable


class Gated:
    """A stepper whose first ``start`` waits until every job is submitted (so all join at the
    same points in both runs), counting steps; ``after_step(n)`` runs on the scheduler thread
    right after step n, before its outputs are delivered."""

    def __init__(self, stepper) -> None:
        self.stepper = stepper
        self.gate = threading.Event()
        self.steps = 0
        self.after_step = lambda n: None

    def start(self, job):
        assert self.gate.wait(WAIT_S)
        self.stepper.start(job)

    def step(self, jobs):
        try:
            self.stepper.step(jobs)
        finally:
            self.steps += 1
        self.after_step(self.steps)

    def release(self, job):
        self.stepper.release(job)


def serve(stepper, jobs, victim_index, cancel_victim_after=None):
    """Run ``jobs`` through a Scheduler; returns (what each ticket got, step the victim failed at)."""
    gated = Gated(stepper)
    scheduler = Scheduler(gated, max_sessions=len(jobs))
    received = [[] for _ in jobs]
    finished = [threading.Event() for _ in jobs]
    failed_at = []  # the step after which the victim got its error (delivered on the scheduler thread)

    def deliver_to(i):
        def deliver(item):
            received[i].append(item)
            if isinstance(item, Exception) and i == victim_index:
                failed_at.append(gated.steps)
            if not isinstance(item, Chunk):
                finished[i].set()
        return deliver

    try:
        tickets = [scheduler.submit(job, deliver_to(i)) for i, job in enumerate(jobs)]
        if cancel_victim_after is not None:
            gated.after_step = lambda n: n == cancel_victim_after and scheduler.cancel(tickets[victim_index])
        gated.gate.set()
        for i, done in enumerate(finished):
            if i != victim_index or cancel_victim_after is None:
                assert done.wait(WAIT_S), f"session {i} did not finish"
        return received, failed_at[0] if failed_at else None
    finally:
        scheduler.stop()


def output(items):
    assert items[-1] is None, f"the session ended with {items[-1]!r}"
    chunks = items[:-1]
    return np.concatenate([c.audio for c in chunks]), "".join(c.text for c in chunks)


def check_only_the_victim_failed(model, module, prepare, options, after=6):
    """Three sessions in one batch, the middle one's rows come back unusable after ``after``
    draws; then the same three with the middle one healthy and cancelled at the step where it
    failed."""
    victim = 1
    real = module.sample_rows
    module.sample_rows = FailingRows(real, after)
    try:
        stepper = model.stepper(max_sessions=3)
        failing, failed_at = serve(stepper, [prepare(stepper, o) for o in options], victim)
    finally:
        module.sample_rows = real
    assert failed_at is not None, "the injected failure never happened"
    assert isinstance(failing[victim][-1], UnusableLogits)
    stepper = model.stepper(max_sessions=3)
    healthy, _ = serve(stepper, [prepare(stepper, o) for o in options], victim, cancel_victim_after=failed_at)
    for i in (0, 2):
        audio, text = output(failing[i])
        audio_ok, text_ok = output(healthy[i])
        assert audio.size > 0 and text == text_ok
        assert np.array_equal(audio, audio_ok)  # bit-identical
    return stepper


def test_mini_omni_one_failing_session_leaves_the_batch_bit_identical(tiny64, question_wav):
    import zoo.mini_omni.engine as engine

    options = [{"max_new_tokens": 40}, {"max_new_tokens": 40, "seed": VICTIM_SEED, "top_k": None},
               {"max_new_tokens": 30, "seed": 7, "top_k": 50}]
    path = str(question_wav[0])
    stepper = check_only_the_victim_failed(tiny64, engine, lambda s, o: s.prepare(path, None, o), options)
    assert sorted(stepper.engine.free_rows) == list(range(6))  # every row came back


@pytest.fixture(scope="module")
def tiny_glm():
    return zoo.load("glm-4-voice", random_weights="tiny", device="cpu")


def test_glm4_voice_one_failing_session_leaves_the_batch_bit_identical(tiny_glm, question_wav):
    import zoo.glm4_voice.model as glm

    options = [{"max_new_tokens": 40, "temperature": 0}, {"max_new_tokens": 40, "seed": VICTIM_SEED},
               {"max_new_tokens": 36, "seed": 7}]
    path = str(question_wav[0])
    stepper = check_only_the_victim_failed(tiny_glm, glm, lambda s, o: s.prepare(path, None, o), options, after=8)
    assert sorted(stepper.engine.free_rows) == [0, 1, 2]


def test_respond_raises_the_sessions_error(tiny_glm):
    import zoo.glm4_voice.model as glm

    real = glm.sample_rows
    glm.sample_rows = FailingRows(real, after=3)
    try:
        with pytest.raises(UnusableLogits):
            list(tiny_glm.respond_text("hello", {"seed": VICTIM_SEED, "max_new_tokens": 20}))
    finally:
        glm.sample_rows = real


def test_a_failing_poll_ends_its_session_only():
    class Job:
        def __init__(self, fails):
            self.fails, self.left, self.done, self.error = fails, 3, False, None

        def poll(self):
            if self.fails and self.left < 3:
                raise ValueError("poll failed")
            return Chunk(text=str(self.left))

    class Stepper:
        def start(self, job):
            pass

        def step(self, jobs):
            for job in jobs:
                job.left -= 1
                job.done = job.left == 0

        def release(self, job):
            self.released = getattr(self, "released", 0) + 1

    stepper = Stepper()
    scheduler = Scheduler(stepper, max_sessions=2)
    got = [[], []]
    ends = [threading.Event(), threading.Event()]
    try:
        for i, job in enumerate([Job(False), Job(True)]):
            scheduler.submit(job, lambda item, i=i: (got[i].append(item), item is None or isinstance(item, Exception))
                             [1] and ends[i].set())
        assert all(e.wait(10) for e in ends)
    finally:
        scheduler.stop()
    assert [c.text for c in got[0][:-1]] == ["3", "2", "1", "0"] and got[0][-1] is None
    assert isinstance(got[1][-1], ValueError) and stepper.released == 2


# -- full duplex -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hertz():
    return zoo.load("hertz-dev", random_weights="tiny", device="cpu")


def run_hub(model, options, frames, victim, close_victim_after=None):
    """Three duplex sessions stepped in lockstep through a DuplexScheduler: all three get frame k
    in the same tick. Returns what each connection got."""
    from zoo.core.scheduler import DuplexScheduler

    hub = DuplexScheduler(model.duplex_stepper(3), 3, model.card.frame_samples, warm_up=False)
    deliveries = Deliveries(len(options))
    got, arrived = deliveries.got, deliveries.arrived
    try:
        conns = [hub.reserve(model.options(o), deliveries.to(i)) for i, o in enumerate(options)]
        live = list(range(len(conns)))
        for k, frame in enumerate(frames, start=1):
            with hub._cv:  # every live session's frame k is queued before the worker's next tick
                for i in live:
                    hub.push(conns[i], frame)
            for _ in live:
                assert arrived.acquire(timeout=WAIT_S)
            live = [i for i in live if not isinstance(got[i][-1], Exception)]
            if close_victim_after == k:
                hub.close(conns[victim])
                live.remove(victim)
        return got
    finally:
        hub.stop()


def test_duplex_hub_one_failing_session_leaves_the_others_bit_identical(tiny_hertz):
    import zoo.hertz_dev.engine as engine

    rng = np.random.default_rng(0)
    frames = [(0.1 * rng.standard_normal(2000)).astype(np.float32) for _ in range(8)]
    options = [{"seed": 1}, {"seed": VICTIM_SEED}, {"seed": 2, "temperature": 0}]
    victim = 1
    real = engine.sample_rows
    engine.sample_rows = FailingRows(real, after=3)
    try:
        failing = run_hub(tiny_hertz, options, frames, victim)
    finally:
        engine.sample_rows = real
    assert isinstance(failing[victim][-1], UnusableLogits)
    failed_at = len(failing[victim])  # its 4th step's draw failed: 3 frames, then the error
    assert failed_at == 4
    healthy = run_hub(tiny_hertz, options, frames, victim, close_victim_after=failed_at)
    for i in (0, 2):
        assert len(failing[i]) == len(frames) and all(isinstance(f, np.ndarray) for f in failing[i])
        assert all(np.array_equal(a, b) for a, b in zip(failing[i], healthy[i]))  # bit-identical
    assert all(np.array_equal(a, b) for a, b in zip(failing[victim][:3], healthy[victim][:3]))


def test_duplex_stepper_returns_the_error_of_one_session_and_closes_it(tiny_hertz):
    stepper = tiny_hertz.duplex_stepper(2, main_context=8, resynth_context=8)
    good, bad = stepper.open({"seed": 1}), stepper.open({"seed": 2})
    frame = np.zeros(2000, np.float32)
    out = stepper.step([good, bad], [frame, np.zeros(1999, np.float32)])  # one refused frame
    assert isinstance(out[0], np.ndarray) and out[0].shape == (2000,)
    assert isinstance(out[1], zoo.AudioInputError) and bad.closed and not good.closed
    assert isinstance(stepper.step([good], [frame])[0], np.ndarray)  # the other session goes on
    stepper.close(good)
    assert sorted(stepper.engine.free_rows) == [0, 1]


def test_hertz_dev_replies_one_failing_session_leaves_the_batch_bit_identical(tiny_hertz):
    import zoo.hertz_dev.engine as engine

    speech = (0.1 * np.random.default_rng(1).standard_normal(6000)).astype(np.float32)
    options = [{"max_new_tokens": 10, "seed": 1}, {"max_new_tokens": 10, "seed": VICTIM_SEED},
               {"max_new_tokens": 8, "temperature": 0}]
    stepper = check_only_the_victim_failed(tiny_hertz, engine, lambda s, o: s.prepare(speech, 16000, o), options,
                                           after=4)
    assert sorted(stepper.engines["mono"][0].free_rows) == [0, 1, 2]


def test_mini_omni_codec_failure_of_one_session_ends_it_alone(tiny64, question_wav, monkeypatch):
    """The codec decodes every session's due windows in one batch; when that batch fails, each
    session's windows are decoded on their own, so only the session they fail for ends."""
    import zoo.mini_omni.codec as codec

    real = codec._positional_noise

    def noise(seed, block, start, length):
        if seed == VICTIM_SEED and start > 0:  # its second chunk's noise cannot be made
            raise RuntimeError("injected codec failure")
        return real(seed, block, start, length)

    path = str(question_wav[0])
    options = [{"max_new_tokens": 30}, {"max_new_tokens": 30, "seed": VICTIM_SEED}, {"max_new_tokens": 24, "seed": 7}]
    stepper = tiny64.stepper(max_sessions=3)
    with monkeypatch.context() as patch:
        patch.setattr(codec, "_positional_noise", noise)
        failing, failed_at = serve(stepper, [stepper.prepare(path, None, o) for o in options], 1)
    assert isinstance(failing[1][-1], RuntimeError) and failed_at is not None
    healthy, _ = serve(stepper, [stepper.prepare(path, None, o) for o in options], 1, cancel_victim_after=failed_at)
    for i in (0, 2):
        (audio, text), (audio_ok, text_ok) = output(failing[i]), output(healthy[i])
        assert text == text_ok and audio.size == audio_ok.size
        np.testing.assert_allclose(audio, audio_ok, rtol=0, atol=1e-12)  # decoded alone in that one step
    assert sorted(stepper.engine.free_rows) == list(range(6))
