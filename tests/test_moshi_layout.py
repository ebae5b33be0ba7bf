"""Moshi loads the published files unchanged: the published key names and sizes at full size
(meta device), both key spellings the reference loader accepts, strict errors, the checkpoint-info
config.json; plus options, text pieces and duplex sessions (isolation, seeds, refused frames)."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from zoo.core.errors import AudioInputError, CheckpointMismatch
from zoo.moshi.checkpoint import MIMI_FILE, MOSHI_FILE, TOKENIZER_FILE, CheckpointInfo
from zoo.moshi.lm import LMConfig, MoshiLM, lm_names
from zoo.moshi.mimi import Mimi, MimiConfig, mimi_names
from zoo.moshi.options import MoshiOptions
from zoo.moshi.random_weights import tiny_checkpoint
from zoo.moshi.transformer import stacked_names

pytestmark = pytest.mark.usefixtures("one_thread")
FRAME = 1920


@pytest.fixture(scope="module")
def folder(_tiny_cache):
    return tiny_checkpoint(seed=0)


@pytest.fixture(scope="module")
def tiny(folder):
    return zoo.load("moshi", random_weights="tiny", device="cpu")


def test_full_size_modules_have_the_published_names_and_sizes():
    """Names and shapes as in kyutai/moshiko-pytorch-bf16 (as transformers' conversion scripts
    read them: fused in_proj_weight, depformer steps stacked, gating.K per step): the modules'
    state in the published spelling, which maps back onto the modules' names."""
    with torch.device("meta"):
        lm, mimi = MoshiLM(LMConfig()), Mimi(MimiConfig())
    lm_state, mimi_state = stacked_names(lm.state_dict()), stacked_names(mimi.state_dict())
    for module, state, back in ((lm, lm_state, lambda s: lm_names(s, lm.config)), (mimi, mimi_state, mimi_names)):
        ours = back(state)
        assert ours.keys() == module.state_dict().keys()
        assert all(ours[k].shape == v.shape for k, v in module.state_dict().items())
    assert round(sum(v.numel() for v in lm_state.values()) / 1e9, 2) == 7.69
    assert round(sum(v.numel() for v in mimi_state.values()) / 1e6, 1) == 96.2
    shapes = {
        "transformer.layers.31.self_attn.in_proj_weight": (3 * 4096, 4096),
        "transformer.layers.0.gating.linear_in.weight": (2 * 11264, 4096),
        "transformer.layers.0.norm1.alpha": (1, 1, 4096),
        "out_norm.alpha": (1, 1, 4096), "text_emb.weight": (32001, 4096), "emb.15.weight": (2049, 4096),
        "text_linear.weight": (32000, 4096), "depformer_in.7.weight": (1024, 4096),
        "depformer_emb.6.weight": (2049, 1024), "depformer_text_emb.weight": (32001, 1024),
        "depformer.layers.5.self_attn.in_proj_weight": (8 * 3 * 1024, 1024),
        "depformer.layers.5.self_attn.out_proj.weight": (8 * 1024, 1024),
        "depformer.layers.5.gating.7.linear_in.weight": (2 * 2816, 1024), "linears.7.weight": (2048, 1024),
    }
    for key, shape in shapes.items():
        assert tuple(lm_state[key].shape) == shape, key
    assert "depformer_emb.7.weight" not in lm_state and len(lm_state) == 355
    for key in ("encoder.model.0.conv.conv.weight", "decoder.model.2.convtr.convtr.weight",
                "encoder_transformer.transformer.layers.7.self_attn.in_proj_weight",
                "decoder_transformer.transformer.layers.0.layer_scale_2.scale", "downsample.conv.conv.conv.weight",
                "upsample.convtr.convtr.convtr.weight", "quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum",
                "quantizer.rvq_first.vq.layers.0._codebook._initialized", "quantizer.rvq_first.input_proj.weight"):
        assert key in mimi_state, key
    assert tuple(mimi_state["upsample.convtr.convtr.convtr.weight"].shape) == (512, 1, 4)  # channel-wise
    assert tuple(mimi_state["downsample.conv.conv.conv.weight"].shape) == (512, 512, 4)


def test_the_other_key_spellings_the_reference_accepts_load_the_same(folder, tmp_path, tiny):
    """Per-step attention projections (in_projs.K / out_projs.K) and Mimi's older codebook buffer
    names load into the same tensors."""
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    state = load_file(str(folder / MOSHI_FILE))
    steps = tiny.lm.config.dep_q
    for key in [k for k in state if k.startswith("depformer.") and "self_attn" in k]:
        value = state.pop(key)
        base = key.rsplit(".self_attn.", 1)[0] + ".self_attn."
        kind = "in_projs" if key.endswith("in_proj_weight") else "out_projs"
        for i, part in enumerate(value.chunk(steps)):
            state[f"{base}{kind}.{i}.weight"] = part
    for key in [k for k in state if k.startswith("transformer.") and k.endswith("in_proj_weight")]:
        state[key.replace("in_proj_weight", "in_proj.weight")] = state.pop(key)
    save_file(state, str(other / MOSHI_FILE))
    mimi_state = load_file(str(folder / MIMI_FILE))
    renames = {"embedding_sum": "embed_sum", "cluster_usage": "cluster_size", "_initialized": "inited"}
    mimi_state = {k.rsplit(".", 1)[0] + "." + renames[k.rsplit(".", 1)[1]] if k.rsplit(".", 1)[1] in renames else k: v
                  for k, v in mimi_state.items()}
    save_file(mimi_state, str(other / MIMI_FILE))
    again = zoo.load("moshi", checkpoint=str(other), device="cpu")
    for mine, theirs in ((tiny.lm, again.lm), (tiny.mimi, again.mimi)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_mismatching_file_is_one_error_naming_every_problem(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    state = load_file(str(folder / MOSHI_FILE))
    del state["linears.3.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["text_emb.weight"] = state["text_emb.weight"][:-1].contiguous()
    save_file(state, str(bad / MOSHI_FILE))
    with pytest.raises(CheckpointMismatch) as err:
        zoo.load("moshi", checkpoint=str(bad), device="cpu")
    message = str(err.value)
    assert "linears.3.weight" in message and "extra.weight" in message and "text_emb.weight" in message


def test_config_json_is_the_reference_checkpoint_info_and_its_absence_means_moshi_7b(folder, tmp_path):
    info = CheckpointInfo.read(folder)
    assert info.lm.dim == 32 and info.mimi.transformer.context == 8 and info.lm.delays[:3] == (0, 0, 1)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (MOSHI_FILE, MIMI_FILE, TOKENIZER_FILE):
        shutil.copy(folder / name, bare / name)
    assert CheckpointInfo.read(bare).lm == LMConfig() and CheckpointInfo.read(bare).mimi == MimiConfig()
    with pytest.raises(CheckpointMismatch, match="published tokenizer-e351c8d8 layout"):
        zoo.load("moshi", checkpoint=str(bare), device="cpu")  # tiny files against the published settings
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    config = json.loads((folder / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "depformer_weights_per_step": False}))
    with pytest.raises(CheckpointMismatch, match="depformer_weights_per_step"):
        zoo.load("moshi", checkpoint=str(odd), device="cpu")


def test_options_are_the_reference_lmgen_defaults():
    o = MoshiOptions()
    assert (o.temperature, o.top_k, o.text_temperature, o.text_top_k) == (0.8, 250, 0.7, 25)
    with pytest.raises(zoo.OptionsError, match="text_temperature"):
        MoshiOptions(text_temperature=-1.0).validate()


def test_text_pieces_are_what_the_reference_server_sends(tiny):
    assert tiny.piece(3) == "" and tiny.piece(0) == "" and tiny.piece(10 ** 6) == "" and tiny.piece(-2) == ""
    piece = tiny.tokenizer.id_to_piece(6)
    assert piece.startswith("▁") and tiny.piece(6) == " " + piece[1:]


def test_sampled_sessions_batched_equal_each_alone_and_seeds_matter(tiny):
    rng = np.random.default_rng(1)
    frames = (0.2 * rng.standard_normal((6, FRAME))).astype(np.float32)

    def alone(seed):
        with tiny.duplex({"seed": seed}) as session:
            return [session.step(f) for f in frames]

    stepper = tiny.duplex_stepper(2)
    handles = [stepper.open({"seed": s}) for s in (1, 2)]
    batched = [[], []]
    for f in frames:
        for out, h, store in zip(stepper.step(handles, [f, f]), handles, batched):
            store.append((out, h.text))
    for seed, got in zip((1, 2), batched):
        expected = alone(seed)
        assert [t for _, t in got] == [c.text for c in expected]
        # same sampled codes; Mimi's float32 decode of a batch of 2 rounds differently from a batch of 1
        np.testing.assert_allclose(np.stack([a for a, _ in got]), np.stack([c.audio for c in expected]), atol=1e-5)
    assert not np.array_equal(np.stack([a for a, _ in batched[0]]), np.stack([a for a, _ in batched[1]]))


def test_unusable_logits_end_only_their_session(tiny, monkeypatch):
    """A session whose logits turn NaN ends with an error at that step; its companion's steps
    stay exactly what they are without it (each row draws from its own generator)."""
    frames = (0.2 * np.random.default_rng(2).standard_normal((4, FRAME))).astype(np.float32)

    def run(poison: bool):
        stepper = tiny.duplex_stepper(2)
        handles = [stepper.open({"seed": 5}), stepper.open({"seed": 6})]
        real, calls = tiny.lm.depformer_logits, [0]

        def depformer_logits(*args, **kwargs):
            logits = real(*args, **kwargs)
            calls[0] += 1
            if poison and calls[0] == 2 * tiny.lm.config.dep_q + 3:  # the 3rd step's 3rd codebook
                logits = logits.clone()
                logits[1] = float("nan")
            return logits

        monkeypatch.setattr(tiny.lm, "depformer_logits", depformer_logits)
        outs, tokens = [], []
        for k, f in enumerate(frames):
            live = handles[:1] if poison and k == 3 else handles
            outs.append(stepper.step(live, [f] * len(live)))
            tokens.append(None if handles[0].tokens is None else handles[0].tokens.tolist())
        return outs, tokens, handles

    clean, clean_tokens, _ = run(False)
    poisoned, tokens, handles = run(True)
    assert isinstance(poisoned[2][1], FloatingPointError) and handles[1].closed
    assert "not finite" in str(poisoned[2][1])
    assert not handles[0].closed and tokens == clean_tokens
    for got, expected in zip(poisoned, clean):  # Mimi's float32 decode of a batch of 1 rounds apart
        np.testing.assert_allclose(got[0], expected[0], atol=1e-5)


def test_a_refused_frame_ends_only_its_session(tiny):
    stepper = tiny.duplex_stepper(2)
    a, b = stepper.open({"temperature": 0.0}), stepper.open({"temperature": 0.0})
    outs = stepper.step([a, b], [np.zeros(100, np.float32), np.zeros(FRAME, np.float32)])
    assert isinstance(outs[0], AudioInputError) and a.closed
    assert outs[1].shape == (FRAME,) and not b.closed
    with tiny.duplex() as session:
        with pytest.raises(AudioInputError):
            session.step(np.zeros(FRAME + 1, np.float32))
        assert session.step(np.zeros(FRAME, np.float32)).audio.shape == (FRAME,)  # it goes on
