"""GLM-4-Voice-9B's LLM: the published ChatGLM tensor names load unchanged into transformers'
GlmForCausalLM through an explicit key map."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.core.errors import WeightsNotFound
from zoo.glm4_voice.llm import OPTIONAL_KEYS, glm_config, load_llm, published_names, published_state
from zoo.glm4_voice.random_weights import TINY_LLM_CONFIG, write_tiny_llm

PUBLISHED = next(f for f in json.loads((Path(__file__).parent / "data/keys/glm-4-voice.json").read_text())["files"]
                 if "glm-4-voice-9b" in f["hf_repo"])
FULL = dict(padded_vocab_size=168960, hidden_size=4096, ffn_hidden_size=13696, num_layers=40, num_attention_heads=32,
            multi_query_group_num=2, kv_channels=128, add_qkv_bias=True, layernorm_epsilon=1.5625e-07, seq_length=8192)


def test_full_size_names_and_shapes_equal_the_published_list():
    published = {k: v for k, v in PUBLISHED["tensors"].items() if k not in PUBLISHED["uncertain_keys"]}
    assert published_names(glm_config(FULL)) == published
    assert set(PUBLISHED["uncertain_keys"]) == OPTIONAL_KEYS


@pytest.mark.parametrize("with_inv_freq", [True, False])
def test_tiny_shards_load_with_the_key_map(tmp_path, with_inv_freq):
    folder = write_tiny_llm(tmp_path / "llm", with_inv_freq=with_inv_freq)
    model = load_llm(folder, dtype=torch.float32)
    published = {}
    for shard in folder.glob("*.safetensors"):
        published.update(load_file(shard))
    layer = model.model.layers[1].self_attn
    qkv = published["transformer.encoder.layers.1.self_attention.query_key_value.weight"].float()
    q_rows = TINY_LLM_CONFIG["num_attention_heads"] * TINY_LLM_CONFIG["kv_channels"]
    kv_rows = TINY_LLM_CONFIG["multi_query_group_num"] * TINY_LLM_CONFIG["kv_channels"]
    assert torch.equal(layer.q_proj.weight, qkv[:q_rows])
    assert torch.equal(layer.k_proj.weight, qkv[q_rows : q_rows + kv_rows])
    assert torch.equal(layer.v_proj.weight, qkv[q_rows + kv_rows :])
    assert torch.equal(model.lm_head.weight, published["transformer.output_layer.weight"].float())
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight,
                       published["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"].float())
    logits = model(torch.tensor([[151331, 151333, 151336, 198]])).logits
    assert logits.shape == (1, 4, 168960) and torch.isfinite(logits).all()


def test_a_missing_or_misshapen_tensor_is_named(tmp_path):
    folder = write_tiny_llm(tmp_path / "llm")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    gone = "transformer.encoder.final_layernorm.weight"
    del index["weight_map"][gone]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsNotFound, match="final_layernorm"):
        load_llm(folder)
    wrong = dict(TINY_LLM_CONFIG, ffn_hidden_size=80)
    folder2 = write_tiny_llm(tmp_path / "llm2")
    (folder2 / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(WeightsNotFound, match="dense_h_to_4h|dense_4h_to_h"):
        load_llm(folder2)


def test_logits_and_greedy_tokens_equal_the_reference_code(tmp_path):
    """tests/data/glm_llm_reference.json: the published remote code's own results on this tiny
    checkpoint (float32; the two are bit-identical there)."""
    reference = json.loads((Path(__file__).parent / "data" / "glm_llm_reference.json").read_text())
    model = load_llm(write_tiny_llm(tmp_path / "llm"), dtype=torch.float32)
    ids = torch.tensor([reference["input_ids"]])
    with torch.inference_mode():
        logits = model(ids).logits[0]
        greedy = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    assert logits.topk(5, dim=-1).indices.tolist() == reference["top5"]
    assert abs(float(logits.abs().sum()) - reference["logits_abs_sum"]) < 1e-3 * reference["logits_abs_sum"]
    assert greedy == reference["greedy"]


def test_published_state_gives_back_the_files_tensors(tmp_path):
    """``published_state`` inverts the key map (q, k, v joined again): what the reference's remote
    code loads, as bench/compare_glm_4_voice.py hands it our weights."""
    folder = write_tiny_llm(tmp_path / "llm")
    published = {}
    for shard in folder.glob("*.safetensors"):
        published.update(load_file(shard))
    state = published_state(load_llm(folder, dtype=torch.float32))
    assert set(state) == set(published)
    for name, tensor in published.items():
        if name in OPTIONAL_KEYS:  # recomputed in float32; the file holds it rounded to bf16
            torch.testing.assert_close(state[name], tensor.float(), rtol=1e-2, atol=0)
        else:
            assert torch.equal(state[name], tensor.float()), name


def test_a_quantized_load_packs_each_layer_before_it_reads_the_next(tmp_path, monkeypatch):
    """The published shards are read part by part: when a decoder layer's tensors are read, the
    layers before it are already packed and the ones after it not yet read, so neither the host
    nor the device ever holds the full-precision network (19 GB at full size), and every tensor
    is read once."""
    import re

    from torch import nn
    from transformers import GlmForCausalLM

    import zoo.glm4_voice.llm as llm_module

    folder = write_tiny_llm(tmp_path / "llm")
    building, init = [], GlmForCausalLM.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        building.append(self)

    opened, reads = llm_module.safe_open, []

    class WatchedShard:
        def __init__(self, *args, **kwargs):
            self.file = opened(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, name):
            layers = building[-1].model.layers
            match = re.fullmatch(r"transformer\.encoder\.layers\.(\d+)\..+", name)
            now = int(match.group(1)) if match else (-1 if "embedding" in name else len(layers))
            for number, layer in enumerate(layers):
                if number < now:
                    assert not any(type(m) is nn.Linear for m in layer.modules()), (name, number)
                elif number > now:
                    assert all(p.is_meta for p in layer.parameters()), (name, number)
            reads.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(GlmForCausalLM, "__init__", remember)
    monkeypatch.setattr(llm_module, "safe_open", WatchedShard)
    packed = load_llm(folder, dtype=torch.float32, quantized="int8")
    monkeypatch.undo()
    expected = published_names(glm_config(TINY_LLM_CONFIG))
    assert sorted(reads) == sorted(expected)
    plain = load_llm(folder, dtype=torch.float32)
    assert not any(t.is_meta for t in (*packed.parameters(), *packed.buffers()))
    assert torch.equal(packed.lm_head.weight, plain.lm_head.weight)
    ids = torch.tensor([[151331, 151333, 1000, 2000]])
    expected_logits = plain(ids).logits
    assert 0 < (packed(ids).logits - expected_logits).abs().max() / expected_logits.abs().max() < 0.05
