"""The ATen-based CPU kernels against the reference (decode attention here; the int8 matmul
in test_quantized_linear.py). Cache blocks nobody owns and table padding hold random values, and
one case poisons every slot past each context with NaN: the kernel must never read them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from kernels import cpu_ops
from tests.kernels.cases import (
    assert_close,
    build,
    example_budget,
    make_paged_batch,
    paged_shapes,
    reference_decode,
)


def run_decode(batch) -> torch.Tensor:
    return cpu_ops.paged_decode_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, batch.scale
    )


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
