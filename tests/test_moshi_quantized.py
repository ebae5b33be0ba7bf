"""Moshi in int8: the reference's q8 repos (kyutai/moshiko-pytorch-q8: ``model.q8.safetensors``,
every Linear of the LM as bitsandbytes int8 rows with their ``_scb`` scales, a config.json with
``quantize`` and Mimi and the tokenizer named in the bf16 repo as ``hf://``) load unchanged, their
int8 rows unchanged; ``dtype="int8"`` packs a bf16 checkpoint into those same rows; int4 runs."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file, save_file

import zoo
from zoo.core.errors import CheckpointMismatch, WeightsNotFound
from zoo.core.quantize import Int4Linear, Int8Linear
from zoo.moshi.checkpoint import CONFIG_FILE, DEFAULT_REPO, MIMI_FILE, MOSHI_Q8_FILE, TOKENIZER_FILE
from zoo.moshi.lm import lm_names
from zoo.moshi.random_weights import int8_rows, tiny_checkpoint, write_tiny_q8_checkpoint
from zoo.moshi.transformer import SCALES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    return write_tiny_q8_checkpoint(tmp_path_factory.mktemp("q8") / "moshiko-q8")


@pytest.fixture(scope="module")
def q8_model(q8):
    return zoo.load("moshi", checkpoint=str(q8), device="cpu")


def greedy_tokens(model, steps: int = 30) -> torch.Tensor:
    """(steps with output, 1 + 8) text and audio tokens of a greedy duplex session on seeded noise
    (bench/moshi_q8.py's, which gpu.sh compares across devices)."""
    sys.path.insert(0, str(REPO / "bench"))
    from moshi_q8 import greedy_tokens as bench_greedy_tokens

    return bench_greedy_tokens(model, steps)


def test_the_tiny_export_packs_rows_as_bitsandbytes_does(q8):
    """The writer's int8 rows are bitsandbytes' int8_vectorwise_quant of the float16 weights (what
    the reference's export calls), for every Linear of the LM, under the published spellings."""
    from bitsandbytes.functional import int8_vectorwise_quant

    source = load_file(str(tiny_checkpoint(0) / "model.safetensors"))
    state = load_file(str(q8 / MOSHI_Q8_FILE))
    packed = [k.removesuffix(SCALES) for k in state if k.endswith(SCALES)]
    # every Linear: 2 layers x 4 + depformer layers x (2 + 2 x steps), text_linear, depformer_in.K, linears.K
    assert "transformer.layers.0.self_attn.in_proj_weight" in packed and "text_linear.weight" in packed
    assert "depformer.layers.0.self_attn.out_proj.weight" in packed and "linears.0.weight" in packed
    assert not any(k.startswith(("emb.", "text_emb", "depformer_emb", "depformer_text_emb")) for k in packed)
    for key in packed:
        rows, scales, _ = int8_vectorwise_quant(source[key].to(torch.float16))
        assert state[key].dtype == torch.int8 and torch.equal(state[key], rows), key
        assert state[key + SCALES].dtype == torch.float32 and torch.equal(state[key + SCALES], scales), key
        assert torch.equal(int8_rows(source[key])[0], rows)
    assert state["text_emb.weight"].dtype == torch.bfloat16
    config = json.loads((q8 / CONFIG_FILE).read_text())
    assert config["quantize"] is True and config["moshi_name"] == MOSHI_Q8_FILE
    assert config["mimi_name"] == f"hf://{DEFAULT_REPO}/{MIMI_FILE}"


def test_a_q8_checkpoint_loads_its_own_int8_rows(q8, q8_model):
    """No dtype: the file's int8. Every Linear is packed, its rows are the file's exactly and its
    scales the file's (rounded to the bfloat16 the kernel takes); Mimi is the bf16 repo's."""
    lm = q8_model.lm
    assert q8_model.dtype == torch.bfloat16
    file = lm_names(load_file(str(q8 / MOSHI_Q8_FILE)), lm.config)
    scaled = [k.removesuffix(".weight" + SCALES) for k in file if k.endswith(SCALES)]
    modules = dict(lm.named_modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in modules.values())
    assert len(scaled) == sum(isinstance(m, Int8Linear) for m in modules.values())
    for name in scaled:
        layer = modules[name]
        assert torch.equal(layer.weight[:, : layer.in_features], file[name + ".weight"]), name
        torch.testing.assert_close(layer.scale, (file[name + ".weight" + SCALES] / 127).bfloat16(), rtol=0, atol=0)
    bf16 = zoo.load("moshi", random_weights="tiny", device="cpu")
    for a, b in zip(q8_model.mimi.state_dict().values(), bf16.mimi.state_dict().values()):
        assert torch.equal(a, b)


def test_bitsandbytes_packs_the_rows_read_back_into_the_files_own(q8):
    """What a GPU runs: bitsandbytes packs each Linear from the float32 weight the loader reads
    back (rows x scale / 127); its rows and scales are the file's, bit for bit (checked here with
    bitsandbytes' CPU backend, the same int8_vectorwise_quant)."""
    from zoo.core.quantize import bitsandbytes_linear

    state = load_file(str(q8 / MOSHI_Q8_FILE))
    packed = [k.removesuffix(SCALES) for k in state if k.endswith(SCALES)]
    for key in packed:
        rows, scales = state[key], state[key + SCALES]
        linear = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False)
        linear.weight.data = rows.float() * (scales / 127)[:, None]
        layer = bitsandbytes_linear(linear, torch.bfloat16, "int8").to("cpu")
        assert torch.equal(layer.weight.data, rows) and torch.equal(layer.weight.SCB, scales), key


def test_int8_from_the_bf16_checkpoint_is_the_q8_export(q8_model):
    """``dtype="int8"`` packs the bf16 file as the reference's export does: the same model, bit
    for bit, and the same greedy session."""
    packed = zoo.load("moshi", random_weights="tiny", device="cpu", dtype="int8")
    a, b = q8_model.lm.state_dict(), packed.lm.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(greedy_tokens(q8_model, 12), greedy_tokens(packed, 12))


def test_int8_answers_like_its_dequantized_twin(q8, q8_model):
    """A float dtype runs the q8 file dequantized (rows x scale / 127, exactly). The int8 model
    (bfloat16 activations) follows that twin's greedy session: measured, its first 23 steps equal
    and 89% of the tokens over 30 frames; the bf16 checkpoint in bfloat16 parts from it at once
    (random weights: nearly flat logits)."""
    twin = zoo.load("moshi", checkpoint=str(q8), device="cpu", dtype="float32")
    file = load_file(str(q8 / MOSHI_Q8_FILE))
    rows, scales = file["text_linear.weight"], file["text_linear.weight" + SCALES]
    assert torch.equal(twin.lm.text_linear.weight, rows.float() * (scales / 127)[:, None])
    ours, theirs = greedy_tokens(q8_model), greedy_tokens(twin)
    assert torch.equal(ours[:5], theirs[:5])
    assert (ours == theirs).float().mean() > 0.5
    assert torch.equal(greedy_tokens(q8_model), ours)  # and it is deterministic


def test_int4_packs_every_linear_and_answers(q8):
    model = zoo.load("moshi", checkpoint=str(q8), device="cpu", dtype="int4")
    modules = list(model.lm.modules())
    assert sum(isinstance(m, Int4Linear) for m in modules) > 0
    assert not any(isinstance(m, (torch.nn.Linear, Int8Linear)) for m in modules)
    tokens = greedy_tokens(model, 8)
    assert tokens.shape == (7, 9)


def test_the_reference_per_step_spelling_of_a_q8_file_loads_the_same(q8, q8_model, tmp_path):
    """A q8 file exported after the reference moved to per-step projections (``in_projs.K.weight``
    with ``in_projs.K.weight_scb``) gives the same model."""
    other = tmp_path / "per-step"
    shutil.copytree(q8, other)
    state = load_file(str(q8 / MOSHI_Q8_FILE))
    save_file(lm_names(state, q8_model.lm.config), str(other / MOSHI_Q8_FILE))
    assert any(".in_projs.3.weight_scb" in k for k in load_file(str(other / MOSHI_Q8_FILE)))
    again = zoo.load("moshi", checkpoint=str(other), device="cpu")
    a, b = q8_model.lm.state_dict(), again.lm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_q8_file_that_does_not_match_is_one_error(q8, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(q8, bad)
    state = load_file(str(q8 / MOSHI_Q8_FILE))
    del state["linears.1.weight" + SCALES]
    state["text_linear.weight"] = state["text_linear.weight"].float()
    save_file(state, str(bad / MOSHI_Q8_FILE))
    with pytest.raises(CheckpointMismatch) as err:
        zoo.load("moshi", checkpoint=str(bad), device="cpu")
    message = str(err.value)
    assert "int8 weights without scales: linears.1.weight" in message
    assert "int8 scales without an int8 weight: text_linear.weight" in message
    plain = tmp_path / "plain"
    shutil.copytree(q8, plain)
    shutil.copy(tiny_checkpoint(0) / "model.safetensors", plain / MOSHI_Q8_FILE)
    with pytest.raises(CheckpointMismatch, match="quantize but the file holds no int8 weights"):
        zoo.load("moshi", checkpoint=str(plain), device="cpu")


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd", "file:///etc/passwd", "hf://kyutai",
                                  "hf://kyutai/x/../../y", "sub\\..\\x", 5, ["x"], None])
def test_names_in_config_json_stay_inside_the_checkpoint_or_the_hub(q8, tmp_path, name):
    odd = tmp_path / "odd"
    shutil.copytree(q8, odd)
    config = json.loads((q8 / CONFIG_FILE).read_text())
    (odd / CONFIG_FILE).write_text(json.dumps({**config, "tokenizer_name": name}))
    with pytest.raises(CheckpointMismatch, match="is not a file"):
        zoo.load("moshi", checkpoint=str(odd), device="cpu")


def test_a_config_json_of_the_wrong_shape_is_one_clear_error(q8, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(q8, odd)
    config = json.loads((q8 / CONFIG_FILE).read_text())
    (odd / CONFIG_FILE).write_text(json.dumps({**config, "lm_gen_config": 5}))
    with pytest.raises(CheckpointMismatch, match="config.json"):
        zoo.load("moshi", checkpoint=str(odd), device="cpu")


def _hub_repo(cache, repo: str, files: dict) -> None:
    """``repo`` in a Hugging Face hub cache, as huggingface_hub lays out a download."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    for name, path in files.items():
        shutil.copy(path, snapshot / name)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_q8_hub_repo_takes_mimi_and_the_tokenizer_from_the_bf16_repo(q8, q8_model, offline_hub):
    """As published: the q8 repo holds the int8 LM and config.json; its ``hf://`` names are
    fetched from kyutai/moshiko-pytorch-bf16 (here from a hub cache, offline)."""
    q8_repo = "kyutai/moshiko-pytorch-q8"
    _hub_repo(offline_hub, q8_repo, {n: q8 / n for n in (MOSHI_Q8_FILE, CONFIG_FILE, "mimi_config.json")})
    with pytest.raises(WeightsNotFound, match=DEFAULT_REPO):
        zoo.load("moshi", checkpoint=q8_repo, device="cpu")
    _hub_repo(offline_hub, DEFAULT_REPO, {n: q8 / n for n in (MIMI_FILE, TOKENIZER_FILE)})
    model = zoo.load("moshi", checkpoint=q8_repo, device="cpu")
    a, b = q8_model.lm.state_dict(), model.lm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert model.tokenizer.get_piece_size() == q8_model.tokenizer.get_piece_size()


def test_the_device_check_of_gpu_sh_runs_here(tmp_path):
    """bench/moshi_q8.py as gpu.sh runs it, on the CPU: every packed layer holds the file's rows
    and the tokens are the CPU's own."""
    done = subprocess.run([sys.executable, "bench/moshi_q8.py", "--device", "cpu", "--steps", "6", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*_moshi_q8_cpu.json")).read_text())
    assert result["layers"] == result["rows_exact"] > 0 and result["packer"] == "zoo.core.quantize.Int8Linear"
    assert result["token_agreement_with_cpu"] == 1.0 and result["steps_equal_before_first_difference"] == 5
