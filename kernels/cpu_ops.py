"""CPU implementations built from ATen's optimised operators.

They share the reference's signature and are tested against it; the dispatcher routes CPU
tensors here instead of to the reference when a faster ATen path exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import native, reference


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weight-only int8 matmul through ``torch._weight_int8pack_mm``.

    That kernel is vectorised only for 16-bit activations (float32 ones take a scalar loop
    about 15x slower), so activations are rounded to bfloat16 on the way in; it accumulates
    in float32. Reading a quarter of the float32 weight bytes is what makes few-row matmuls
    (decode steps of small batches) faster.
    """
    out = torch._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scale.to(torch.bfloat16))
    return out.to(x.dtype)


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """int8 x int8 GEMM (``torch._int_mm``, VNNI) on activations quantized per row on the fly.

    From about ten rows a matmul is compute-bound, and integer multiply-adds run several
    times faster than float32 ones: the 30 layers of SmolLM2-135M take 21 ms at 16 rows
    against 34 ms in float32, and 220 ms against 364 ms at 512 rows
    (benchmarks/bench_linear.py).
    """
    # rounded as the C++ GEMM of the target in use rounds them, so both agree bit for bit
    xq, x_scale = reference.quantize_rows_int8(
        x, limit=native.int8_activation_limit(native.target())
    )
    # Convert first: an int32 * float32 product takes ATen's unvectorised promotion path,
    # almost 3x slower over a prefill's [2000, 3072] than a cast and two in-place multiplies.
    out = torch._int_mm(xq, qweight.t()).float()
    return out.mul_(x_scale[:, None]).mul_(scale).to(x.dtype)


def int8_packed_linear(
    x: torch.Tensor, packed: torch.Tensor, comp: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The C++ kernel of `kernels/csrc/int8_gemm.cpp` for the CPU's instruction set:
    quantization, GEMM and scaling in one pass, bit for bit `int8_dynamic_linear`'s result.
    Needs `kernels.native.load()` first."""
    return native.int8_packed_linear(x, packed, comp, scale)


def pack_int8_vnni(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's layout, for the C++ GEMM of the target in use, which refuses a weight
    it could not multiply exactly (the AVX2 target takes codes in [-64, 64] only) rather
    than return saturated sums later."""
    low, high = native.int8_weight_range(native.target())
    if qweight.numel() and not (low <= int(qweight.min()) and int(qweight.max()) <= high):
        raise ValueError(
            f"the {native.target()} int8 GEMM multiplies weight codes in [{low}, {high}]; this "
            f"weight has [{int(qweight.min())}, {int(qweight.max())}] (round it with "
            "kernels.native.int8_weight_range)"
        )
    return reference.pack_int8_vnni(qweight)


def pack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` values in [0, 15] to ATen's CPU int4 layout (``out`` a multiple of 16)."""
    return torch._convert_weight_to_int4pack_for_cpu(qweight.to(torch.int32), 1)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Group-wise 4-bit weight matmul through ``torch._weight_int4pack_mm_for_cpu``, on
    bfloat16 activations like `int8_linear`. Half the weight bytes of int8: at one to a
    few rows a decode step is that much shorter."""
    out = torch._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), packed, group_size, scales_zeros.to(torch.bfloat16)
    )
    return out.to(x.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention as one fused SDPA call over K/V gathered into a padded batch.

    Padding positions gather a copy of the sequence's first token instead of whatever their
    slot holds, so the gathered V is always finite (a masked weight of zero times an unwritten
    NaN slot would still be NaN) without an extra masking pass; an additive mask, built once
    per step, hides them from the softmax (a boolean one is converted inside every call:
    10-35% of the call). In the cache's dtype (bfloat16 halves the bytes gathered),
    accumulating in float32 inside SDPA.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_seqs == 0:
        return q.new_empty(q.shape)
    slots, mask, empty = _decode_slots(
        block_tables, context_lens, k_cache.shape[0], k_cache.shape[1], k_cache.dtype
    )
    flat = slots.view(-1)
    k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, flat)
    v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, flat)
    # [S, kvh, T, d]; the GQA group rides on SDPA's query-length axis.
    k = k.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = v.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    qg = q.to(k_cache.dtype).view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    out = out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)
    if empty is not None:  # nothing to attend to: zeros, as in the reference
        out[empty] = 0.0
    return out


class _StepMemo:
    """The last result of a per-step computation, keyed by the identity of its input tensors.

    Every layer of a step passes the same metadata tensors, and the model runner builds new
    ones for every step, so identity tells a step's first layer from the others. The inputs
    are held, so their ids cannot be recycled while the entry lives. Key and value live in
    one tuple, read and replaced whole, so engines stepping on different threads can only
    miss (and recompute), never read another step's value.
    """

    def __init__(self) -> None:
        self._entry: tuple[tuple, object] | None = None

    def get(self, key: tuple, compute):
        entry = self._entry
        if entry is not None and len(key) == len(entry[0]) and all(map(_same, key, entry[0])):
            return entry[1]
        value = compute()
        self._entry = (key, value)
        return value


def _same(a, b) -> bool:
    return a is b if isinstance(a, torch.Tensor) else a == b


_slots_memo = _StepMemo()
_prefill_memo = _StepMemo()
_rope_memo = _StepMemo()
_store_memo = _StepMemo()


def _decode_slots(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    pool_blocks: int,
    block_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cache slot of every (sequence, position) up to the longest context, the additive
    ``[S, 1, 1, T]`` mask of the real ones, and which sequences have no context at all (None
    if none); once per step."""
    key = (block_tables, context_lens, pool_blocks, block_size, dtype)
    return _slots_memo.get(key, lambda: _compute_decode_slots(*key))


def _compute_decode_slots(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    pool_blocks: int,
    block_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    lens = context_lens.long()
    num_blocks = max(1, -(-int(lens.max()) // block_size))
    slots = _table_slots(block_tables, num_blocks, pool_blocks, block_size)  # masked below
    valid = torch.arange(slots.shape[1], device=slots.device)[None, :] < lens[:, None]
    empty = lens == 0
    slots = torch.where(valid, slots, slots[:, :1])
    mask = _additive_mask(valid, dtype)[:, None, None, :]
    return slots, mask, empty if bool(empty.any()) else None


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, -inf elsewhere: what SDPA adds to the scores."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))


def _table_slots(
    table: torch.Tensor, num_blocks: int, pool_blocks: int, block_size: int
) -> torch.Tensor:
    """Cache slots of the first ``num_blocks`` blocks of a block-table row (or of each row),
    flattened per row. Table padding may hold anything, so ids are clamped into the pool;
    callers mask or cut the slots past each context."""
    blocks = table[..., :num_blocks].long().clamp(0, pool_blocks - 1)
    offsets = torch.arange(block_size, device=blocks.device)
    return (blocks[..., None] * block_size + offsets).flatten(-2)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The reference's per-sequence loop, shaped for SDPA's fused CPU kernel.

    The reference passes 3-D tensors, which send SDPA down its unfused path (a full score
    matrix, then masking and softmax as separate passes): over half of a 512-token prefill.
    Here each sequence is one 4-D call, and the gather indices and additive causal masks are
    built once per step rather than once per layer. It runs in the queries' dtype: without
    AMX, SDPA is faster in float32 than on a bfloat16 cache (at 512 tokens 3.3 ms per layer
    against 6.0 with a boolean mask), and the gathered K/V are small to widen.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    key = (block_tables, query_start_loc, context_lens, *k_cache.shape[:2], group, q.dtype)
    plans = _prefill_memo.get(key, lambda: _prefill_plans(*key))
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    out = q.new_empty(q.shape)
    for lo, hi, slots, mask in plans:
        n = hi - lo
        # [1, kvh, T, d] keys against [1, kvh, group * n, d] queries: GQA folded into rows.
        k = k_flat.index_select(0, slots).to(q.dtype).transpose(0, 1)[None]
        v = v_flat.index_select(0, slots).to(q.dtype).transpose(0, 1)[None]
        qi = q[lo:hi].view(n, num_kv_heads, group, head_dim)
        qi = qi.permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * n, head_dim)
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        o = o.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3)
        out[lo:hi] = o.reshape(n, num_heads, head_dim)
    return out


def _prefill_plans(
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    pool_blocks: int,
    block_size: int,
    group: int,
    dtype: torch.dtype,
) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Per sequence with queries: its query rows, the cache slots of its context, and the
    additive ``[1, 1, group * n, T]`` mask of which of them each (folded) query row may see."""
    plans = []
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for i, ctx in enumerate(lens):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        num_blocks = -(-ctx // block_size)
        slots = _table_slots(block_tables[i], num_blocks, pool_blocks, block_size)[:ctx]
        query_pos = torch.arange(ctx - (hi - lo), ctx, device=slots.device)
        allowed = torch.arange(ctx, device=slots.device)[None, :] <= query_pos[:, None]
        plans.append((lo, hi, slots, _additive_mask(allowed.repeat(group, 1), dtype)[None, None]))
    return plans


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's rotary with the per-step work done once per step instead of per layer.

    ``rotate_half(x) * sin`` equals ``roll(x, d/2) * [-sin, sin]`` exactly (only signs move),
    so each tensor takes four ops; the cos and signed-sin rows are gathered on a step's first
    layer and reused by the others. Under torch.compile the gather is traced instead: the
    compiled graph fuses it into the rotation, and a memo cannot live in a graph.
    """
    if torch.compiler.is_compiling():
        cos, sin = _rope_rows(positions, cos_sin_cache, q.dtype)
    else:
        key = (positions, cos_sin_cache, q.dtype)
        cos, sin = _rope_memo.get(key, lambda: _rope_rows(*key))
    half = cos_sin_cache.shape[-1] // 2
    return (
        q * cos + torch.roll(q, half, dims=-1) * sin,
        k * cos.to(k.dtype) + torch.roll(k, half, dims=-1) * sin.to(k.dtype),
    )


def _rope_rows(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin_cache.shape[-1] // 2
    rows = cos_sin_cache[positions.long()].to(dtype)
    cos, sin = rows[:, :half], rows[:, half:]
    return torch.cat((cos, cos), -1)[:, None, :], torch.cat((-sin, sin), -1)[:, None, :]


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The reference's scatter, with the slot check (and its sync) done once per step."""
    slots = _store_memo.get((slot_mapping,), lambda: reference.writable_slots(slot_mapping))
    reference.write_kv(key, value, k_cache, v_cache, *slots)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ATen's fused RMSNorm for float32, which rounds exactly like the reference; other
    dtypes go to the reference (it rounds the normalised value before the weight multiply)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return reference.rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    out = F.rms_norm(x, weight.shape, weight, eps)
    return out if residual is None else (out, x)
