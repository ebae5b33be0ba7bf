"""Weight-only quantisation of a network's Linear layers, so a large LLM fits a smaller GPU and a
small one decodes faster on a CPU: "int8" or "int4". On a GPU bitsandbytes packs them (int8:
LLM.int8 weights, no outlier split; int4: NF4 with double quantisation and bf16 compute, the recipe
GLM-4-Voice's own ``--dtype int4`` uses). On a CPU torch's own weight-only kernels run them
(``Int8Linear``, ``Int4Linear``: what torchao's and gpt-fast's weight-only modes run on a CPU), 2.5
and 3.5 times faster than bfloat16 on a GLM-4-Voice layer (``bench/quantized_layers.py``). They take
any shape and need no lazy work. bitsandbytes' CPU path is fast only in eval mode on a CPU with
AVX512-BF16, where its NF4 then beats ours by 1.3x, but only after it has repacked every weight on
its first product (0.7 s a GLM-4-Voice layer: 27 s inside the first reply), and it fails on input
sizes that are not whole 64-blocks or output sizes not a multiple of 32; its int8 is 2.8x slower
than ours for 4 sessions.
Embeddings stay in the compute dtype, and so does the output head when the caller keeps it
(``keep``), as transformers' bitsandbytes integration leaves it."""
from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from .devices import pick_dtype
from .errors import OptionsError

QUANTIZED = ("int8", "int4")


def split_dtype(dtype: torch.dtype | str | None, kinds: Collection[str], default: torch.dtype,
                quantized_compute: torch.dtype | None = None) -> tuple[torch.dtype, str | None]:
    """A model's ``dtype`` argument -> (compute dtype, quantisation or None): one of the
    quantisations the model offers (``kinds``), computed in ``quantized_compute`` (else
    ``default``), or a float dtype (``default`` when None). Anything else is one OptionsError that
    names both kinds of choice."""
    if isinstance(dtype, str) and dtype in kinds:
        return quantized_compute or default, dtype
    try:
        return pick_dtype(dtype, default=default), None
    except OptionsError as err:
        raise OptionsError(f"{err}; or a quantisation: {', '.join(kinds)}") from None


def device_precision(dtype: torch.dtype | str | None, device: torch.device) -> tuple[torch.dtype, str | None]:
    """A model's ``dtype`` argument on ``device`` -> (compute dtype, quantisation or None), with
    the default of the references' own runs: bfloat16 on CUDA, float32 elsewhere. Quantised
    weights compute in bfloat16 on every device: torch's CPU int8/int4 kernels are 2-30x slower
    with float32 activations than a plain float32 product."""
    return split_dtype(dtype, QUANTIZED, torch.bfloat16 if device.type == "cuda" else torch.float32,
                       quantized_compute=torch.bfloat16)


def quantize_linears(module: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device,
                     keep: Collection[nn.Module] = ()) -> nn.Module:
    """Replace every nn.Linear under ``module`` but those in ``keep`` (in place) and move the
    result to ``device``. bitsandbytes packs each weight as it moves, one tensor at a time: a
    module built on the host never has its full-precision weights on the device."""
    if kind not in QUANTIZED:
        raise ValueError(f"unknown quantisation {kind!r}; one of {QUANTIZED}")
    kept = {id(m) for m in keep}
    # hold the parents only: each full-precision weight is freed as soon as its packed copy
    # replaces it (a list of every module would keep them all until the end: twice the memory)
    parents = [m for m in module.modules() if any(is_plain_linear(c) for c in m.children())]
    for parent in parents:
        for name in [n for n, c in parent.named_children() if is_plain_linear(c) and id(c) not in kept]:
            linear = getattr(parent, name)
            setattr(parent, name, CPU_KERNELS[kind](linear, compute_dtype) if device.type == "cpu"
                    else bitsandbytes_linear(linear, compute_dtype, kind))
    return module.to(device)


def place(module: nn.Module, device: torch.device, compute_dtype: torch.dtype, quantized: str | None) -> nn.Module:
    """One part of a network loaded part by part, onto ``device``: its Linears packed on the way
    when ``quantized`` (``quantize_linears``), else moved as they are."""
    return quantize_linears(module, quantized, compute_dtype, device) if quantized else module.to(device)


def is_plain_linear(module: nn.Module) -> bool:
    """A full-precision nn.Linear. bitsandbytes' packed layers subclass nn.Linear, so an
    isinstance test would take them for one: packed again (a second pass over a network), or
    their int8 weights fused as if they were floats."""
    return type(module) is nn.Linear


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output channel (symmetric: the row's
    largest magnitude maps to 127), multiplied by ``torch._weight_int8pack_mm``, the CPU kernel
    behind torchao's and gpt-fast's int8 weight-only modes. A decode step of a few sessions reads
    every weight once and little else, so half the bytes of bfloat16 is about half the time
    (Qwen2-0.5B's layers at batch 2 on an AVX512 CPU: 41 ms against 65-91 ms in bfloat16). Run it
    with bfloat16 activations: with float32 ones the kernel is slower than a float32 product.
    The kernel reads input sizes in whole blocks of 16 (others give garbage or crash, torch
    2.13): other sizes (only tiny test networks have them) are padded with zero weights and zero
    inputs."""

    BLOCK = 16

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = nn.functional.pad(linear.weight.detach().float(), (0, -self.in_features % self.BLOCK))
        # bitsandbytes' int8_vectorwise_quant, to the rounding: a weight packed here from float16
        # values is the reference int8 files' row (Moshi's q8), which load back to it exactly
        largest = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        packed = torch.round(weight * (127.0 / largest[:, None])).clamp(-127, 127).to(torch.int8)
        self.weight = nn.Parameter(packed.contiguous(), requires_grad=False)
        self.scale = nn.Parameter((largest / 127).to(compute_dtype), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        padded = self.weight.shape[1]
        flat = nn.functional.pad(flat, (0, padded - self.in_features)) if padded > self.in_features else flat.contiguous()
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(flat.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """A Linear whose weight is 4-bit with a scale and a zero point per group of 64 input channels
    (asymmetric: a group's smallest and largest weights span the 16 levels), multiplied by
    ``torch._weight_int4pack_mm_for_cpu``. Groups of 64 are NF4's block size, and on normally
    distributed weights the error is NF4's (9.0% of the weights' norm against NF4's 9.2%); the
    product reads a quarter of bfloat16's bytes (a GLM-4-Voice layer at batch 1 on a 2-core AVX512
    CPU: 5.7 ms against 20 ms in bfloat16).
    The kernel takes output sizes in multiples of 16 and input sizes in whole groups: other
    shapes (only tiny test networks have them) are padded with zero weights and zero inputs.
    Run it with bfloat16 activations: with float32 ones the kernel is 30x slower than with them."""

    GROUP = 64

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group = self.GROUP if self.in_features % self.GROUP == 0 else 32
        weight = linear.weight.detach().float()
        rows, columns = -self.out_features % 16, -self.in_features % self.group
        weight = nn.functional.pad(weight, (0, columns, 0, rows))
        groups = weight.view(weight.shape[0], -1, self.group)
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        levels = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        # the kernel's weight is (level - 8) * scale + zero, so zero is the weight of level 8
        zero = low + 8 * scale
        packed = torch._convert_weight_to_int4pack_for_cpu(levels.view(weight.shape), 8)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.scale_and_zero = nn.Parameter(torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()
                                           .to(compute_dtype), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        padded = self.weight.shape[1] * 2
        flat = nn.functional.pad(flat, (0, padded - self.in_features)) if padded > self.in_features else flat.contiguous()
        out = torch._weight_int4pack_mm_for_cpu(flat, self.weight, self.group, self.scale_and_zero.to(flat.dtype))
        out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


CPU_KERNELS = {"int8": Int8Linear, "int4": Int4Linear}


def bitsandbytes_linear(linear: nn.Linear, compute_dtype: torch.dtype, kind: str) -> nn.Module:
    """``linear`` packed by bitsandbytes (what a GPU runs; ``kind``: int8 or int4)."""
    import bitsandbytes as bnb

    # int8 packs from float16 (Int8Params does): a float32 weight read back from an int8 file's
    # rows reaches it unrounded, and comes back to the same rows and scales
    weight = linear.weight.data.to(torch.float16 if kind == "int8" else compute_dtype)
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
