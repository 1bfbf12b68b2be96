"""CpuLinear: both of its paths compute the same layer, quantization stays close to the
original weights, and the model swap keeps tied embeddings exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.linear import QUANT_MAX_ROWS, CpuLinear, use_cpu_linears


def _weights(n=96, k=64, bias=True):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen) if bias else None
    return w, b


def _dense(layer: CpuLinear, x: torch.Tensor) -> torch.Tensor:
    """What the layer computes in float32 with the weights it actually holds."""
    out = x @ layer.weight_t
    return out if layer.bias is None else out + layer.bias


@pytest.mark.parametrize("rows", [1, 12, 13, 70])
def test_none_is_the_plain_linear(rows):
    w, b = _weights()
    x = torch.randn(rows, 64)
    torch.testing.assert_close(CpuLinear(w, b)(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_paths_agree_across_the_row_threshold(quantization):
    w, b = _weights()
    layer = CpuLinear(w, b, quantization)
    assert layer.quantization == quantization
    limit = QUANT_MAX_ROWS[quantization]
    x = torch.randn(limit + 1, 64)
    large = layer(x)  # float32 GEMM on the rounded weights
    small = layer(x[:limit])  # the quantized kernel on the same weights
    torch.testing.assert_close(large, _dense(layer, x), atol=1e-5, rtol=1e-5)
    # The quantized kernels round activations to bfloat16: agreement to that precision.
    torch.testing.assert_close(small, large[:limit], atol=2e-2, rtol=2e-2)
    # ...and the rounded weights stay close to the originals.
    exact = F.linear(x, w, b)
    tol = {"int8": 0.01, "int4": 0.1}[quantization]
    assert float((large - exact).norm() / (exact - b).norm()) < tol


def test_int4_falls_back_to_int8_for_shapes_its_layout_cannot_hold():
    w, b = _weights(n=40, k=64)  # 40 outputs: not a multiple of 16
    layer = CpuLinear(w, b, "int4")
    assert layer.quantization == "int8"
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), atol=3e-2, rtol=3e-2)


def test_unknown_quantization_is_rejected():
    with pytest.raises(ValueError, match="quantization"):
        CpuLinear(*_weights(), quantization="int3")


def test_swap_replaces_every_linear_and_keeps_tied_embeddings_exact():
    emb = nn.Embedding(32, 16)
    nn.init.normal_(emb.weight, std=0.05)
    model = nn.ModuleDict(
        {"embed": emb, "proj": nn.Linear(32, 16), "lm_head": nn.Linear(16, 32, bias=False)}
    )
    model["lm_head"].weight = emb.weight  # tied
    before = emb.weight.detach().clone()
    use_cpu_linears(model, "int4")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model["proj"].quantization == "int4"
    assert model["lm_head"].quantization == "int8"  # the head never goes below int8
    assert torch.equal(model["embed"].weight, before)
    x = torch.randn(3, 16)
    torch.testing.assert_close(model["lm_head"](x), F.linear(x, before), atol=2e-2, rtol=2e-2)
