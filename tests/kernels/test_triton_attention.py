"""Triton paged attention against the PyTorch reference.

Outputs are pre-filled with NaN so that any element a kernel forgets to write fails the check.
On CPU these run under Triton's interpreter (see conftest.py), so shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import triton_attention
from tests.kernels.cases import (
    PagedBatch,
    assert_close,
    build,
    example_budget,
    make_paged_batch,
    paged_shapes,
    reference_decode,
    reference_prefill,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_decode(batch: PagedBatch, num_splits: int | None) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    result = triton_attention.paged_decode_attention(
        *batch.decode_args(), out=out, num_splits=num_splits
    )
    assert result is out
    return out


def run_prefill(batch: PagedBatch) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    triton_attention.paged_prefill_attention(*batch.prefill_args(), out=out)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@example_budget(cpu=15, cuda=8)
@given(shape=paged_shapes(decode=True), num_splits=st.sampled_from([1, 2, 3, None]))
def test_decode_matches_reference(device, dtype, shape, num_splits):
    batch = build(device, dtype, shape)
    assert_close(run_decode(batch, num_splits), reference_decode(batch), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@example_budget(cpu=15, cuda=8)
@given(shape=paged_shapes(decode=False))
def test_prefill_matches_reference(device, dtype, shape):
    batch = build(device, dtype, shape)
    assert_close(run_prefill(batch), reference_prefill(batch), dtype)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32)])
def test_every_gqa_ratio_and_head_dim(device, group, head_dim, block_size):
    """Deterministic coverage of the configurations the engine ships, split-K on and off."""
    context_lens = [1, block_size, 3 * block_size + 5]
    batch = make_paged_batch(
        context_lens, [1, 1, 1], 2 * group, 2, head_dim, block_size, torch.float32, device
    )
    ref = reference_decode(batch)
    for num_splits in (1, 4):
        assert_close(run_decode(batch, num_splits), ref, torch.float32)
    batch = make_paged_batch(
        context_lens,
        [1, 7, 2 * block_size],
        2 * group,
        2,
        head_dim,
        block_size,
        torch.float32,
        device,
    )
    assert_close(run_prefill(batch), reference_prefill(batch), torch.float32)


@pytest.mark.parametrize("head_dim", [16, 80])
def test_head_dims_that_need_masking_or_tiny_tiles(device, head_dim):
    batch = make_paged_batch([5, 40], [1, 1], 4, 2, head_dim, 16, torch.float32, device)
    assert_close(run_decode(batch, 2), reference_decode(batch), torch.float32)
    batch = make_paged_batch([5, 40], [5, 17], 4, 2, head_dim, 16, torch.float32, device)
    assert_close(run_prefill(batch), reference_prefill(batch), torch.float32)


def test_decode_long_context_default_splits(device):
    """A context much longer than the tiles, with the kernel choosing its own split count."""
    batch = make_paged_batch([700, 3], [1, 1], 8, 2, 64, 16, torch.float32, device)
    assert_close(run_decode(batch, None), reference_decode(batch), torch.float32)


def test_prefill_many_short_sequences(device):
    """More sequences than tiles' worth of tokens: exercises the sequence search and the
    surplus programs that must exit without writing."""
    context_lens = [1, 2, 1, 9, 4, 1, 1, 30]
    batch = make_paged_batch(
        context_lens, [1, 2, 1, 3, 4, 1, 1, 30], 4, 1, 64, 16, torch.float32, device
    )
    assert_close(run_prefill(batch), reference_prefill(batch), torch.float32)
