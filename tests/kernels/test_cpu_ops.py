"""The ATen-based CPU kernels against the reference (the quantized matmuls are in
test_quantized_linear.py). For decode attention, cache blocks nobody owns and table padding
hold random values, and one case poisons every slot past each context with NaN: the kernel
must never read them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import cpu_ops, reference
from tests.kernels.cases import (
    assert_close,
    build,
    example_budget,
    make_paged_batch,
    naive_attention,
    paged_shapes,
    reference_decode,
    reference_prefill,
    relative_error,
)


def run_decode(batch) -> torch.Tensor:
    return cpu_ops.paged_decode_attention(*batch.decode_args())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@example_budget(cpu=40, cuda=40)
@given(shape=paged_shapes(decode=True))
def test_decode_matches_reference(dtype, shape):
    batch = build("cpu", dtype, shape)
    assert_close(run_decode(batch), reference_decode(batch), dtype)


def test_decode_never_reads_past_a_context():
    batch = make_paged_batch([5, 16, 40, 1], [1, 1, 1, 1], 6, 2, 64, 16, torch.float32, "cpu")
    expected = reference_decode(batch)
    for i, n in enumerate(batch.context_lens.tolist()):
        for p in range(n, batch.block_tables.shape[1] * 16):
            block = int(batch.block_tables[i, p // 16])
            if 0 <= block < batch.k_cache.shape[0] and p // 16 < -(-n // 16):
                batch.k_cache[block, p % 16] = float("nan")
                batch.v_cache[block, p % 16] = float("nan")
    assert_close(run_decode(batch), expected, torch.float32)


def test_decode_slots_are_reused_only_for_the_same_step():
    """Every layer of a step passes the same metadata tensors; a new step passes new ones
    (possibly with equal values) and must not see the previous step's slots."""
    batch = make_paged_batch([20, 9], [1, 1], 4, 2, 64, 16, torch.float32, "cpu")
    first = run_decode(batch)
    assert torch.equal(run_decode(batch), first)
    batch.context_lens = batch.context_lens.clone()
    batch.context_lens[0] = 3
    assert_close(run_decode(batch), reference_decode(batch), torch.float32)


def test_empty_context_gives_zeros_like_the_reference():
    batch = make_paged_batch([4, 1], [1, 1], 4, 2, 64, 16, torch.float32, "cpu")
    batch.context_lens[1] = 0
    out = run_decode(batch)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, reference_decode(batch), torch.float32)


@example_budget(cpu=30, cuda=30)
@given(
    n=st.integers(1, 9),
    heads=st.sampled_from([(4, 2), (3, 1), (2, 2)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_rotary_equals_the_reference_bit_for_bit(n, heads, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = reference.build_rope_cache(32, 64, 10000.0)
    q = torch.randn(n, heads[0], 32, generator=gen).to(dtype)
    k = torch.randn(n, heads[1], 32, generator=gen).to(dtype)
    positions = torch.randint(0, 64, (n,), generator=gen)
    for got, want in zip(
        cpu_ops.apply_rotary(q, k, positions, cache),
        reference.apply_rotary(q, k, positions, cache),
        strict=True,
    ):
        assert torch.equal(got, want)


def test_rotary_recomputes_for_a_new_step():
    cache = reference.build_rope_cache(16, 32, 10000.0)
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    cpu_ops.apply_rotary(q, k, torch.tensor([0, 1]), cache)
    later = torch.tensor([5, 9])
    got = cpu_ops.apply_rotary(q, k, later, cache)
    assert torch.equal(got[0], reference.apply_rotary(q, k, later, cache)[0])


@example_budget(cpu=30, cuda=30)
@given(n=st.integers(1, 6), width=st.sampled_from([8, 64]), seed=st.integers(0, 2**16))
def test_rms_norm_equals_the_reference(n, width, seed):
    gen = torch.Generator().manual_seed(seed)
    x, residual = torch.randn(n, width, generator=gen), torch.randn(n, width, generator=gen)
    weight = torch.rand(width, generator=gen)
    torch.testing.assert_close(
        cpu_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), atol=1e-6, rtol=0
    )
    got, got_sum = cpu_ops.rms_norm(x, weight, 1e-6, residual)
    want, want_sum = reference.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got_sum, want_sum)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_the_reference_and_skips_negative_slots(cache_dtype):
    key, value = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    for slots in (torch.tensor([3, 17, 0, 9]), torch.tensor([5, -1, 30, -1])):
        caches = [torch.zeros(4, 8, 2, 8, dtype=cache_dtype) for _ in range(4)]
        cpu_ops.store_kv(key, value, caches[0], caches[1], slots)
        reference.store_kv(key, value, caches[2], caches[3], slots)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def run_prefill(batch) -> torch.Tensor:
    return cpu_ops.paged_prefill_attention(*batch.prefill_args())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@example_budget(cpu=40, cuda=40)
@given(shape=paged_shapes(decode=False))
def test_prefill_matches_reference(dtype, shape):
    batch = build("cpu", dtype, shape)
    assert_close(run_prefill(batch), reference_prefill(batch), dtype)


def test_prefill_mixes_fresh_prompts_chunks_and_decode_rows():
    batch = make_paged_batch(
        [20, 45, 33, 9, 1], [20, 13, 1, 4, 1], 6, 2, 64, 16, torch.float32, "cpu"
    )
    assert_close(run_prefill(batch), reference_prefill(batch), torch.float32)
    assert relative_error(run_prefill(batch), naive_attention(batch)) < 1e-5
