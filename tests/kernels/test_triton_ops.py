"""Triton KV store, RMSNorm, rotary and SwiGLU kernels against the PyTorch references.

Destinations are pre-filled with NaN so an element a kernel fails to write is caught. On CPU the
interpreter truncates float32 -> bfloat16 instead of rounding, hence the looser bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import reference, triton_ops
from tests.kernels.cases import TOLERANCE, example_budget, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
per_dtype = pytest.mark.parametrize("dtype", DTYPES)
SETTINGS = example_budget(cpu=8, cuda=5)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "kernel left elements unwritten (NaN)"
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


def randn(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).to(device)


@per_dtype
@SETTINGS
@given(
    num_kv_heads=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([64, 128]),
    block_size=st.sampled_from([16, 32]),
    num_tokens=st.integers(1, 40),
    slot_dtype=st.sampled_from([torch.int32, torch.int64]),
    seed=st.integers(0, 2**16),
)
def test_store_kv_matches_reference(
    device, num_kv_heads, head_dim, block_size, num_tokens, slot_dtype, dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = num_tokens // block_size + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    key = randn((num_tokens, num_kv_heads, head_dim), dtype, device, gen)
    value = randn((num_tokens, num_kv_heads, head_dim), dtype, device, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.2] = -1  # padding tokens
    slots = slots.to(slot_dtype).to(device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, k_ref, v_ref, slots)
    triton_ops.store_kv(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


def test_store_kv_from_strided_views(device):
    """Key/value usually arrive as column slices of a fused QKV projection."""
    qkv = torch.randn(6, (4 + 2 + 2) * 32, device=device)
    key = qkv[:, 128:192].view(6, 2, 32)
    value = qkv[:, 192:].view(6, 2, 32)
    k_cache = torch.full((2, 8, 2, 32), float("nan"), device=device)
    v_cache = torch.full((2, 8, 2, 32), float("nan"), device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([9, 0, 15, -1, 4, 3], device=device)
    reference.store_kv(key, value, k_ref, v_ref, slots)
    triton_ops.store_kv(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


@per_dtype
@SETTINGS
@given(
    leading=st.sampled_from([(1,), (5,), (2, 3)]),
    hidden=st.sampled_from([64, 96, 576, 2048]),
    with_residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_matches_reference(device, leading, hidden, with_residual, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn((*leading, hidden), dtype, device, gen)
    weight = randn((hidden,), dtype, device, gen)
    if not with_residual:
        out = nan_like(x)
        result = triton_ops.rms_norm(x, weight, 1e-5, out=out)
        assert result.data_ptr() == out.data_ptr()
        assert_close(out, reference.rms_norm(x, weight, 1e-5), dtype)
        return
    residual = randn((*leading, hidden), dtype, device, gen)
    out, new_residual = nan_like(x), nan_like(x)
    triton_ops.rms_norm(x, weight, 1e-5, residual, out=out, residual_out=new_residual)
    ref_out, ref_residual = reference.rms_norm(x, weight, 1e-5, residual)
    assert_close(out, ref_out, dtype)
    assert_close(new_residual, ref_residual, dtype)


@per_dtype
@SETTINGS
@given(
    num_tokens=st.integers(1, 12),
    num_kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3, 4, 8]),
    head_dim=st.sampled_from([64, 128]),
    seed=st.integers(0, 2**16),
)
def test_apply_rotary_matches_reference(
    device, num_tokens, num_kv_heads, group, head_dim, dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    cache = reference.build_rope_cache(head_dim, 4096, 500000.0, device=device)
    q = randn((num_tokens, group * num_kv_heads, head_dim), dtype, device, gen)
    k = randn((num_tokens, num_kv_heads, head_dim), dtype, device, gen)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = nan_like(q), nan_like(k)
    triton_ops.apply_rotary(q, k, positions, cache, q_out=q_out, k_out=k_out)
    q_ref, k_ref = reference.apply_rotary(q, k, positions, cache)
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)
    assert torch.equal(q, q_in) and torch.equal(k, k_in)


def test_apply_rotary_float32_is_exact_up_to_rounding(device):
    cache = reference.build_rope_cache(128, 2048, 10000.0, device=device)
    q, k = torch.randn(9, 6, 128, device=device), torch.randn(9, 2, 128, device=device)
    positions = torch.arange(0, 2048, 230, device=device)
    q_out, k_out = triton_ops.apply_rotary(q, k, positions, cache)
    q_ref, k_ref = reference.apply_rotary(q, k, positions, cache)
    torch.testing.assert_close(q_out, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-6, atol=1e-6)


@per_dtype
@SETTINGS
@given(
    leading=st.sampled_from([(1,), (7,), (2, 3)]),
    d=st.sampled_from([64, 100, 1536]),
    seed=st.integers(0, 2**16),
)
def test_silu_and_mul_matches_reference(device, leading, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn((*leading, 2 * d), dtype, device, gen)
    out = torch.full((*leading, d), float("nan"), dtype=dtype, device=device)
    triton_ops.silu_and_mul(x, out=out)
    assert_close(out, reference.silu_and_mul(x), dtype)


def test_row_warps_is_a_power_of_two():
    """Compiled Triton rejects other warp counts (the interpreter ignores them)."""
    for elements in range(1, 40000, 37):
        warps = triton_ops._row_warps(elements)
        assert 1 <= warps <= 16 and warps & (warps - 1) == 0
