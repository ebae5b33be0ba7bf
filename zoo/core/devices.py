"""Device and precision names from users (CLI flags, zoo.load arguments) -> torch objects,
with one clear error for anything unknown or unavailable."""
from __future__ import annotations

import torch

from .errors import OptionsError


def pick_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or CUDA when present; a clear error for one that is not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise OptionsError(f"unknown device {device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionsError("CUDA was requested but this torch build sees no GPU; use --device cpu")
    return device


def pick_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise OptionsError(f"unknown dtype {dtype!r}; one of {sorted(names)}")
    return names[dtype]


def to_device(host, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor, or host numbers (nested lists: ints become int64), on ``device`` without
    waiting for the device (pinned, asynchronous copy): a plain copy from pageable memory would
    stall the host until the queued kernels have run."""
    host = torch.as_tensor(host, dtype=dtype)
    if torch.device(device).type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
