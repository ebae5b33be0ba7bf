"""The Space's rules without a browser (webui/space_backend.py, webui/space_policy.py,
webui/space_env.py): the GPU decorator, the settings, the rate limit, models loaded on first use
and unloaded under pressure, what is kept and swept, the hub cache. The running Space: test_space.py."""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import zoo


def test_the_gpu_decorator_is_spaces_on_zerogpu_and_a_stand_in_elsewhere(monkeypatch):
    from webui.space_backend import Settings, gpu

    def reply():
        yield 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed: the function itself
    assert gpu(45)(reply) is reply
    asked = []
    fake = types.SimpleNamespace(GPU=lambda duration: asked.append(duration) or (lambda f: ("wrapped", f)))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert gpu(45)(reply) == ("wrapped", reply) and asked == [45]
    assert Settings(max_reply_s=30).gpu_duration() == 45 and Settings(max_reply_s=10).gpu_duration() == 25
    assert Settings(max_reply_s=600).gpu_duration() == 120  # ZeroGPU's ceiling


def test_settings_come_from_the_environment_and_bad_ones_stop_the_space():
    from webui.space_backend import Settings

    settings = Settings.from_env({"OMNI_ZOO_MODEL": "mini-omni, hertz-dev", "OMNI_ZOO_RATE_PER_MINUTE": "3",
                                  "OMNI_ZOO_KEEP_DIR": "/data/x", "OMNI_ZOO_MAX_REPLY_S": "12.5"})
    assert settings.models == ["mini-omni", "hertz-dev"] and settings.rate_per_minute == 3
    assert settings.keep_dir == Path("/data/x") and settings.max_reply_s == 12.5
    assert Settings.from_env({}).models == ["mini-omni"] and Settings.from_env({}).keep_dir is None
    for bad in ({"OMNI_ZOO_MODEL": "gpt-5"}, {"OMNI_ZOO_CONCURRENCY": "many"}, {"OMNI_ZOO_CACHE_S": "-1"}):
        with pytest.raises(SystemExit, match="OMNI_ZOO"):
            Settings.from_env(bad)


def test_rate_limit_counts_each_visitor_over_a_sliding_minute():
    from webui.space_policy import RateLimit, visitor

    now = [0.0]
    limit = RateLimit(3, clock=lambda: now[0])
    for second in (0.0, 10.0, 20.0):
        now[0] = second
        assert limit.take("a") is None
    now[0] = 30.0
    assert limit.take("a") == pytest.approx(30.0) and limit.take("b") is None  # others are not affected
    now[0] = 60.5  # the first question left the window: one more, not two
    assert limit.take("a") is None and limit.take("a") == pytest.approx(9.5)
    request = types.SimpleNamespace(headers={"x-forwarded-for": "203.0.113.9, 10.0.0.1"},
                                    client=types.SimpleNamespace(host="10.0.0.2"))
    assert visitor(request) == "203.0.113.9"
    assert visitor(types.SimpleNamespace(headers={}, client=types.SimpleNamespace(host="10.0.0.2"))) == "10.0.0.2"


class FakeModel:
    def __init__(self, name):
        self.card, self.random_weights, self.default_max_new_tokens = zoo.card(name), None, None
        self.asked, self.images = [], []

    def respond(self, wav, options=None, image=None):
        self.asked.append(options)
        self.images.append(image)
        yield zoo.Chunk(np.zeros(10, np.float32), "hi")


def test_models_load_on_first_use_and_idle_ones_make_room_under_memory_pressure():
    from webui.space_backend import Settings, SpaceBackend

    free = [100e9]
    loads, made = [], []

    def load(name):
        loads.append(name)
        made.append(FakeModel(name))
        return made[-1]

    backend = SpaceBackend(Settings(models=["mini-omni", "glm-4-voice", "hertz-dev"]), load, free=lambda: free[0])
    assert [i.model for i in backend.models()] == ["mini-omni", "glm-4-voice", "hertz-dev"]  # from the cards
    assert backend.loading_note("glm-4-voice") and not loads
    assert [c.text for c in backend.stream(b"wav", None, model="mini-omni")] == ["hi"]
    assert backend.loading_note("mini-omni") is None
    free[0] = 10e9  # glm-4-voice needs about 21 GB: the idle mini-omni goes first
    list(backend.stream(b"wav", None, model="glm-4-voice"))
    assert backend.unloaded == ["mini-omni"] and list(backend.loaded) == ["glm-4-voice"]
    # a model answering someone is never unloaded, even under pressure
    replying = backend.stream(b"wav", None, model="glm-4-voice")
    next(replying)
    list(backend.stream(b"wav", None, model="hertz-dev"))
    assert "glm-4-voice" in backend.loaded and backend.unloaded == ["mini-omni"]
    list(replying)
    # the page's reply cap: a larger ask is lowered, none gets the default
    model = backend.loaded["hertz-dev"]
    cap = backend.reply_cap("hertz-dev")
    assert cap == round(30 * zoo.card("hertz-dev").reply_tokens_per_second)
    list(backend.stream(b"wav", {"max_new_tokens": 10**6}, model="hertz-dev"))
    list(backend.stream(b"wav", None, model="hertz-dev"))
    assert [o["max_new_tokens"] for o in model.asked[-2:]] == [cap, cap]
    limited = SpaceBackend(Settings(models=["mini-omni", "mini-omni2"], max_loaded=1), load, free=lambda: None)
    list(limited.stream(b"wav", None, model="mini-omni"))
    list(limited.stream(b"wav", None, model="mini-omni2"))
    assert list(limited.loaded) == ["mini-omni2"] and limited.unloaded == ["mini-omni"]
    # an image goes with the question where the card says image_input, and is dropped elsewhere
    assert limited.info("mini-omni2").image_input and not limited.info("mini-omni").image_input
    list(limited.stream(b"wav", None, model="mini-omni2", image=b"png"))
    assert made[-1].card.name == "mini-omni2" and made[-1].images == [None, b"png"]
    list(limited.stream(b"wav", None, model="mini-omni", image=b"png"))
    assert made[-1].card.name == "mini-omni" and made[-1].images == [None]


def test_exchanges_are_kept_only_where_the_operator_says_and_caches_are_swept(tmp_path):
    from webui.space_backend import Settings, SpaceBackend
    from webui.space_policy import CacheSweeper, SpacePolicy

    question = tmp_path / "upload" / "q.wav"
    question.parent.mkdir()
    sf.write(question, np.zeros(1600, np.float32), 16000)
    backend = SpaceBackend(Settings(), FakeModel)
    policy = SpacePolicy(Settings(), backend)
    policy.check(str(question), None)  # admitted: the cache sweeper must leave it until it is answered
    assert policy.in_use() == [str(question)]
    policy.turn_ended(str(question), "mini-omni", "hi", np.ones(2400, np.float32), 24000, 120.0, None)
    assert not question.exists() and not question.parent.exists()  # deleted, with Gradio's folder for it
    assert policy.in_use() == []
    kept = tmp_path / "kept"
    assert backend.models()[0].notice is None  # published weights, nothing kept: no banner
    policy = SpacePolicy(Settings(keep_dir=kept), backend)
    assert "KEEPS WHAT YOU SAY" in SpaceBackend(Settings(keep_dir=kept), FakeModel).models()[0].notice  # the banner
    question.parent.mkdir()
    sf.write(question, np.zeros(1600, np.float32), 16000)
    policy.turn_ended(str(question), "mini-omni", "hi", np.ones(2400, np.float32), 24000, 120.0, None)
    (turn,) = kept.iterdir()
    assert sorted(p.name for p in turn.iterdir()) == ["question.wav", "reply.wav", "turn.json"]
    assert not question.exists()
    assert "median 120 ms over the last 1 replies" in policy.about("mini-omni")
    assert "the operator keeps every exchange" in policy.about("mini-omni")
    for name in ("a/reply-chunk.wav", "b/waveform.png"):
        (tmp_path / "cache" / name).parent.mkdir(parents=True)
        (tmp_path / "cache" / name).write_bytes(b"x")
    waiting = [str(tmp_path / "cache" / "c" / "queued-question.wav")]  # admitted, not yet answered
    Path(waiting[0]).parent.mkdir()
    Path(waiting[0]).write_bytes(b"x")
    sweeper = CacheSweeper([tmp_path / "cache"], age=50, every=1, in_use=lambda: waiting)
    assert sweeper.sweep(now=time.time() + 10) == 0  # younger than the age: kept
    assert sweeper.sweep(now=time.time() + 60) == 2 and Path(waiting[0]).is_file()  # the queued question stays
    waiting.clear()
    assert sweeper.sweep(now=time.time() + 60) == 1 and not list((tmp_path / "cache").iterdir())


def test_the_hub_cache_goes_on_the_persistent_volume_when_there_is_one(tmp_path):
    from webui.space_env import use_persistent_hub_cache

    env = {}
    assert use_persistent_hub_cache(tmp_path / "no-volume", env) is None and "HF_HOME" not in env
    assert use_persistent_hub_cache(tmp_path, env) == str(tmp_path / ".huggingface") == env["HF_HOME"]
    assert use_persistent_hub_cache(tmp_path / "other", {"HF_HOME": "/mine"}) == "/mine"  # the operator's wins
