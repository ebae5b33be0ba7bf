"""Mini-Omni loads the published files unchanged: key sets and shapes at full size (built on the
meta device, compared with the published lists), the QKV row layout, the frame <-> SNAC mapping."""
import json
from pathlib import Path

import pytest
import torch
from snac import SNAC

from zoo.mini_omni.codec import codes_to_frames, frames_to_codes
from zoo.mini_omni.gpt import GPT
from zoo.mini_omni.random_weights import FULL_GPT, FULL_SNAC
from zoo.mini_omni.whisper import AudioEncoder, EncoderDims

KEYS = {f["file"]: f for f in json.loads((Path(__file__).parent / "data/keys/mini-omni.json").read_text())["files"]}


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_lit_model_keys_and_shapes_equal_the_published_list():
    with torch.device("meta"):
        gpt = GPT(FULL_GPT)
    assert shapes(gpt) == KEYS["lit_model.pth"]["tensors"]


def test_whisper_encoder_keys_are_the_published_encoder_keys():
    with torch.device("meta"):
        encoder = AudioEncoder(EncoderDims())
    published = KEYS["small.pt"]["tensors"]
    ours = {f"encoder.{k}": v for k, v in shapes(encoder).items()}
    assert ours == {k: v for k, v in published.items() if k.startswith("encoder.")}
    # everything else in small.pt is Whisper's text decoder, which Mini-Omni never runs
    assert all(k.startswith("decoder.") for k in set(published) - set(ours))


@pytest.mark.parametrize("form", ["tensors", "tensors_alt"])
def test_snac_keys_match_either_weight_norm_naming(form):
    with torch.device("meta"):
        snac = SNAC(**FULL_SNAC)
    published = KEYS["pytorch_model.bin"][form]
    if form == "tensors":
        assert shapes(snac) == published
    else:  # the legacy naming loads through torch's conversion hook
        state = {k: torch.zeros(v) for k, v in published.items()}
        small = SNAC(**FULL_SNAC)
        small.load_state_dict(state, strict=True)


def test_fused_qkv_rows_are_interleaved_per_kv_group():
    """Row block layout of transformer.h.i.attn.attn: for each KV group g, q heads 7g..7g+6, then k_g,
    then v_g. Built by hand from separate Q/K/V projections, the model must match a plain
    multi-head attention with head h using KV group h // 7."""
    from zoo.mini_omni.gpt import KVCache
    from zoo.mini_omni.random_weights import tiny_config

    config = tiny_config(n_layer=1, n_head=6, n_query_groups=2, head_size=4, n_embd=24)
    gpt = GPT(config).double()
    attention = gpt.transformer.h[0].attn
    g, per, hs = config.n_query_groups, config.n_head // config.n_query_groups, config.head_size
    torch.manual_seed(0)
    Wq, Wk, Wv = torch.randn(config.n_head * hs, 24), torch.randn(g * hs, 24), torch.randn(g * hs, 24)
    rows = []
    for group in range(g):
        rows += [Wq[(group * per + i) * hs : (group * per + i + 1) * hs] for i in range(per)]
        rows += [Wk[group * hs : (group + 1) * hs], Wv[group * hs : (group + 1) * hs]]
    with torch.no_grad():
        attention.attn.weight.copy_(torch.cat(rows))
        attention.attn.bias.zero_()
    x = torch.randn(1, 5, 24, dtype=torch.float64)
    cos, sin = (t[:5][None].double() for t in gpt.rope())
    cache = KVCache(config, 1, config.block_size, torch.float64, "cpu")
    ours = attention(x, cos, sin, cache.k[0], cache.v[0], torch.tensor([0]), torch.arange(5)[None])

    from zoo.mini_omni.gpt import apply_rope

    q = (x @ Wq.double().T).view(1, 5, config.n_head, hs).transpose(1, 2)
    k = (x @ Wk.double().T).view(1, 5, g, hs).transpose(1, 2).repeat_interleave(per, dim=1)
    v = (x @ Wv.double().T).view(1, 5, g, hs).transpose(1, 2).repeat_interleave(per, dim=1)
    q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = attention.proj(y.transpose(1, 2).reshape(1, 5, -1))
    torch.testing.assert_close(ours, expected)


def test_frame_to_snac_mapping_is_depth_first_and_round_trips():
    frames = torch.arange(14).view(2, 7)
    c0, c1, c2 = frames_to_codes(frames)
    assert c0.tolist() == [[0, 7]]
    assert c1.tolist() == [[1, 4, 8, 11]]
    assert c2.tolist() == [[2, 3, 5, 6, 9, 10, 12, 13]]
    random = torch.randint(0, 4096, (9, 7))
    assert torch.equal(codes_to_frames(frames_to_codes(random)), random)


def test_a_damaged_lit_model_is_refused_naming_every_problem(tiny_folders, tmp_path):
    import shutil

    import zoo
    from zoo.core.errors import CheckpointMismatch

    for file in tiny_folders.checkpoint.iterdir():
        shutil.copy(file, tmp_path / file.name)
    state = torch.load(tmp_path / "lit_model.pth", weights_only=True)
    del state["transformer.ln_f.weight"]
    state["transformer.extra"] = torch.zeros(2)
    state["transformer.h.0.attn.proj.weight"] = state["transformer.h.0.attn.proj.weight"][:, :-1]
    torch.save(state, tmp_path / "lit_model.pth")
    with pytest.raises(CheckpointMismatch) as err:
        zoo.load("mini-omni", device="cpu", checkpoint=tmp_path, codec=tiny_folders.codec)
    message = str(err.value)
    for part in ("1 missing: transformer.ln_f.weight", "1 unexpected: transformer.extra",
                 "1 wrong shape: transformer.h.0.attn.proj.weight", "lit_model.pth"):
        assert part in message
    assert isinstance(err.value, zoo.WeightsNotFound)
