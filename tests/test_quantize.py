"""Weight-only int8/int4 (bitsandbytes on a GPU; on a CPU torch's int8 and int4 kernels) replaces every Linear
but those kept and stays close to the original; GLM-4-Voice loads (and draws random weights)
quantised the reference's way on a GPU, layer by layer; Mini-Omni's int8 packs its transformer layers."""
import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from zoo.core.quantize import quantize_linears
from zoo.glm4_voice.llm import load_llm
from zoo.glm4_voice.random_weights import random_llm, write_tiny_llm


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.02), ("int4", 0.35)])
def test_linears_are_quantized_and_close(kind, tolerance):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Sequential(nn.Linear(128, 64, bias=False)))
    x = torch.randn(4, 64)
    expected = net(x)
    quantized = quantize_linears(copy.deepcopy(net), kind, torch.float32, torch.device("cpu"))
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    stored = sum(p.numel() * p.element_size() for p in quantized.parameters())
    assert stored < sum(p.numel() * p.element_size() for p in net.parameters()) / 3
    error = (quantized(x) - expected).abs().max() / expected.abs().max()
    assert 0 < error < tolerance


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="int3"):
        quantize_linears(nn.Linear(2, 2), "int3", torch.float32, torch.device("cpu"))


def test_kept_linears_stay_in_full_precision():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    head = net[1]
    weight = head.weight.detach().clone()
    quantize_linears(net, "int4", torch.float32, torch.device("cpu"), keep=(head,))
    assert type(net[0]) is not nn.Linear and net[1] is head and torch.equal(head.weight, weight)


def _decoder_linears(llm):
    return {name: m for name, m in llm.model.layers.named_modules() if name and not list(m.children())
            and hasattr(m, "in_features")}


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.02), ("int4", 0.35)])
def test_glm_loads_quantized_with_the_output_layer_kept(tmp_path, kind, tolerance):
    """The published layout, ``--dtype int4`` as the reference's recipe (transformers' bitsandbytes
    integration): every decoder Linear packed, the embedding and output layer as published, the
    logits close to the full-precision load."""
    folder = write_tiny_llm(tmp_path / "llm")
    full = load_llm(folder, dtype=torch.float32)
    quantized = load_llm(folder, dtype=torch.float32, quantized=kind)
    assert type(quantized.lm_head) is nn.Linear and torch.equal(quantized.lm_head.weight, full.lm_head.weight)
    assert torch.equal(quantized.model.embed_tokens.weight, full.model.embed_tokens.weight)
    linears = _decoder_linears(quantized)
    assert linears and not any(type(m) is nn.Linear for m in linears.values())
    ids = torch.tensor([[151331, 151333, 151336, 198, 1000, 2000]])
    expected, got = full(ids).logits, quantized(ids).logits
    assert 0 < ((got - expected).abs().max() / expected.abs().max()) < tolerance


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_random_glm_quantizes_each_layer_as_it_is_drawn(monkeypatch, kind):
    """A seed gives the same network at every precision (the quantised one is that network,
    packed), and each decoder layer is packed before the next one is drawn: the device never
    holds the full-precision network, which is what lets int4 fit a 12 GB card."""
    import zoo.core.quantize

    pack = zoo.core.quantize.quantize_linears
    seen = []

    def watched(module, *args, **kwargs):
        layers = llm_being_built[0].model.layers
        index = next(i for i, layer in enumerate(layers) if layer is module)
        assert all(p.is_meta for layer in layers[index + 1:] for p in layer.parameters())  # not drawn yet
        assert not any(type(m) is nn.Linear for layer in layers[:index] for m in layer.modules())  # packed
        seen.append(index)
        return pack(module, *args, **kwargs)

    from transformers import GlmForCausalLM
    llm_being_built = []
    build = GlmForCausalLM.__init__

    def remember(self, *args, **kwargs):
        build(self, *args, **kwargs)
        llm_being_built.append(self)

    monkeypatch.setattr(GlmForCausalLM, "__init__", remember)
    monkeypatch.setattr(zoo.core.quantize, "quantize_linears", watched)
    cpu = torch.device("cpu")
    quantized = random_llm("tiny", device=cpu, dtype=torch.float32, quantized=kind)
    full = random_llm("tiny", device=cpu, dtype=torch.float32)
    assert seen == list(range(len(full.model.layers)))
    assert type(quantized.lm_head) is nn.Linear and torch.equal(quantized.lm_head.weight, full.lm_head.weight)
    for name, p in full.named_parameters():
        if "layers" not in name or "norm" in name:
            assert torch.equal(quantized.get_parameter(name), p), name
    packed, plain = _decoder_linears(quantized), _decoder_linears(full)
    assert packed.keys() == plain.keys()
    x = torch.randn(8, full.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, linear in plain.items():
        x_in = x if linear.in_features == x.size(1) else torch.cat([x, x], dim=1)[:, :linear.in_features]
        exact = linear(x_in)  # packed: int8 0.5-0.7% off, int4 8-9% (on a CPU); another draw: ~1.4
        assert 0 < ((packed[name](x_in) - exact).norm() / exact.norm()) < 0.35, name


def test_the_engine_bench_measures_a_quantized_networks_agreement(tmp_path):
    """``bench/glm4_engine.py --agreement-steps``, as a script: the quantised network teacher-forced
    along the unquantised one's greedy tokens (int8 of the same seeded network agrees closely; a
    misaligned comparison would not), and the flag refused without a quantised dtype."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, "bench/glm4_engine.py", "--size", "tiny", "--device", "cpu", "--batches", "1",
               "--steps", "4", "--context", "20", "--agreement-steps", "16", "--out", str(tmp_path)]
    done = subprocess.run([*command, "--dtype", "int8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = [json.loads(f.read_text()) for f in tmp_path.glob("*_int8.json")]
    quality = result["agreement_with_unquantized"]
    assert quality["steps"] == 17 and quality["token_agreement"] >= 0.9
    assert 0 < quality["logits_relative_error_median"] < 0.05
    refused = subprocess.run([*command, "--dtype", "float32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "quantised network" in refused.stderr


@pytest.mark.parametrize("sizes", [(64, 96, 32), (20, 40, 12)], ids=["whole-blocks", "padded"])
def test_int8_on_a_cpu_runs_torchs_int8_kernel_with_one_scale_per_output_channel(sizes):
    """On a CPU ``int8`` is Int8Linear (bitsandbytes' CPU int8 is 2.8x slower for 4 sessions): the
    product equals x @ (int8 weight x its row's scale)^T, for inputs of any leading shape and any
    size (the kernel gives garbage for input sizes not in blocks of 16: those are padded), and
    the rows are bitsandbytes' int8_vectorwise_quant of a float16 weight (the reference q8 files')."""
    from bitsandbytes.functional import int8_vectorwise_quant

    from zoo.core.quantize import Int8Linear

    torch.manual_seed(0)
    a, b, c = sizes
    net = nn.Sequential(nn.Linear(a, b), nn.SiLU(), nn.Linear(b, c, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(net[0].weight.half().float())
    x = torch.randn(2, 5, a)
    expected = net(x)
    quantized = quantize_linears(copy.deepcopy(net), "int8", torch.float32, torch.device("cpu"))
    first = quantized[0]
    assert isinstance(first, Int8Linear) and first.weight.dtype == torch.int8 and first.scale.shape == (b,)
    rows = first.weight[:, :a]
    assert rows.abs().amax(dim=1).eq(127).all()  # each row's largest weight spans the range
    assert torch.equal(rows, int8_vectorwise_quant(net[0].weight.detach().half())[0])
    dequantized = rows.float() * first.scale[:, None]
    for _ in range(3):  # the same every time (the unpadded kernel read past the rows)
        torch.testing.assert_close(first(x), x @ dequantized.t() + first.bias, rtol=1e-5, atol=1e-5)
    assert (dequantized - net[0].weight).abs().max() <= first.scale.max() / 2 + 1e-7
    error = (quantized(x) - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.02
    bf16 = quantize_linears(copy.deepcopy(net), "int8", torch.bfloat16, torch.device("cpu"))
    out = bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, c)
    assert (out.float() - expected).abs().max() / expected.abs().max() < 0.05


@pytest.mark.parametrize("shape", [(128, 96), (50, 20)], ids=["whole-groups", "padded"])
def test_int4_on_a_cpu_runs_torchs_int4_kernel_with_a_scale_and_zero_per_group(shape):
    """On a CPU ``int4`` is Int4Linear (bitsandbytes' CPU NF4 repacks lazily and fails on some shapes): each
    group of input channels of a row is spread over 16 even levels from its smallest to its largest
    weight, the product is x @ that weight^T, and shapes the kernel cannot take (output sizes not a
    multiple of 16, input sizes not whole groups) are padded and cut back."""
    from zoo.core.quantize import Int4Linear

    torch.manual_seed(0)
    inputs, outputs = shape
    linear = nn.Linear(inputs, outputs)
    packed = quantize_linears(nn.Sequential(copy.deepcopy(linear)), "int4", torch.bfloat16, torch.device("cpu"))[0]
    assert isinstance(packed, Int4Linear) and packed.weight.dtype == torch.uint8
    assert packed.group == (64 if inputs % 64 == 0 else 32)
    # the weight the kernel computes with, read back through it in float32 (an identity input)
    padded_inputs = packed.weight.shape[1] * 2
    scales = packed.scale_and_zero.float()
    read = torch._weight_int4pack_mm_for_cpu(torch.eye(padded_inputs), packed.weight, packed.group, scales)
    weight = read.t()[:outputs, :inputs]
    original = linear.weight.detach()
    groups = original.reshape(outputs, -1, packed.group) if inputs % packed.group == 0 else None
    step = scales[..., 0].t()[:outputs]  # (outputs, groups): the distance between two levels
    per_weight = step.repeat_interleave(packed.group, dim=1)[:, :inputs]
    stored = 8e-3 * original.abs().max()  # scales and zero points are kept in bfloat16
    assert ((weight - original).abs() <= per_weight / 2 + stored).all()
    assert (step < (original.max() - original.min()) / 15 * 1.01).all()
    if groups is not None:  # each group's extremes are levels 0 and 15
        got = weight.reshape(outputs, -1, packed.group)
        torch.testing.assert_close(got.amin(dim=2), groups.amin(dim=2), atol=stored, rtol=0)
        torch.testing.assert_close(got.amax(dim=2), groups.amax(dim=2), atol=stored, rtol=0)
    x = torch.randn(2, 5, inputs)
    out = packed(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, outputs)
    torch.testing.assert_close(out.float(), x @ weight.t() + linear.bias.detach(), rtol=0.02, atol=0.02)
    expected = linear(x)
    assert 0 < (out.float() - expected).norm() / expected.norm() < 0.12


def test_glm_quantized_weights_compute_in_bfloat16_on_every_device():
    """torch's CPU int8/int4 kernels are 2-4x slower with float32 activations than a float32
    product: a quantised GLM-4-Voice LLM computes in bfloat16 on a CPU as on a GPU, its
    tokenizer and decoder in float32 as the reference runs them."""
    from zoo.glm4_voice.model import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for kind in ("int8", "int4"):
        assert precision(kind, cpu) == precision(kind, cuda) == (torch.bfloat16, kind, torch.float32)
    assert precision(None, cpu) == (torch.float32, None, torch.float32)
    assert precision(None, cuda) == (torch.bfloat16, None, torch.float32)


def test_mini_omni_int8_packs_its_transformer_layers_and_stays_close(tiny_folders):
    """``dtype="int8"`` (the published layout, and random weights): every Linear of the transformer
    layers packed, the output head, embeddings and adapter as the bfloat16 load's; the first
    reply position's logits close to the bfloat16 model's; a whole reply runs."""
    import zoo
    from zoo.core.quantize import Int8Linear
    from zoo.mini_omni.engine import Engine, Session
    from zoo.mini_omni.prompts import TASKS, audio_question

    folders = {"checkpoint": tiny_folders.checkpoint, "codec": tiny_folders.codec}
    plain = zoo.load("mini-omni", device="cpu", dtype="bfloat16", **folders)
    packed = zoo.load("mini-omni", device="cpu", dtype="int8", **folders)
    layers = [m for m in packed.gpt.transformer.h.modules() if not list(m.children()) and hasattr(m, "in_features")]
    assert layers and all(isinstance(m, Int8Linear) for m in layers)
    for name in ("lm_head.weight", "transformer.wte.weight", "whisper_adapter.fc_1.weight"):
        assert torch.equal(packed.gpt.get_parameter(name), plain.gpt.get_parameter(name)), name
    dim = plain.gpt.config.whisper_adapter_dim
    features = torch.randn(1, 12, dim, generator=torch.Generator().manual_seed(0)).bfloat16()
    logits = []
    for model in (plain, packed):
        task = TASKS["A1A2+A1T2"]
        session = Session(task, audio_question(task, 12), features, model.options({"temperature": 0}), max_outputs=4)
        engine = Engine(model.gpt, max_rows=2)
        engine._admit(session)
        with torch.inference_mode():
            hidden = engine._prefill([session])
            logits.append(torch.cat([model.gpt.text_logits(hidden[-1]).flatten(),
                                     model.gpt.audio_logits(hidden[0]).flatten()]).float())
    error = (logits[1] - logits[0]).norm() / logits[0].norm()
    assert 0 < error < 0.1
    with pytest.raises(zoo.OptionsError, match=r"unknown dtype 'int2'.*or a quantisation: int8, int4$"):
        zoo.load("mini-omni", random_weights="tiny", device="cpu", dtype="int2")
    random = zoo.load("mini-omni", random_weights="tiny", device="cpu", dtype="int8")
    chunks = list(random.respond(np.zeros(16000, np.float32), 16000, {"max_new_tokens": 16}))
    assert sum(c.audio.size for c in chunks) > 0


def test_the_layer_bench_times_every_precision_and_measures_each_packings_error(tmp_path):
    """``bench/quantized_layers.py``, as a script, on Mini-Omni's published layer shapes: a row per
    precision with its time, and the packed weights' error (int8 near 1%, int4 near NF4's 9%)."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "bench/quantized_layers.py", "--model", "mini-omni", "--batches", "1", "2",
                           "--repeats", "1", "--no-bitsandbytes", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = [json.loads(f.read_text()) for f in tmp_path.glob("*_quantized_layers_mini-omni_cpu.json")]
    assert [896, 1152] in result["layer_shapes"] and [4864, 896] in result["layer_shapes"]  # Qwen2-0.5B's
    rows = {row["precision"]: row for row in result["rows"]}
    assert list(rows) == ["float32", "bfloat16", "int8", "int4"]
    assert all(row["batch_1_ms"] > 0 and row["batch_2_ms"] > 0 for row in rows.values())
    assert 0.001 < rows["int8"]["weight_error"] < 0.02 and 0.05 < rows["int4"]["weight_error"] < 0.12


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_glm_answers_on_a_cpu(kind):
    """A whole spoken reply from the quantised tiny GLM-4-Voice on a CPU, its LLM computing in
    bfloat16. bitsandbytes' NF4, which int4 used on a CPU before, failed on the first reply here
    (its CPU path cannot take the tiny MLP's 96 inputs)."""
    import zoo

    model = zoo.load("glm-4-voice", random_weights="tiny", device="cpu", dtype=kind)
    layers = _decoder_linears(model.llm)
    assert layers and all(type(m).__name__ == ("Int8Linear" if kind == "int8" else "Int4Linear") for m in layers.values())
    assert model.llm.lm_head.weight.dtype == torch.bfloat16
    chunks = list(model.respond(np.zeros(16000, np.float32), 16000, {"max_new_tokens": 40}))
    assert chunks and sum(c.audio.size for c in chunks) > 0 and chunks[-1].turn is not None


def networks_of(model) -> list[nn.Module]:
    """The networks a model holds, those loaded on first use included (Hertz-dev: a dict of tuples)."""
    held = [v for value in vars(model).values() for v in (value.values() if isinstance(value, dict) else [value])]
    return [n for v in held for n in (v if isinstance(v, tuple) else (v,)) if isinstance(n, nn.Module)]


@pytest.mark.parametrize("name, kind", [(n, k) for n in zoo.names() for k in zoo.card(n).quantizations])
def test_every_quantisation_a_card_declares_loads_packed(name, kind):
    """The card's ``quantizations`` are what ``dtype`` takes beside the float dtypes: each loads
    (tiny, CPU), answers, and its networks' Linears are packed by the CPU kernel of that kind."""
    from zoo.core.quantize import CPU_KERNELS

    model = zoo.load(name, random_weights="tiny", device="cpu", dtype=kind)
    rate = model.card.input_sample_rate
    question = (0.1 * np.random.default_rng(0).standard_normal(rate)).astype(np.float32)
    chunks = list(model.respond(question, rate, options={"max_new_tokens": 3}))
    assert chunks and all(np.isfinite(c.audio).all() for c in chunks)
    assert any(isinstance(m, CPU_KERNELS[kind]) for network in networks_of(model) for m in network.modules())


@pytest.mark.parametrize("name", zoo.names())
def test_an_unknown_dtype_is_refused_naming_the_quantisations_and_the_help_lists_them(name):
    import argparse

    from zoo.cli import add_model_flags
    from zoo.core.errors import OptionsError

    declared = zoo.card(name).quantizations
    with pytest.raises(OptionsError, match="unknown dtype 'int2'") as refused:
        zoo.load(name, random_weights="tiny", device="cpu", dtype="int2")
    assert all(kind in str(refused.value) for kind in declared)
    parser = argparse.ArgumentParser()
    add_model_flags(parser, ["--model", name])
    helped = " ".join(parser.format_help().split())
    assert "float32, bfloat16" in helped and set(declared) <= set(re.findall(r"\w+", helped))


def test_each_full_precision_weight_is_freed_as_its_packed_copy_replaces_it(monkeypatch):
    """Packing a whole network at once holds one full-precision Linear at a time, not all of them
    (Hertz-dev's 6.6B blocks in bf16 beside their int8 copies did not fit a 24 GB host)."""
    import weakref

    from zoo.core import quantize

    net = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)) for _ in range(3)])
    originals = [weakref.ref(m) for m in net.modules() if isinstance(m, nn.Linear)]
    alive = []

    def packer(linear, compute_dtype):
        alive.append(sum(ref() is not None for ref in originals))
        return quantize.Int8Linear(linear, compute_dtype)

    monkeypatch.setitem(quantize.CPU_KERNELS, "int8", packer)
    quantize_linears(net, "int8", torch.float32, torch.device("cpu"))
    assert alive == [6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize("name", [n for n in zoo.names() if "int8" in zoo.card(n).quantizations])
def test_the_gpu_packer_runs_every_models_int8(name, monkeypatch):
    """What a GPU runs for int8, bitsandbytes' Linear8bitLt, here on its CPU backend: every model
    answers with it. Its layers subclass nn.Linear, which once made Moshi's loader pack them a
    second time (garbage: non-finite logits) and Mini-Omni fuse their int8 weights as floats."""
    import warnings

    from bitsandbytes.nn import Linear8bitLt

    from zoo.core import quantize

    monkeypatch.setitem(quantize.CPU_KERNELS, "int8",
                        lambda linear, compute_dtype: quantize.bitsandbytes_linear(linear, compute_dtype, "int8"))
    model = zoo.load(name, random_weights="tiny", device="cpu", dtype="int8")
    rate = model.card.input_sample_rate
    question = (0.1 * np.random.default_rng(0).standard_normal(rate)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes notes each bfloat16 input it casts to float16
        chunks = list(model.respond(question, rate, options={"max_new_tokens": 3}))
    assert chunks and all(np.isfinite(c.audio).all() for c in chunks)
    assert any(isinstance(m, Linear8bitLt) for network in networks_of(model) for m in network.modules())
