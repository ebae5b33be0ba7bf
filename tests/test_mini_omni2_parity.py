"""Mini-Omni2 equals its reference code on the same weights (float64, CPU): the image transform,
the CLIP features, the prompt layout, the embeddings with image and audio features in place,
greedy ids, text and audio, for image questions, audio questions and a typed question. The
expectations in tests/data/mini_omni2_reference.{json,npz} were produced by gpt-omni/mini-omni2's
own code on the tiny checkpoint this repository writes (see 'about' in the JSON)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import zoo
from zoo.mini_omni2.prompts import AUDIO_START, IMAGE_TASK, IMAGE_TOKENS
from zoo.mini_omni2.random_weights import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((DATA / "mini_omni2_reference.json").read_text())
ARRAYS = np.load(DATA / "mini_omni2_reference.npz")
WAV = str(REPO / REFERENCE["wav"])
IMAGES = [str(REPO / path) for path in REFERENCE["images"]]
CASES = [(variant, case) for variant, v in REFERENCE["variants"].items() for case in v["cases"]]


@pytest.fixture(scope="module")
def folders(_tiny_cache):
    return tiny_checkpoint(seed=0)


@pytest.fixture(scope="module")
def models(folders, tmp_path_factory):
    """seed0: the tiny checkpoint as written; stops: an untied head with the fixture's rows."""
    stops = tmp_path_factory.mktemp("stops2") / "checkpoint"
    shutil.copytree(folders.checkpoint, stops)
    state = torch.load(stops / "lit_model.pth", weights_only=True)
    for row, values in REFERENCE["variants"]["stops"]["lm_head_rows"].items():
        state["lm_head.weight"][int(row)] = torch.tensor(values)
    torch.save(state, stops / "lit_model.pth")
    config = yaml.safe_load((stops / "model_config.yaml").read_text())
    (stops / "model_config.yaml").write_text(yaml.safe_dump({**config, "tie_word_embeddings": False}))

    def load(ckpt):
        return zoo.load("mini-omni2", device="cpu", dtype="float64", checkpoint=ckpt, codec=folders.codec)

    return {"seed0": load(folders.checkpoint), "stops": load(stops)}


def _session(model, case, **options):
    """The reference run's session: same input, same limit (max_returned_tokens counts the prompt)."""
    opts = {"max_new_tokens": 10_000, "codec_noise": False, **options}
    if "question" in case:
        session, reply = model.start_session("T1A2", text=case["question"], options=opts)
    elif "image" in case:
        session, reply = model.start_session(IMAGE_TASK.name, audio=WAV, image=IMAGES[case["image"]], options=opts)
    else:
        session, reply = model.start_session("A1A2+A1T2", audio=WAV, options=opts)
    session.max_outputs = case["max_returned_tokens"] - session.prompt_length
    return session, reply


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_image_transform_equals_clips_preprocess(models, index):
    """Resize (bicubic, torchvision's rounding), centre crop, RGB after the crop, normalise: bit for
    bit, on an RGB, a palette (odd size) and an RGBA image."""
    ours = models["seed0"].image_pixels(IMAGES[index])[0].numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ARRAYS[f"transform/{index}"])


@pytest.mark.parametrize("variant, case", [c for c in CASES if "image" in REFERENCE["variants"][c[0]]["cases"][c[1]]])
def test_clip_features_equal_the_forks_encode_image(models, variant, case):
    spec = REFERENCE["variants"][variant]["cases"][case]
    features = models[variant].encode_image(IMAGES[spec["image"]])
    assert features.shape == (1, IMAGE_TOKENS, models[variant].gpt.config.vision_adapter_dim)  # all 50 tokens
    np.testing.assert_allclose(features.numpy(), ARRAYS[f"{variant}/{case}/clip"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant, case", [c for c in CASES if "prompt" in REFERENCE["variants"][c[0]]["cases"][c[1]]])
def test_prompt_and_embeddings_equal_the_reference(models, variant, case):
    """The ids of every stream, and the first block's input: image features at 1..50, Whisper
    features from 52 (the reference's off-by-one), the text stream's own embeddings everywhere."""
    model, spec = models[variant], REFERENCE["variants"][variant]["cases"][case]
    session, _ = _session(model, spec)
    assert session.prompt.tolist() == spec["prompt"]
    key = f"{variant}/{case}/embeddings"
    if key not in ARRAYS.files:
        return
    rows = session.prompt.size(0)
    extra = {} if session.image_features is None else {"image_features": session.image_features.expand(rows, -1, -1)}
    with torch.inference_mode():
        x = model.gpt.embed(session.prompt, session.features.expand(rows, -1, -1), session.audio_start, **extra)
    np.testing.assert_allclose(x.numpy(), ARRAYS[key], rtol=0, atol=1e-9)


def test_features_sit_where_the_layout_says(models):
    """Independently of the fixture: another image changes exactly positions 1..50 of the prompt's
    embeddings, another audio length moves nothing before position 52."""
    model = models["seed0"]
    session, _ = _session(model, REFERENCE["variants"]["seed0"]["cases"]["image0"])
    other = model.encode_image(IMAGES[1])
    rows = session.prompt.size(0)
    audio = session.features.expand(rows, -1, -1)
    with torch.inference_mode():
        a = model.gpt.embed(session.prompt, audio, AUDIO_START, image_features=session.image_features.expand(rows, -1, -1))
        b = model.gpt.embed(session.prompt, audio, AUDIO_START, image_features=other.expand(rows, -1, -1))
        c = model.gpt.embed(session.prompt, torch.zeros_like(audio), AUDIO_START,
                            image_features=session.image_features.expand(rows, -1, -1))
    changed = (a != b).any(-1).any(0).nonzero().flatten().tolist()
    assert changed == list(range(1, 1 + IMAGE_TOKENS))
    changed = (a != c).any(-1).any(0).nonzero().flatten().tolist()
    assert changed == list(range(AUDIO_START, AUDIO_START + audio.size(1)))


@pytest.mark.parametrize("variant, case", CASES)
def test_greedy_ids_and_text_equal_the_reference(models, variant, case):
    model, spec = models[variant], REFERENCE["variants"][variant]["cases"][case]
    session, reply = _session(model, spec)
    text = "".join(chunk.text for chunk in model._stream(reply))
    assert session.outputs == spec["tokens"]
    if "text" in spec:
        assert text == spec["text"].strip()  # the reply's leading space goes, as the reference's strip()


@pytest.mark.parametrize("variant, case", [c for c in CASES if f"{c[0]}/{c[1]}/one_pass" in ARRAYS.files])
def test_streamed_audio_equals_the_reference_decode(models, variant, case):
    """Seamless streaming (3 frames of lookahead) is the reference's one-pass decode of the same
    codes; the "reference" mode is its server's stream: the same independent 4-frame chunks."""
    model, spec = models[variant], REFERENCE["variants"][variant]["cases"][case]
    session, reply = _session(model, spec, lookahead=3)
    audio = np.concatenate([chunk.audio for chunk in model._stream(reply)])
    one_pass = ARRAYS[f"{variant}/{case}/one_pass"]
    assert audio.shape == one_pass.shape
    np.testing.assert_allclose(audio, one_pass, rtol=0, atol=1e-6)
    stream = sorted(k for k in ARRAYS.files if k.startswith(f"{variant}/{case}/stream/"))
    if not stream:
        return
    session, reply = _session(model, spec, stream_mode="reference", first_chunk_frames=4)
    chunks = [chunk.audio for chunk in model._stream(reply) if chunk.audio.size]
    assert len(chunks) == len(stream) == spec["chunks"]
    for ours, key in zip(chunks, stream):
        np.testing.assert_allclose(ours, ARRAYS[key], rtol=0, atol=1e-6)


def test_the_stopping_variant_ends_by_eoa():
    """The 'stops' replies ended by layer 6's _eoa (the reference's stop rule), not by the limit;
    the _eot-then-_pad_t rule is the shared engine's, checked by Mini-Omni's own fixture."""
    cases = REFERENCE["variants"]["stops"]["cases"]
    for name in ("image0", "audio"):
        limit = cases[name]["max_returned_tokens"] - len(cases[name]["prompt"][0][0])
        assert len(cases[name]["tokens"]) < limit - 1
