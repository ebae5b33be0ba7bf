"""Weight-only quantisation of a network's Linear layers with bitsandbytes, so a large LLM fits a
smaller GPU: "int8" (LLM.int8 weights, no outlier split) or "int4" (NF4 with double quantisation
and bf16 compute: the recipe GLM-4-Voice's own ``--dtype int4`` uses). Embeddings stay in the
compute dtype, and so does the output head when the caller keeps it (``keep``), as transformers'
bitsandbytes integration leaves it."""
from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

QUANTIZED = ("int8", "int4")


def quantize_linears(module: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device,
                     keep: Collection[nn.Module] = ()) -> nn.Module:
    """Replace every nn.Linear under ``module`` but those in ``keep`` (in place) and move the
    result to ``device``. bitsandbytes packs each weight as it moves, one tensor at a time: a
    module built on the host never has its full-precision weights on the device."""
    if kind not in QUANTIZED:
        raise ValueError(f"unknown quantisation {kind!r}; one of {QUANTIZED}")
    import bitsandbytes as bnb

    kept = {id(m) for m in keep}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in kept:
                setattr(parent, name, _quantized(child, kind, compute_dtype, bnb))
    return module.to(device)


def _quantized(linear: nn.Linear, kind: str, compute_dtype: torch.dtype, bnb) -> nn.Module:
    weight = linear.weight.data.to(compute_dtype)
    bias = linear.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                    has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer
