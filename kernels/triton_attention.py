"""Paged attention in Triton: a split-K decode kernel and a causal prefill kernel.

Both kernels read K/V through the block table one token row at a time (``page * stride_block +
offset * stride_token``), keep the softmax online in float32 (base-2 exponentials with the scale
folded in), and fold the GQA group into the row dimension of each tile: the query heads that share
a kv head are processed by one program, so every K/V row fetched from memory serves the whole
group. Signatures match :mod:`kernels.reference`, plus an optional ``out=`` buffer and tuning
overrides used by the tests and benchmarks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ``triton.jit`` picks compiled or interpreted execution when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of one attention kernel (``block_m`` is used by prefill only; decode
    tiles hold the GQA group's query heads)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Measured on an H200 with bf16 K/V and block size 16 (benchmarks/bench_kernels.py --sweep):
# decode streams ~16 KB of K+V per loop iteration whatever the head size; prefill uses 128x128
# tiles. float32 inputs take half-size tiles so the pipelined K/V buffers fit in shared memory.
# The interpreter gets small tiles because every program runs in Python on tiny test shapes.
_INTERPRET_DECODE = TileConfig(16, 32, 1, 1)
_INTERPRET_PREFILL = TileConfig(32, 32, 1, 1)
# Decode splits a context only when each split keeps at least this many tokens.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 64


def decode_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Default decode tiles: ~16 KB of K+V per iteration (64 tokens at head_dim 128)."""
    if INTERPRETED:
        return _INTERPRET_DECODE
    block_n = max(16, min(128, 8192 // triton.next_power_of_2(head_dim)))
    if dtype == torch.float32:
        return TileConfig(16, max(16, block_n // 2), 4, 2)
    return TileConfig(16, block_n, 4, 3)


def prefill_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Default prefill tiles; wide head dims get narrower KV tiles to stay within registers."""
    if INTERPRETED:
        return _INTERPRET_PREFILL
    if dtype == torch.float32:
        return TileConfig(64, 32, 4, 2)
    if head_dim <= 64:
        return TileConfig(128, 64, 4, 3)
    return TileConfig(128, 128 if head_dim <= 128 else 32, 8, 3 if head_dim <= 128 else 2)


def _dot_precision(dtype: torch.dtype) -> str:
    """How ``_dot`` multiplies tiles of this dtype.

    fp32 inputs must not silently drop to tf32 (10-bit mantissa). The CPU interpreter mishandles
    bf16 ``tl.dot`` operands, so there they are widened to fp32 first ("upcast").
    """
    if dtype == torch.float32:
        return "ieee"
    if INTERPRETED and dtype == torch.bfloat16:
        return "upcast"
    return "tf32"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _load_rows(
    ptrs,
    row_ok,
    dims,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
):
    """Load a [rows, BLOCK_D] tile, masking only what can actually be out of range, so the
    common case (power-of-two head_dim, interior KV tile) is an unmasked vectorised load."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D == HEAD_DIM:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _attend_kv_tile(
    q,
    m_i,
    l_i,
    acc,
    kv_pos,
    kv_ok,
    q_pos,
    table,
    k_cache_ptr,
    v_cache_ptr,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    k_head_offset,
    v_head_offset,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Fold the KV positions ``kv_pos`` (of one sequence) into a query tile's online softmax.

    ``kv_ok`` marks positions that exist (checked only with ``CHECK_ROWS``); with ``CAUSAL``
    position ``j`` is visible to row ``r`` only if ``j <= q_pos[r]``. Scores are base-2 logits.
    """
    dims = tl.arange(0, BLOCK_D)
    if CHECK_ROWS:
        page = tl.load(table + kv_pos // BLOCK_SIZE, mask=kv_ok, other=0)
    else:
        page = tl.load(table + kv_pos // BLOCK_SIZE)
    page = page.to(tl.int64)
    offset = kv_pos % BLOCK_SIZE
    k_ptrs = (
        k_cache_ptr
        + page[:, None] * stride_kb
        + offset[:, None] * stride_kt
        + k_head_offset
        + dims[None, :]
    )
    k = _load_rows(k_ptrs, kv_ok, dims, HEAD_DIM, BLOCK_D, CHECK_ROWS)
    s = _dot(q, tl.trans(k), DOT_PRECISION) * scale_log2
    if CAUSAL:
        s = tl.where(kv_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    elif CHECK_ROWS:
        s = tl.where(kv_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_ptrs = (
        v_cache_ptr
        + page[:, None] * stride_vb
        + offset[:, None] * stride_vt
        + v_head_offset
        + dims[None, :]
    )
    v = _load_rows(v_ptrs, kv_ok, dims, HEAD_DIM, BLOCK_D, CHECK_ROWS)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    lse_ptr,
    scale_log2,
    tokens_per_split,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_os,
    stride_oh,
    stride_osplit,
    stride_ls,
    stride_lh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = one (sequence, kv head, split): the query heads of the group against the
    split's slice of the context. With ``SPLIT`` it writes the normalised partial output and its
    log2-sum-exp for :func:`_decode_reduce_kernel`; otherwise the final output."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context_len)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        kv_pos = n0 + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_kv_tile(
            q,
            m_i,
            l_i,
            acc,
            kv_pos,
            kv_pos < end,
            rows,
            table,
            k_cache_ptr,
            v_cache_ptr,
            stride_kb,
            stride_kt,
            stride_vb,
            stride_vt,
            kv_head * stride_kh,
            kv_head * stride_vh,
            scale_log2,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_SIZE,
            DOT_PRECISION,
            True,
            False,
        )

    # An empty split (start >= context_len) has l_i == 0: write zeros with lse = -inf.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + dims[None, :]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if SPLIT:
        tl.store(out_ptrs + split * stride_osplit, out, mask=out_mask)
        # Empty split: m_i is -inf, so lse is -inf without taking log2(0).
        lse = m_i + tl.log2(tl.maximum(l_i, 1e-30))
        tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=row_mask)
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _decode_reduce_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    stride_ps,
    stride_ph,
    stride_psplit,
    stride_ls,
    stride_lh,
    stride_os,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    """Merge the per-split partial outputs of one (sequence, head) by their log-sum-exp."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    lse = tl.load(
        lse_ptr + seq * stride_ls + head * stride_lh + splits, mask=split_mask, other=float("-inf")
    )
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    partial = tl.load(
        partial_ptr
        + seq * stride_ps
        + head * stride_ph
        + splits[:, None] * stride_psplit
        + dims[None, :],
        mask=split_mask[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    total = tl.sum(weights, axis=0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_os + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device):
    """Split the context only when (sequence, kv head) programs alone cannot fill the GPU.

    The target is about two programs per SM, which keeps enough loads in flight to saturate
    memory bandwidth (measured: more splits only add reduce traffic). Splits never get shorter
    than ``_MIN_TOKENS_PER_SPLIT`` tokens, where the reduce pass would cost more than it gains.
    """
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    programs = max(1, num_seqs * num_kv_heads)
    wanted = triton.cdiv(2 * sms, programs)
    useful = triton.cdiv(max_context, _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, _MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Flash-decoding over a paged KV cache; see :func:`kernels.reference.paged_decode_attention`.

    The longest possible context is taken from the block-table width (no device sync), so the
    runner should size ``block_tables`` to the batch, not to the model's maximum length.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    cfg = config or decode_config(head_dim, q.dtype)
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context, q.device)
    tokens_per_split = triton.cdiv(triton.cdiv(max_context, num_splits), cfg.block_n) * cfg.block_n
    num_splits = triton.cdiv(max_context, tokens_per_split)
    split = num_splits > 1
    if split:
        partial = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        target, target_strides = partial, partial.stride()[:3]
    else:
        lse = out  # unused
        target, target_strides = out, (*out.stride()[:2], 0)
    if q.stride(-1) != 1:
        q = q.contiguous()
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        target,
        lse,
        scale * _LOG2E,
        tokens_per_split,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        *target_strides,
        lse.stride(0),
        lse.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_N=cfg.block_n,
        SPLIT=split,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            partial,
            lse,
            out,
            num_splits,
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            num_warps=4 if head_dim >= 128 else 2,
        )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    out_ptr,
    scale_log2,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = one tile of ``BLOCK_M // GROUP`` query tokens x the ``GROUP`` heads that
    share kv head ``program_id(1)``; row ``r`` of the tile is token ``r // GROUP``, head
    ``r % GROUP``.

    Tiles are numbered without a host sync: sequence ``i`` owns tiles starting at
    ``query_start_loc[i] // TOKENS + i`` (always enough room for its tokens), and each program
    finds its sequence by binary search over those starts. Surplus tiles exit immediately.
    """
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo = pid * 0
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // TOKENS + mid
        lo = tl.where(first_tile <= pid, mid, lo)
        hi = tl.where(first_tile <= pid, hi, mid)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile = pid - (q_start // TOKENS + seq)
    if tile * TOKENS >= q_len:
        return

    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - q_len
    rows = tl.arange(0, BLOCK_M)
    tok = tile * TOKENS + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < TOKENS * GROUP) & (tok < q_len)
    # Padding rows take the last valid position so they never see an all-masked score row.
    pos = tl.minimum(prefix_len + tok, context_len - 1)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        q_ptr
        + (q_start + tok)[:, None].to(tl.int64) * stride_qt
        + heads[:, None] * stride_qh
        + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    first_pos = prefix_len + tile * TOKENS
    last_pos = tl.minimum(first_pos + TOKENS, context_len) - 1
    # KV tiles that end at or before the tile's first query position are visible to every row:
    # no causal mask and no bounds checks there. Only the diagonal tiles pay for masking.
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, unmasked_end, BLOCK_N):
        kv_pos = n0 + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_kv_tile(
            q,
            m_i,
            l_i,
            acc,
            kv_pos,
            kv_pos <= last_pos,
            pos,
            table,
            k_cache_ptr,
            v_cache_ptr,
            stride_kb,
            stride_kt,
            stride_vb,
            stride_vt,
            kv_head * stride_kh,
            kv_head * stride_vh,
            scale_log2,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_SIZE,
            DOT_PRECISION,
            False,
            False,
        )
    for n0 in range(unmasked_end, last_pos + 1, BLOCK_N):
        kv_pos = n0 + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_kv_tile(
            q,
            m_i,
            l_i,
            acc,
            kv_pos,
            kv_pos <= last_pos,
            pos,
            table,
            k_cache_ptr,
            v_cache_ptr,
            stride_kb,
            stride_kt,
            stride_vb,
            stride_vt,
            kv_head * stride_kh,
            kv_head * stride_vh,
            scale_log2,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_SIZE,
            DOT_PRECISION,
            True,
            True,
        )

    out = acc / l_i[:, None]
    tl.store(
        out_ptr
        + (q_start + tok)[:, None].to(tl.int64) * stride_ot
        + heads[:, None] * stride_oh
        + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries over a paged KV cache; see the reference."""
    total_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = context_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if total_tokens == 0 or num_seqs == 0:
        return out
    cfg = config or prefill_config(head_dim, q.dtype)
    block_m = max(cfg.block_m, triton.next_power_of_2(group))
    tokens_per_tile = block_m // group
    num_tiles = total_tokens // tokens_per_tile + num_seqs
    if q.stride(-1) != 1:
        q = q.contiguous()
    _prefill_kernel[(num_tiles, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        scale * _LOG2E,
        num_seqs,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        TOKENS=tokens_per_tile,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


__all__ = [
    "INTERPRETED",
    "TileConfig",
    "choose_num_splits",
    "paged_decode_attention",
    "paged_prefill_attention",
]
