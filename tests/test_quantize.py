"""Weight-only int8/int4 (bitsandbytes) replaces every Linear and stays close to the original."""
import copy

import pytest
import torch
from torch import nn

from zoo.core.quantize import quantize_linears


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
