"""zoo/client_cli.py, the flags both terminal demos share (server URL, API key from
OMNI_ZOO_API_KEY, --model checked against the server's /v1/models), as the demos' users meet them."""
import argparse
import sys
import types

import pytest
from conftest import REPO, load_script
from procs import free_port
from test_server import Server

from zoo.client_cli import ClientError, add_client_flags, connect

KEY = "client-flags-key"


@pytest.fixture(scope="module")
def server():
    s = Server("--max-sessions", "2", "--api-key", KEY)
    yield s
    s.stop()


def flags(*argv):
    parser = argparse.ArgumentParser()
    add_client_flags(parser)
    return parser.parse_args(list(argv))


def test_the_key_comes_from_the_environment_and_the_model_is_read_from_the_server(server, monkeypatch):
    monkeypatch.setenv("OMNI_ZOO_API_KEY", KEY)
    info = connect(flags("--server", server.url + "/", "--model", "mini-omni"))
    assert (info.model, info.url, info.api_key) == ("mini-omni", server.url, KEY)
    assert info.ws_url("/v1/realtime") == f"ws://127.0.0.1:{server.port}/v1/realtime"
    assert info.headers() == {"Authorization": f"Bearer {KEY}"}
    assert "RANDOM WEIGHTS" in info.notice and info.card["output_sample_rate"] == 24000


@pytest.mark.parametrize("argv, env_key, message", [
    ([], None, "needs an API key: set OMNI_ZOO_API_KEY (or pass --api-key)"),
    (["--api-key", "wrong"], None, "refused the API key: check --api-key / OMNI_ZOO_API_KEY"),
    (["--model", "glm-4-voice"], KEY,
     "runs 'mini-omni', not 'glm-4-voice': start it with `python server.py --model glm-4-voice`, or leave out --model"),
])
def test_a_wrong_key_or_model_is_one_clear_error(server, monkeypatch, argv, env_key, message):
    monkeypatch.delenv("OMNI_ZOO_API_KEY", raising=False)
    if env_key:
        monkeypatch.setenv("OMNI_ZOO_API_KEY", env_key)
    with pytest.raises(ClientError) as err:
        connect(flags("--server", server.url, *argv))
    assert str(err.value) == f"the server at {server.url} {message}"


def test_an_unreachable_server_or_a_bad_url_says_what_to_do():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClientError, match=r"cannot reach the server at .*: start it with `python server.py`, "
                                          r"or give its address with --server"):
        connect(flags("--server", url))
    with pytest.raises(ClientError, match="give an http:// or https:// address"):
        connect(flags("--server", "ws://127.0.0.1:60808/v1/realtime"))


def test_the_duplex_demo_refuses_a_half_duplex_server_in_one_line(server, monkeypatch, capsys):
    monkeypatch.setenv("OMNI_ZOO_API_KEY", KEY)
    demo = load_script("demos/duplex_chat.py")
    assert demo.main(["--server", server.url, "--wav", str(REPO / "demos" / "samples" / "01.wav")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: the server at {server.url} runs 'mini-omni', which is not full duplex: start it "
                           "with a full-duplex model (`python server.py --model NAME`, NAME one of: hertz-dev, moshi)")


def test_the_mic_demo_checks_the_server_before_opening_the_sound_card(server, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyaudio", types.ModuleType("pyaudio"))  # using it would raise AttributeError
    monkeypatch.setenv("OMNI_ZOO_API_KEY", KEY)
    demo = load_script("demos/mic_chat.py")
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert demo.main(["--server", unreachable]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot reach the server at {unreachable}")
    assert demo.main(["--server", server.url, "--model", "hertz-dev"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: the server at {server.url} runs 'mini-omni', not 'hertz-dev': "
                                               "start it with `python server.py --model hertz-dev`, or leave out --model")


def test_both_demos_take_the_same_client_flags():
    for name in ("mic_chat", "duplex_chat"):
        actions = {a.dest for a in load_script(f"demos/{name}.py").build_parser()._actions}
        assert {"server", "api_key", "model"} <= actions
