"""CpuLinear: both of its paths compute the same layer, quantization stays close to the
original weights, and the model swap keeps tied embeddings exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import kernels.native
from engine.linear import WEIGHT_ONLY_MAX_ROWS, CpuLinear, use_cpu_linears
from kernels import reference


def _weights(n=96, k=64, bias=True):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen) if bias else None
    return w, b


def _held_weight(layer: CpuLinear) -> torch.Tensor:
    """The float32 weight the layer actually computes with, after its rounding."""
    if layer.quantization == "w8a8":
        return reference.dequantize_int8(*layer.quantized)
    return layer.weight_t.t()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


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
    limit = WEIGHT_ONLY_MAX_ROWS[quantization]
    x = torch.randn(limit + 1, 64)
    held = F.linear(x, _held_weight(layer), b)
    large = layer(x)  # int8 x int8 GEMM (w8a8) or float32 GEMM
    small = layer(x[:limit])  # the weight-only kernel on bfloat16 activations
    # Both paths use the same rounded weights and differ only in how activations are
    # rounded (int8 per row, or bfloat16).
    assert _rel(large, held) < 1e-2
    assert _rel(small, held[:limit]) < 1e-2
    # ...and the rounded weights stay close to the originals.
    exact = F.linear(x, w, b)
    assert _rel(held - b, exact - b) < {"int8": 0.01, "int4": 0.1}[quantization]


def test_w8a8_is_the_dynamic_int8_kernel_and_batch_invariant():
    layer = CpuLinear(_weights()[0], None, "w8a8")
    assert layer.weight_t is None  # no float copy
    x = torch.randn(30, 64)
    out = layer(x)
    limit = kernels.native.int8_activation_limit(kernels.native.target())
    torch.testing.assert_close(out, reference.int8_dynamic_linear(x, *layer.quantized, limit))
    for rows in (1, 3, 17):  # a row's result does not depend on its batch-mates
        assert torch.equal(layer(x[:rows]), out[:rows])


@pytest.fixture
def restore_kernel_target():
    yield
    kernels.native.load()  # the process's own target again (after monkeypatch's undo)


@pytest.mark.parametrize("isa", kernels.native.runnable_isas())
def test_packed_weights_keep_every_output_bit_for_bit(isa, restore_kernel_target, monkeypatch):
    monkeypatch.setenv(kernels.native.ISA_ENV, isa)  # the target w8a8 rounds weights for
    kernels.native.load(isa)
    layer = CpuLinear(*_weights(), "w8a8")
    # each row's largest weight takes the target's largest code: 64 on AVX2, 127 elsewhere
    codes = layer.quantized[0].abs().amax(dim=1)
    assert torch.equal(codes, torch.full_like(codes, kernels.native.int8_weight_range(isa)[1]))
    x = torch.randn(21, 64)
    before = layer(x)
    packed = layer.pack_int8()
    assert packed[0].shape == (96 // 16, 64 // 4, 16, 4)
    assert torch.equal(layer(x, packed), before)
    assert torch.equal(layer(x), before)  # the layer itself keeps its own GEMM


def test_only_w8a8_layers_of_whole_blocks_pack():
    assert CpuLinear(*_weights(), "int8").pack_int8() is None
    assert CpuLinear(*_weights(), "none").pack_int8() is None
    assert CpuLinear(*_weights(n=40), "w8a8").pack_int8() is None  # not whole 16-column blocks


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


def test_smoothing_keeps_the_product_and_tames_outlier_channels():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(96, 64, generator=gen) * 0.05
    x = torch.randn(20, 64, generator=gen)
    x[:, 5] *= 80.0  # an outlier channel, as LLM hidden states have
    exact = F.linear(x, w)
    plain = CpuLinear(w, None, "w8a8")
    smoothed = CpuLinear(w, None, "w8a8", input_absmax=x.abs().amax(dim=0))
    assert smoothed.input_scale is not None
    # Both round weights and activations; smoothing moves channel 5's range into the weights.
    assert _rel(smoothed(x), exact) < 0.5 * _rel(plain(x), exact)
    assert _rel(smoothed(x), exact) < 0.02
    assert torch.equal(smoothed(x[:2]), smoothed(x)[:2])
