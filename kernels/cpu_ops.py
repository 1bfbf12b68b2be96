"""CPU implementations built from ATen's optimised operators.

They share the reference's signature and are tested against it; the dispatcher routes CPU
tensors here instead of to the reference when a faster ATen path exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weight-only int8 matmul through ``torch._weight_int8pack_mm``.

    That kernel is vectorised only for 16-bit activations (float32 ones take a scalar loop
    about 15x slower), so activations are rounded to bfloat16 on the way in; it accumulates
    in float32. Reading a quarter of the float32 weight bytes is what makes few-row matmuls
    (decode steps of small batches) faster.
    """
    out = torch._weight_int8pack_mm(
        x.to(torch.bfloat16), qweight, scale.to(torch.bfloat16)
    )
    return out.to(x.dtype)


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
    NaN slot would still be NaN) without an extra masking pass; the boolean mask hides them
    from the softmax. In the cache's dtype (bfloat16 halves the bytes gathered), accumulating
    in float32 inside SDPA.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_seqs == 0:
        return q.new_empty(q.shape)
    slots, valid = _decode_slots(block_tables, context_lens, k_cache.shape[0], k_cache.shape[1])
    flat = slots.view(-1)
    k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, flat)
    v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, flat)
    # [S, kvh, T, d]; the GQA group rides on SDPA's query-length axis.
    k = k.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = v.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    qg = q.to(k_cache.dtype).view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    out = out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)
    empty = context_lens == 0
    if bool(empty.any()):  # nothing to attend to: zeros, as in the reference
        out[empty.to(out.device)] = 0.0
    return out


_last_slots: tuple | None = None


def _decode_slots(
    block_tables: torch.Tensor, context_lens: torch.Tensor, pool_blocks: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slot of every (sequence, position) up to the longest context, and which of them
    are real. Every layer of a step passes the same two tensors, so the last result is kept
    and reused when they come again (compared by identity, and held, so ids cannot recycle).
    """
    global _last_slots
    if _last_slots is not None:
        tables, lens, shape, result = _last_slots
        if tables is block_tables and lens is context_lens and shape == (pool_blocks, block_size):
            return result
    lens = context_lens.long()
    num_blocks = max(1, -(-int(lens.max()) // block_size))
    # Table padding may hold anything; clamped, and masked below like any padding.
    blocks = block_tables[:, :num_blocks].long().clamp(0, pool_blocks - 1)
    offsets = torch.arange(block_size, device=blocks.device)
    slots = (blocks[:, :, None] * block_size + offsets).view(len(blocks), -1)
    valid = torch.arange(slots.shape[1], device=slots.device)[None, :] < lens[:, None]
    result = (torch.where(valid, slots, slots[:, :1]), valid)
    _last_slots = (block_tables, context_lens, (pool_blocks, block_size), result)
    return result
