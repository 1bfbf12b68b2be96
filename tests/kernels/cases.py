"""Builders for paged-attention test inputs and a float64 ground truth.

Caches are filled with random values everywhere (unused blocks included) and sequences get
blocks in shuffled, non-contiguous order, with garbage in the unused tail of each block-table row,
so a kernel that reads the wrong block or past a context shows up as a wrong answer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kernels import reference

ON_CPU = os.environ.get("TOKENMILL_TEST_DEVICE", "cpu") == "cpu"
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def example_budget(cpu: int, cuda: int) -> settings:
    """Hypothesis settings: on CUDA nearly every example is a new kernel specialisation to
    compile, so fewer examples buy the same coverage time; on CPU the interpreter is the cost."""
    return settings(
        max_examples=cpu if ON_CPU else cuda,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@dataclass
class PagedBatch:
    """A ragged batch whose K/V already sit in a paged cache."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    q: torch.Tensor
    scale: float

    def decode_args(self) -> tuple:
        """Positional arguments of every ``paged_decode_attention``."""
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens, self.scale

    def prefill_args(self) -> tuple:
        """Positional arguments of every ``paged_prefill_attention``."""
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.query_start_loc,
            self.context_lens,
            self.scale,
        )


def make_paged_batch(
    context_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    extra_table_width: int = 0,
) -> PagedBatch:
    """Random cache + queries; query ``j`` of sequence ``i`` is one of its last tokens."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    width = max(blocks_per_seq) + extra_table_width
    order = torch.randperm(num_blocks, generator=gen)
    # Padding entries: any value, including ones that would be out of range if dereferenced.
    table = torch.randint(-num_blocks, 2 * num_blocks, (len(context_lens), width), generator=gen)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = order[used : used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn((sum(query_lens), num_heads, head_dim), generator=gen).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return PagedBatch(
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=table.to(torch.int32).to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        q=q.to(device),
        scale=head_dim**-0.5,
    )


def naive_attention(batch: PagedBatch) -> torch.Tensor:
    """Token-by-token float64 causal attention, reading the cache one slot at a time."""
    q = batch.q.double().cpu()
    k_cache, v_cache = batch.k_cache.double().cpu(), batch.v_cache.double().cpu()
    table = batch.block_tables.cpu()
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    starts = batch.query_start_loc.tolist()
    for i, ctx in enumerate(batch.context_lens.tolist()):
        q_len = starts[i + 1] - starts[i]
        blocks = [int(table[i, t // block_size]) for t in range(ctx)]
        keys = torch.stack([k_cache[b, t % block_size] for t, b in enumerate(blocks)])
        values = torch.stack([v_cache[b, t % block_size] for t, b in enumerate(blocks)])
        for j in range(q_len):
            visible = ctx - q_len + j + 1
            for h in range(q.shape[1]):
                kv = h // group
                scores = keys[:visible, kv] @ q[starts[i] + j, h] * batch.scale
                out[starts[i] + j, h] = torch.softmax(scores, 0) @ values[:visible, kv]
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


def reference_decode(batch: PagedBatch) -> torch.Tensor:
    return reference.paged_decode_attention(*batch.decode_args())


def reference_prefill(batch: PagedBatch) -> torch.Tensor:
    return reference.paged_prefill_attention(*batch.prefill_args())


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "kernel left elements unwritten (NaN) or produced inf"
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@st.composite
def paged_shapes(draw, decode: bool):
    block_size = draw(st.sampled_from([16, 32]))
    num_seqs = draw(st.integers(1, 4))
    context_lens = draw(
        st.lists(st.integers(1, 4 * block_size + 7), min_size=num_seqs, max_size=num_seqs)
    )
    if decode:
        query_lens = [1] * num_seqs
    else:
        query_lens = [
            draw(st.one_of(st.just(1), st.just(n), st.integers(1, n))) for n in context_lens
        ]
    return dict(
        context_lens=context_lens,
        query_lens=query_lens,
        num_kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 3, 4, 6, 8])),
        head_dim=draw(st.sampled_from([64, 128])),
        block_size=block_size,
        extra_table_width=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


def build(device, dtype, shape: dict) -> PagedBatch:
    shape = dict(shape)
    group = shape.pop("group")
    return make_paged_batch(
        num_heads=group * shape["num_kv_heads"], dtype=dtype, device=device, **shape
    )
