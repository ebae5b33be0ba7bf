"""GLM-4-Voice-9B's language model: the published ChatGLM-named safetensors shards loaded unchanged
into transformers' ``GlmForCausalLM`` through an explicit key map (the one transformers' own GLM
converter uses; see ``chatglm_to_hf``)."""
from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.devices import pick_device
from ..core.errors import WeightsNotFound
from ..core.quantize import place

INDEX_FILE = "model.safetensors.index.json"
OPTIONAL_KEYS = {"transformer.rotary_pos_emb.inv_freq"}  # a buffer the forward pass recomputes

_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_LAYER_PART = re.compile(r"model\.layers\.\d+")
_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate | up] in both
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}


def glm_config(raw: dict):
    """The published ChatGLM config.json -> transformers' GlmConfig."""
    from transformers import GlmConfig

    unsupported = {"add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
                   "apply_residual_connection_post_layernorm": False, "multi_query_attention": True}
    for key, wanted in unsupported.items():
        if key in raw and raw[key] != wanted:
            raise WeightsNotFound(f"glm-4-voice config: {key}={raw[key]!r} is not supported (expected {wanted!r})")
    heads = raw["num_attention_heads"]
    return GlmConfig(
        vocab_size=raw["padded_vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["ffn_hidden_size"],
        num_hidden_layers=raw["num_layers"], num_attention_heads=heads, num_key_value_heads=raw["multi_query_group_num"],
        head_dim=raw.get("kv_channels", raw["hidden_size"] // heads), attention_bias=raw.get("add_qkv_bias", True),
        rms_norm_eps=raw["layernorm_epsilon"], max_position_embeddings=raw.get("seq_length", 8192),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * raw.get("rope_ratio", 1),
                         "partial_rotary_factor": 0.5},  # ChatGLM rotates half of each head
        tie_word_embeddings=False, pad_token_id=raw.get("pad_token_id", 151329), eos_token_id=raw.get("eos_token_id"),
    )


def chatglm_to_hf(name: str, tensor: torch.Tensor, config) -> list[tuple[str, torch.Tensor]]:
    """One published tensor -> the GlmForCausalLM tensor(s) it becomes. The fused
    query_key_value rows are [q (heads*hd) | k (kv*hd) | v (kv*hd)]."""
    if name in _RENAMES:
        return [(_RENAMES[name], tensor)]
    match = _LAYER.fullmatch(name)
    if match is None:
        raise KeyError(name)
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_RENAMES:
        return [(prefix + _LAYER_RENAMES[rest], tensor)]
    if rest.startswith("self_attention.query_key_value."):
        kind = rest.rsplit(".", 1)[1]
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        q_part, k_part, v_part = tensor.split([q, kv, kv], dim=0)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q_part, k_part, v_part))]
    raise KeyError(name)


def published_state(model) -> dict[str, torch.Tensor]:
    """A GlmForCausalLM's tensors under the published ChatGLM names (``chatglm_to_hf`` inverted:
    q, k and v joined into query_key_value), with the rotary inv_freq buffer the published files may
    hold, in the weights' dtype: what the reference's remote code loads. Tensors are shared, except
    the joined ones."""
    inverse = {v: k for k, v in _RENAMES.items()}
    layer_inverse = {v: k for k, v in _LAYER_RENAMES.items()}
    tensors = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key in inverse:
            state[inverse[key]] = tensor
            continue
        layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key).groups()
        base = f"transformer.encoder.layers.{layer}."
        if rest in layer_inverse:
            state[base + layer_inverse[rest]] = tensor
        elif rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            parts = [tensors[f"model.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            state[base + f"self_attention.query_key_value.{kind}"] = torch.cat(parts)
    # the published buffer is in the weights' dtype, and the remote code computes its rotary table in that dtype
    state["transformer.rotary_pos_emb.inv_freq"] = model.model.rotary_emb.inv_freq.to(model.model.embed_tokens.weight.dtype)
    return state


def published_names(config) -> dict[str, list[int]]:
    """The tensor names and shapes the published shards hold for ``config`` (without the optional
    inv_freq buffer), in GlmForCausalLM's parameter order: ``published_state`` of a model on the
    meta device."""
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        model = GlmForCausalLM(config)
    return {name: list(tensor.shape) for name, tensor in published_state(model).items() if name not in OPTIONAL_KEYS}


def load_llm(folder: Path, dtype=torch.bfloat16, device=None, quantized: str | None = None):
    """Load the sharded ChatGLM safetensors into GlmForCausalLM, strictly: a missing or unexpected
    tensor is an error naming it. The network is read part by part (embedding, each decoder layer,
    final norm, output layer), each part placed on ``device`` before the next is read: beyond the
    network being built, the host holds one part (the largest: the embedding or the output layer,
    1.4 GB in bf16), never the whole 19 GB.
    ``quantized`` ("int8", "int4"): each decoder layer's Linears are packed (zoo.core.quantize) as
    the layer is placed, the output layer kept in ``dtype`` as transformers' integration keeps it
    for the reference's ``--dtype int4``: no machine ever holds the full-precision network."""
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    config = glm_config(json.loads((folder / "config.json").read_text()))
    index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    expected = published_names(config)
    missing = sorted(set(expected) - set(index))
    unexpected = sorted(set(index) - set(expected) - OPTIONAL_KEYS)
    if missing or unexpected:
        raise WeightsNotFound(f"{folder}: tensors missing {missing[:5]} / unexpected {unexpected[:5]} "
                              f"(expected the published glm-4-voice-9b layout)")
    device = torch.device("cpu") if device is None else pick_device(device)  # None: the host, where it is read
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    parts: dict[str, list[str]] = {}  # in parameter order: the order published_names lists them
    for name in expected:
        parts.setdefault(_part_of(name), []).append(name)
    with ExitStack() as stack:
        shards = {shard: stack.enter_context(safe_open(str(folder / shard), framework="pt"))
                  for shard in sorted(set(index.values()))}
        for prefix, names in parts.items():
            state = {}
            for name in names:
                tensor = shards[index[name]].get_tensor(name)
                if list(tensor.shape) != expected[name]:
                    raise WeightsNotFound(f"{folder}/{index[name]}: {name} has shape {list(tensor.shape)}, "
                                          f"expected {expected[name]}")
                state.update((key.removeprefix(prefix + "."), value)
                             for key, value in chatglm_to_hf(name, tensor.to(dtype), config))
            part = model.get_submodule(prefix)
            part.load_state_dict(state, strict=True, assign=True)
            place(part, device, dtype, quantized if _LAYER_PART.fullmatch(prefix) else None)
    # built on the meta device: the rotary tables (non-persistent buffers) are computed again here
    model.model.rotary_emb = GlmRotaryEmbedding(config).to(device)
    return model.eval()


def _part_of(name: str) -> str:
    """The GlmForCausalLM submodule a published tensor loads into (``model.layers.3``, ``lm_head``)."""
    match = _LAYER.fullmatch(name)
    return f"model.layers.{match.group(1)}" if match else _RENAMES[name].rsplit(".", 1)[0]
