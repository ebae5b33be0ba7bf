"""The server offers each wire protocol from the model's card alone (serving/protocols/), and no
server or web UI module knows a model by name."""
import base64
import dataclasses
import re

import numpy as np
import pytest
from conftest import REPO
from fastapi.testclient import TestClient

import zoo

FRAME = 4


class StubDuplex:
    """A DuplexStepper that answers each frame with half of it."""

    def open(self, options=None, prompt=None, sample_rate=None):
        return object()

    def step(self, handles, frames):
        return [np.asarray(f, np.float32) / 2 for f in frames]

    def close(self, handle):
        pass

    def nbytes(self):
        return 0


class StubModel(zoo.VoiceModel):
    def __init__(self, **card) -> None:
        self.card = zoo.ModelCard(name="stub", title="Stub", description="", input_sample_rate=8000,
                                  output_sample_rate=8000, languages=("en",), parameters="0", hardware="none",
                                  components={}, max_input_seconds=1.0, reply_tokens_per_second=1.0, **card)

    def respond(self, audio, sample_rate=None, options=None, history=None):
        yield zoo.Chunk()

    def stepper(self, max_sessions):
        return object()  # never driven here: no /chat request is made

    def duplex_stepper(self, max_sessions):
        return StubDuplex()

    def benchmark_stages(self, audio, sample_rate):
        return {}


def client_for(model):
    from serving.app import create_app
    from serving.service import Service

    service = Service(model, max_sessions=1, duplex_sessions=1)
    return TestClient(create_app(service)), service


def data_url(samples) -> str:
    return "data:audio/raw;base64," + base64.b64encode(np.asarray(samples, "<i2").tobytes()).decode()


def refusal(client, route):
    with client.websocket_connect(route) as ws:
        return ws.receive_json()["error"]["code"]


def test_a_card_that_declares_the_reference_protocol_gets_its_routes():
    model = StubModel(duplex=True, frame_samples=FRAME, protocols={"data-url-live": {"token_temp": "temperature"}})
    client, service = client_for(model)
    try:
        with client:
            with client.websocket_connect("/audio") as ws:  # the frame size is the card's
                ws.send_text(data_url([32767, -32767, 2, 0]))
                answer = np.frombuffer(base64.b64decode(ws.receive_text().split(",", 1)[1]), "<i2")
            assert answer.tolist() == [16383, -16383, 1, 0]  # /32767 in, x 32767 truncated out (16383.5)
            response = client.post("/set_temperature?token_temp=0.25&gaussian_temp=9")
            assert response.status_code == 200
            assert response.json()["message"] == "Temperature updated to: (0.25, (None, None))"
            with client.websocket_connect("/v1/duplex") as ws:
                assert ws.receive_json()["session"]["frame_samples"] == FRAME
    finally:
        service.close()


def test_a_duplex_card_without_the_protocol_does_not_get_it():
    client, service = client_for(StubModel(duplex=True, frame_samples=FRAME))
    try:
        with client:
            assert refusal(client, "/audio") == "not_offered"
            response = client.post("/set_temperature?token_temp=0.5")
            assert response.status_code == 404 and response.json()["error"]["type"] == "not_offered"
            with client.websocket_connect("/v1/duplex") as ws:  # the card says duplex: our route works
                assert ws.receive_json()["type"] == "session.created"
                ws.send_bytes(np.array([2, 4, -4, 0], "<i2").tobytes())
                assert np.frombuffer(ws.receive_bytes(), "<i2").tolist() == [1, 2, -2, 0]
    finally:
        service.close()


def test_a_half_duplex_card_gets_no_duplex_protocol():
    client, service = client_for(StubModel(protocols={"data-url-live": {}}))
    try:
        with client:
            assert service.duplex is None
            assert refusal(client, "/v1/duplex") == refusal(client, "/audio") == "not_duplex"
    finally:
        service.close()


def test_a_card_mapping_the_knob_to_an_unknown_option_is_refused_at_start():
    model = StubModel(duplex=True, frame_samples=FRAME, protocols={"data-url-live": {"token_temp": "heat"}})
    from serving.app import create_app
    from serving.service import Service

    service = Service(model, max_sessions=1, duplex_sessions=1)
    try:
        with pytest.raises(ValueError, match="heat"):
            create_app(service)
    finally:
        service.close()


def test_the_published_cards_declare_what_their_servers_speak():
    assert zoo.card("hertz-dev").protocols["data-url-live"]["token_temp"] == "temperature"
    assert not zoo.card("mini-omni").protocols and not zoo.card("glm-4-voice").protocols
    assert dataclasses.asdict(zoo.card("hertz-dev"))["protocols"] == zoo.card("hertz-dev").to_dict()["protocols"]


def test_no_server_or_web_ui_module_names_a_model():
    """Model ids (and their packages) appear only under zoo/<model>/: the server and the pages work
    from the card. Prose may cite where a protocol comes from ("the Hertz-dev reference client")."""
    ids = zoo.names() + [name.replace("-", "_") for name in zoo.names()] + ["mini_omni", "hertz_dev", "glm4_voice"]
    pattern = re.compile("|".join(re.escape(i) for i in ids))
    files = [p for folder in ("serving", "webui") for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".js")]
    assert len(files) > 10
    found = {str(p.relative_to(REPO)): pattern.findall(p.read_text()) for p in files}
    assert {path: names for path, names in found.items() if names} == {}
