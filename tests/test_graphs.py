"""zoo.core.graphs: the decode step every LLM shares. On CPU the graph path runs eagerly (batch
padded up to its bucket with a scratch row, attention width rounded up), so its bookkeeping is
tested here: in float32, a bucketed (padded) batch gives the tokens an exact batch gives, and a
batch of N the tokens each session gets alone, for Mini-Omni, GLM-4-Voice, Hertz-dev and Moshi
(whose cache is a ring: the bucketed width reads slots no row has written yet, masked)."""
import numpy as np
import pytest
import torch

import zoo
from zoo.core.graphs import DecodeGraphs, ShapeGraphs, batch_bucket
from zoo.core.kv_cache import KVCache, Rows
from zoo.glm4_voice.engine import SlotEngine
from zoo.glm4_voice.llm import load_llm
from zoo.glm4_voice.random_weights import write_tiny_llm
from zoo.hertz_dev.engine import Engine as HertzEngine
from zoo.mini_omni.engine import Engine, Session
from zoo.mini_omni.prompts import TASKS, audio_question

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread

STEPS = 10


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 9, 17, 33, 49, 64, 65, 128, 129)] == \
        [1, 2, 4, 8, 16, 32, 48, 64, 64, 80, 128, 144]
    with pytest.raises(ValueError):
        batch_bucket(0)


def test_padding_needs_a_pad_row_and_graphs_need_cuda():
    decode = lambda x, rows: x  # noqa: E731 - a stand-in model
    with pytest.raises(ValueError, match="pad row"):
        DecodeGraphs(decode, pad_row=None, max_len=8, device="cpu", buckets=True)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(decode, pad_row=0, max_len=8, device="cpu", capture=True)


def test_padded_rows_write_only_the_pad_row_and_are_dropped():
    cache = KVCache(1, 3, 1, 16, 2, torch.float32, "cpu", scratch=True)
    seen = []

    def decode(x, rows):
        seen.append((rows.index.tolist(), rows.positions[:, 0].tolist(), rows.width))
        return x * 2

    graphs = DecodeGraphs(decode, pad_row=cache.scratch, max_len=16, device="cpu", buckets=True, min_width=4)
    out = graphs(torch.arange(3.0), [2, 0, 1], [5, 1, 2])
    assert out.tolist() == [0.0, 2.0, 4.0]
    assert seen == [([2, 0, 1, 3], [5, 1, 2, 0], 8)]  # 3 rows -> bucket 4, the scratch row at 0
    with pytest.raises(ValueError, match="context limit"):
        graphs(torch.zeros(1), [0], [16])


def test_a_ring_step_reads_at_least_the_slots_written_and_at_most_the_ring():
    bucketed = Rows.ring([0], [5], 1, 12, 12, "cpu", width=8)  # position 5 written: slots 0..5 held
    assert bucketed.mask[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    for width in (4, 13):  # narrower than the 6 slots written so far; wider than the ring
        with pytest.raises(ValueError, match="ring width"):
            Rows.ring([0], [5], 1, 12, 12, "cpu", width=width)


# -- Mini-Omni (Qwen2, 7 audio heads + text head, two rows per session) -----------------------
@pytest.fixture(scope="module")
def tiny_omni32(one_thread):
    return zoo.load("mini-omni", random_weights="tiny", device="cpu", dtype="float32")


def omni_sessions(model, lengths):
    generator = torch.Generator().manual_seed(1)
    opts = model.options({"temperature": 0})
    sessions = []
    for n in lengths:
        features = torch.randn(1, n, model.gpt.config.whisper_adapter_dim, generator=generator)
        sessions.append(Session(TASKS["A1A2+A1T2"], audio_question(TASKS["A1A2+A1T2"], n), features, opts,
                                max_outputs=STEPS + 1))
    return sessions


def omni_outputs(engine, sessions):
    for s in sessions:
        engine.start(s)
    for _ in range(STEPS):
        engine.step(sessions)
    return [s.outputs for s in sessions]


def test_mini_omni_bucketed_equals_exact_and_batch_n_equals_batch_1(tiny_omni32):
    gpt, lengths = tiny_omni32.gpt, (7, 12, 4)
    exact = omni_outputs(Engine(gpt, max_rows=6), omni_sessions(tiny_omni32, lengths))
    engine = Engine(gpt, max_rows=6, buckets=True)
    assert engine.graphs.shape(6, [20]) == (8, 256)  # 3 sessions x 2 rows: padded to 8
    bucketed = omni_outputs(engine, omni_sessions(tiny_omni32, lengths))
    assert engine.cache.k[:, engine.cache.scratch].abs().sum() > 0  # the padding did run
    alone = [omni_outputs(Engine(gpt, max_rows=2, buckets=True), [s])[0]
             for s in omni_sessions(tiny_omni32, lengths)]
    assert all(len(o) > 1 for o in exact)
    assert bucketed == exact
    assert alone == exact


# -- GLM-4-Voice ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glm32(tmp_path_factory, one_thread):
    return load_llm(write_tiny_llm(tmp_path_factory.mktemp("glm_llm32")), dtype=torch.float32)


def glm_tokens(engine, prompts):
    slots = [engine.acquire() for _ in prompts]
    nxt = torch.stack([engine.prefill(slot, ids).argmax() for slot, ids in zip(slots, prompts)])
    tokens = [nxt.tolist()]
    for _ in range(STEPS):
        nxt = engine.step(slots, nxt).argmax(-1)
        tokens.append(nxt.tolist())
    return [list(t) for t in zip(*tokens)]


def test_glm_bucketed_equals_exact_and_batch_n_equals_batch_1(glm32):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 168960, (n,), generator=generator).tolist() for n in (7, 12, 3)]
    exact = glm_tokens(SlotEngine(glm32, slots=3, max_len=64), prompts)
    bucketed = glm_tokens(SlotEngine(glm32, slots=3, max_len=64, buckets=True), prompts)
    alone = [glm_tokens(SlotEngine(glm32, slots=1, max_len=64, buckets=True), [p])[0] for p in prompts]
    assert bucketed == exact
    assert alone == exact


# -- Hertz-dev (main transformer and resynthesizer, sliding contexts) -----------------------------
@pytest.fixture(scope="module")
def tiny_hertz32(one_thread):
    return zoo.load("hertz-dev", random_weights="tiny", device="cpu")


def hertz_run(model, prompts, together=False, **kw):
    """Greedy slots started from ``prompts`` (one at a time, or ``together`` in one advance: prompts
    of one length), then stepped together past both contexts: (tokens, latents per step)."""
    main, resynth = model.networks("split")
    engine = HertzEngine(main, resynth, model.quantizer, len(prompts), main_context=12, resynth_context=10,
                         out_channels=(0, 1), record_tokens=1 << 10, **kw)
    opts = model.options({"temperature": 0})
    slots = [engine.open(opts) for _ in prompts]
    if together:
        latents = engine.advance(slots, torch.stack(prompts))
    else:
        latents = torch.cat([engine.advance([slot], p[None]) for slot, p in zip(slots, prompts)])
    outs = [latents]
    for _ in range(2 * STEPS):  # past both contexts: slides (re-prefills) mix with batched steps
        width = engine.width
        latents = engine.advance(slots, latents.reshape(len(slots), 1, width))
        outs.append(latents)
    return [slot.tokens for slot in slots], torch.stack(outs, 1)


def test_hertz_bucketed_equals_exact_and_batch_n_equals_batch_1(tiny_hertz32):
    generator = torch.Generator().manual_seed(2)
    width = tiny_hertz32.networks("split")[0].config.latent_dim * 2
    prompts = [torch.randn(n, width, generator=generator) for n in (5, 3, 8)]
    exact_tokens, exact = hertz_run(tiny_hertz32, prompts)
    bucket_tokens, bucketed = hertz_run(tiny_hertz32, prompts, buckets=True)
    # the latents feed back (continuous values): a rounding difference of a differently blocked
    # product (1e-6) grows by about 10x every 4 steps on random weights, so the latents are
    # compared over the first steps; the sampled tokens over all of them
    assert bucket_tokens == exact_tokens
    torch.testing.assert_close(bucketed[:, :6], exact[:, :6], rtol=0, atol=1e-4)
    for i, p in enumerate(prompts):
        tokens, alone = hertz_run(tiny_hertz32, [p], buckets=True)
        assert tokens[0] == exact_tokens[i]
        torch.testing.assert_close(alone[0, :6], exact[i, :6], rtol=0, atol=1e-4)


def test_hertz_prefills_of_one_length_share_a_forward_and_equal_each_alone(tiny_hertz32, monkeypatch):
    """Slots opening together with prompts of one length, and contexts sliding at the same step,
    are (re)prefilled in one forward per network and length, not one per slot; each slot gets what
    it gets alone."""
    generator = torch.Generator().manual_seed(3)
    main, resynth = tiny_hertz32.networks("split")
    prompts = [torch.randn(5, main.config.latent_dim * 2, generator=generator) for _ in range(3)]
    forwards = []
    for network in (main, resynth):
        monkeypatch.setattr(network, "forward", _recording(network.forward, forwards, type(network).__name__))
    tokens, together = hertz_run(tiny_hertz32, prompts, together=True)
    prefills = [(name, shape) for name, shape in forwards if shape[1] > 1]
    assert prefills[:2] == [("HertzLM", (3, 5)), ("Resynthesizer", (3, 5))]  # the prompts: one forward each
    assert len(prefills) > 2 and all(shape[0] == 3 for _, shape in prefills)  # the slides, together too
    monkeypatch.undo()
    # the batch of 3 rounds its products differently from a batch of 1 (1e-6), which the latents'
    # feedback grows: compared over the first steps, as above
    for i, p in enumerate(prompts):
        alone_tokens, alone = hertz_run(tiny_hertz32, [p])
        assert alone_tokens[0][:8] == tokens[i][:8]
        torch.testing.assert_close(alone[0, :6], together[i, :6], rtol=0, atol=1e-4)


def _recording(forward, calls, name):
    def record(latents, *args, **kwargs):
        calls.append((name, tuple(latents.shape[:2])))
        return forward(latents, *args, **kwargs)
    return record


# -- Moshi (the temporal transformer over a ring cache; sessions at their own steps) --------------
@pytest.fixture(scope="module")
def tiny_moshi32(one_thread):
    return zoo.load("moshi", random_weights="tiny", device="cpu", dtype="float32")


def moshi_run(model, starts, steps, **kw):
    """Greedy sessions joining at the steps ``starts``: each one's (text, codes) per step."""
    from zoo.moshi.duplex import DuplexStepper

    stepper = DuplexStepper(model, len(starts), **kw)
    rng = np.random.default_rng(3)
    frames = (0.2 * rng.standard_normal((steps, model.card.frame_samples))).astype(np.float32)
    handles, tokens = {}, {i: [] for i in range(len(starts))}
    for t in range(steps):
        for i, start in enumerate(starts):
            if start == t:
                handles[i] = stepper.open({"temperature": 0})
        live = sorted(handles)
        stepper.step([handles[i] for i in live], [frames[t - starts[i]] for i in live])
        for i in live:
            out = handles[i].tokens
            tokens[i].append(None if out is None else out.tolist())
    return [tokens[i] for i in range(len(starts))], stepper


def test_moshi_bucketed_equals_exact_and_batch_n_equals_batch_1(tiny_moshi32):
    starts, steps = (0, 3, 7), 2 * STEPS + 10  # past the tiny ring (12 positions) twice
    assert tiny_moshi32.lm.config.context < steps - max(starts)
    exact, _ = moshi_run(tiny_moshi32, starts, steps)
    bucketed, stepper = moshi_run(tiny_moshi32, starts, steps, buckets=True)
    graphs = stepper.state.graphs
    assert graphs.shape(3, [40, 5, 9]) == (4, 12)  # 3 sessions padded to 4, the whole ring read
    assert stepper.state.cache.k[:, stepper.state.cache.scratch].abs().sum() > 0  # the padding did run
    alone = [moshi_run(tiny_moshi32, (0,), steps - s, buckets=True)[0][0] for s in starts]
    assert all(sum(t is not None for t in run) > 20 for run in exact)
    assert bucketed == exact
    assert alone == exact


class StoodInGraphs(ShapeGraphs):
    """ShapeGraphs with its CUDA capture stood in (CPU): a 'graph' reruns the captured function on
    its static inputs and writes its static outputs, which is what a replay does."""

    captures = 0

    def _capture(self, run):
        StoodInGraphs.captures += 1
        outputs = run()

        class Replay:
            @staticmethod
            def replay():
                for static, new in zip(outputs, run()):
                    static.copy_(new)

        return Replay(), outputs


def test_shape_graphs_capture_a_shape_seen_twice_and_replay_it_with_new_values():
    """The bookkeeping around a capture: a signature runs plainly the first time, is captured the
    second, replayed after; a replay reads the new inputs (copied into the static buffers) and its
    result is the caller's own (the next replay does not change it); at most ``keep`` graphs."""
    calls = []

    def fn(a, b):
        calls.append(a.shape)
        return a * 2 + b, a.sum(dim=-1)

    graphs = StoodInGraphs(fn, device="cpu", capture=False, keep=2)
    graphs.capture = True  # as on CUDA, with the capture stood in
    StoodInGraphs.captures = 0
    x = [torch.full((1, n), float(n)) for n in (3, 4, 5)]
    first = graphs(x[0], x[0])
    assert StoodInGraphs.captures == 0 and not graphs.graphs
    second = graphs(x[0] + 1, x[0])
    assert StoodInGraphs.captures == 1
    third = graphs(x[0] + 2, x[0])
    assert StoodInGraphs.captures == 1
    for out, a in ((first, x[0]), (second, x[0] + 1), (third, x[0] + 2)):
        assert torch.equal(out[0], a * 2 + x[0]) and torch.equal(out[1], a.sum(dim=-1))
    for n in (1, 2):  # two more signatures, each seen twice: the least recently used graph goes
        graphs(x[n], x[n])
        graphs(x[n], x[n])
    assert StoodInGraphs.captures == 3 and len(graphs.graphs) == 2
    assert (((torch.Size([1, 3]), torch.float32),) * 2, ()) not in graphs.graphs
    with graphs.eager():
        before = len(calls)
        assert torch.equal(graphs(x[2], x[2])[0], x[2] * 3) and len(calls) == before + 1


def test_shape_graphs_keep_one_graph_per_static_setting():
    """Settings that shape the computation (not tensors) are part of the signature: a graph
    captured with one is never replayed for another."""
    shifted = StoodInGraphs(lambda a, *, shift: a + shift, device="cpu", capture=False)
    shifted.capture = True
    a = torch.arange(3.0)
    for shift in (1, 2, 1, 2, 1, 2):
        assert torch.equal(shifted(a, shift=shift), a + shift)
    assert len(shifted.graphs) == 2


def test_shape_graphs_need_cuda_to_capture():
    with pytest.raises(ValueError, match="CUDA"):
        ShapeGraphs(lambda x: x, device="cpu", capture=True)


def test_shape_graphs_calls_from_two_threads_take_turns():
    """One decoder serves concurrent replies: a replay reads the static buffers the other thread
    would overwrite, so calls must take turns (the stood-in replay pauses mid-way to invite the race)."""
    import threading
    import time

    class SlowReplay(StoodInGraphs):
        def _capture(self, run):
            graph, outputs = super()._capture(run)
            replay = graph.replay

            class Slow:
                @staticmethod
                def replay():
                    time.sleep(0.05)
                    replay()

            return Slow(), outputs

    graphs = SlowReplay(lambda a: (a * 1,), device="cpu", capture=False)
    graphs.capture = True
    for _ in range(2):  # captured
        graphs(torch.zeros(4))
    results = {}

    def ask(value):
        results[value] = graphs(torch.full((4,), float(value)))[0]

    threads = [threading.Thread(target=ask, args=(v,)) for v in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[v], torch.full((4,), float(v))) for v in (1, 2, 3))
