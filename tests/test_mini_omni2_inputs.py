"""Mini-Omni2's inputs: the TorchScript CLIP archive read as data (never executed), strict
loading, bounded image decoding, and images over /chat and the realtime socket."""
import base64
import io
import json
import pickle
import shutil
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from conftest import SAMPLES
from fastapi.testclient import TestClient
from PIL import Image

import zoo
from zoo.core.errors import CheckpointMismatch, ImageInputError
from zoo.core.image import load_image
from zoo.core.torchscript import read_torchscript_tensors
from zoo.mini_omni2.clip import CLIP_FILE, load_vision
from zoo.mini_omni2.random_weights import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(_tiny_cache):
    return tiny_checkpoint(seed=0)


def png_bytes(size=(40, 30), colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# -- the TorchScript archive ----------------------------------------------------------------------
def test_the_archive_reader_gets_every_tensor_torch_jit_sees(folders):
    """Checked against torch.jit on our own tiny archive (the loader itself never uses torch.jit)."""
    ours = read_torchscript_tensors(folders.checkpoint / CLIP_FILE)
    theirs = torch.jit.load(str(folders.checkpoint / CLIP_FILE)).state_dict()
    assert set(ours) == set(theirs) and any(k.startswith("visual.transformer.resblocks.1.") for k in ours)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def _rewrite_data_pkl(src, dst, payload: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = payload if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info, data)


def test_code_in_the_archive_never_runs(folders, tmp_path):
    """A data.pkl that would call os.system when unpickled is refused, and nothing runs."""
    marker = tmp_path / "ran"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    bad = tmp_path / "bad.pt"
    _rewrite_data_pkl(folders.checkpoint / CLIP_FILE, bad, payload)
    with pytest.raises(CheckpointMismatch, match="refusing to load os.system"):
        read_torchscript_tensors(bad)
    assert not marker.exists()
    evil = pickle.dumps(__import__("builtins").eval, protocol=2)  # any other global: refused too
    _rewrite_data_pkl(folders.checkpoint / CLIP_FILE, bad, evil)
    with pytest.raises(CheckpointMismatch, match="refusing"):
        read_torchscript_tensors(bad)


def test_not_an_archive_is_a_clear_error(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointMismatch, match="not a TorchScript archive"):
        read_torchscript_tensors(path)


def test_the_vision_tower_loads_strictly(folders, tmp_path):
    """An archive whose vision tower lacks a tensor is refused, naming it."""
    scripted = torch.jit.load(str(folders.checkpoint / CLIP_FILE))
    state = scripted.state_dict()
    assert load_vision(folders.checkpoint / CLIP_FILE).dims.tokens == 50

    class Partial(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Module()
            for name in ("conv1.weight", "positional_embedding", "proj", "class_embedding"):
                self.visual.register_parameter(name.replace(".", "_"), torch.nn.Parameter(state["visual." + name]))

        def forward(self, x):
            return x

    partial = tmp_path / "partial.pt"
    torch.jit.save(torch.jit.script(Partial()), str(partial))
    with pytest.raises(CheckpointMismatch, match="not a CLIP ViT archive"):
        load_vision(partial)


def test_a_checkpoint_without_the_vision_adapter_is_refused(folders, tmp_path):
    """Mini-Omni's files (no vision_adapter) do not load as Mini-Omni2: strict keys."""
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(folders.checkpoint, ckpt)
    state = torch.load(ckpt / "lit_model.pth", weights_only=True)
    del state["vision_adapter.fc_1.weight"]
    torch.save(state, ckpt / "lit_model.pth")
    with pytest.raises(CheckpointMismatch, match="vision_adapter.fc_1.weight"):
        zoo.load("mini-omni2", checkpoint=ckpt, codec=folders.codec, device="cpu")


# -- images ------------------------------------------------------------------------------------------
def test_every_kind_of_image_source_decodes_the_same(tmp_path):
    data = png_bytes()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for source in (data, path, str(path), array, Image.open(io.BytesIO(data))):
        np.testing.assert_array_equal(np.asarray(load_image(source).convert("RGB")), array)


def _png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("source, message", [
    (b"", "empty"), (b"GIF89a not really", "could not decode"), (b"\x00" * 100, "could not decode"),
    (_png_header_claiming(100_000, 100_000), "more than"),  # a decompression bomb: refused from its header
    (np.zeros((4, 4), np.uint8), "HxWx3"), (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((0, 4, 3), np.uint8), "empty"), (12, "must be"),
])
def test_bad_images_are_refused_clearly(source, message):
    with pytest.raises(ImageInputError, match=message):
        load_image(source)


def test_the_byte_limit_holds_before_decoding(tmp_path):
    with pytest.raises(ImageInputError, match="bytes"):
        load_image(png_bytes(), max_bytes=10)
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes())
    with pytest.raises(ImageInputError, match="bytes"):
        load_image(path, max_bytes=10)


# -- serving --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(folders):
    from serving.app import create_app
    from serving.service import Service

    model = zoo.load("mini-omni2", checkpoint=folders.checkpoint, codec=folders.codec, device="cpu")
    with TestClient(create_app(Service(model, max_sessions=2))) as test_client:
        yield test_client


QUESTION = base64.b64encode((SAMPLES / "01.wav").read_bytes()).decode()


def parts(body: bytes) -> list[tuple[str, bytes]]:
    out = []
    for part in body.split(b"\r\n--frame\r\n")[1:]:
        head, _, payload = part.partition(b"\r\n\r\n")
        out.append((head.decode().split(": ", 1)[1], payload))
    return out


def test_chat_with_an_image_answers_in_the_reference_multipart_stream(client):
    """The Mini-Omni2 web clients: {"audio", "image"} base64, multipart reply by default."""
    response = client.post("/chat", json={"audio": QUESTION, "image": base64.b64encode(png_bytes()).decode(),
                                          "max_tokens": 16})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("multipart/x-mixed-replace; boundary=frame")
    got = parts(response.content)
    kinds = [kind for kind, _ in got]
    assert kinds[0::2] == ["audio/wav"] * (len(kinds) // 2) and kinds[1::2] == ["text/plain"] * (len(kinds) // 2)
    assert sum(len(p) for k, p in got if k == "audio/wav") == (16 - 7) * 2048 * 2
    plain = client.post("/chat", json={"audio": QUESTION, "max_tokens": 16, "format": "pcm"})
    assert plain.headers["content-type"] == "application/octet-stream" and len(plain.content) == (16 - 7) * 2048 * 2


def test_chat_image_as_data_url_and_its_effect(client):
    """The image reaches the model: another image gives another reply (greedy, same audio)."""
    def audio(image: bytes, as_url: bool) -> bytes:
        value = base64.b64encode(image).decode()
        value = "data:image/png;base64," + value if as_url else value
        body = client.post("/chat", json={"audio": QUESTION, "image": value, "max_tokens": 16}).content
        return b"".join(p for k, p in parts(body) if k == "audio/wav")

    red = png_bytes(colour=(230, 20, 20))
    assert audio(red, True) == audio(red, False)
    assert audio(red, False) != audio(png_bytes(size=(300, 90), colour=(20, 20, 230)), False)


@pytest.mark.parametrize("image, kind", [("@@@", "bad_base64"), (base64.b64encode(b"nope").decode(), "bad_image"),
                                         ("data:text/plain;base64,aGk=", "bad_image"), (7, "bad_image"),
                                         (base64.b64encode(_png_header_claiming(90_000, 90_000)).decode(), "bad_image")])
def test_a_bad_image_is_a_400_with_a_clear_message(client, image, kind):
    response = client.post("/chat", json={"audio": QUESTION, "image": image, "max_tokens": 8})
    assert response.status_code == 400 and response.json()["error"]["type"] == kind, response.text


def test_realtime_takes_an_input_image_item(client):
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    with client.websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["type"] == "session.created"
        ws.send_text(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": image}]}}))
        added = ws.receive_json()
        assert added["type"] == "conversation.item.added" and added["item"]["content"] == [{"type": "input_image"}]
        assert ws.receive_json()["type"] == "conversation.item.done"
        for bad, code in ((image[:30] + "!!", "invalid_image"), ("data:image/png;base64," + base64.b64encode(b"x").decode(),
                                                                  "invalid_image")):
            ws.send_text(json.dumps({"type": "conversation.item.create", "event_id": "e1", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": bad}]}}))
            error = ws.receive_json()
            assert error["type"] == "error" and error["error"]["code"] == code and error["error"]["event_id"] == "e1"
        ws.send_text(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
        assert ws.receive_json()["error"]["code"] == "unsupported_content"
        # a manual turn with the image: the reply comes as usual
        ws.send_text(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
        assert ws.receive_json()["type"] == "session.updated"
        pcm = (np.sin(np.arange(24000) / 10) * 8000).astype("<i2").tobytes()
        ws.send_text(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
        ws.send_text(json.dumps({"type": "input_audio_buffer.commit"}))
        assert ws.receive_json()["type"] == "input_audio_buffer.committed"
        ws.send_text(json.dumps({"type": "response.create", "response": {"max_output_tokens": 12}}))
        kinds = []
        while not kinds or kinds[-1] != "response.done":
            event = ws.receive_json()
            kinds.append(event["type"])
        assert event["response"]["status"] == "completed" and "response.output_audio.delta" in kinds
