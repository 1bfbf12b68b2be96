"""Triton kernels for the small per-token operations: KV store, RMSNorm, rotary, SwiGLU.

Each is a single memory-bound pass with one program per token (or row), so the only design
choices are fusing what would otherwise be several PyTorch launches and doing the arithmetic in
float32 with a single rounding at the end. Signatures match :mod:`kernels.reference`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# ``triton.jit`` picks compiled or interpreted execution when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _row_warps(elements: int) -> int:
    """Enough warps that each thread handles a few 16-byte vectors of a row (a power of two,
    as Triton requires)."""
    return min(16, triton.next_power_of_2(max(1, elements // 256)))


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    # A per-element comparison keeps the mask a proper boolean block (a scalar `slot >= 0`
    # broadcast into it trips the interpreter).
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM) & (heads * 0 + slot >= 0)
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + heads * stride_kch + dims
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + heads * stride_vch + dims
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim with unit stride; copy only in the rare case it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` rows into the paged caches in place; negative slots skip."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV cache must have a unit-stride head_dim")
    key, value = _inner_contiguous(key), _inner_contiguous(value)
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=_row_warps(num_kv_heads * head_dim),
    )


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the activation dtype first: it *is* the new residual stream, and the
        # reference normalises that rounded value.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused (residual add +) RMSNorm with Hugging Face rounding; see the reference.

    ``out``/``residual_out`` are optional contiguous destinations shaped like ``x``.
    """
    hidden = x.shape[-1]
    x2 = _inner_contiguous(x.reshape(-1, hidden))
    rows = x2.shape[0]
    out = torch.empty_like(x2) if out is None else out.view(rows, hidden)
    block = triton.next_power_of_2(hidden)
    if residual is None:
        r2, new_residual = x2, x2  # unused by the kernel when HAS_RESIDUAL is false
    else:
        r2 = _inner_contiguous(residual.reshape(-1, hidden))
        new_residual = (
            torch.empty_like(x2) if residual_out is None else residual_out.view(rows, hidden)
        )
    if rows > 0:
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out,
            new_residual,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            new_residual.stride(0),
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=_row_warps(block),
        )
    out = out.view(x.shape)
    return out if residual is None else (out, new_residual.view(x.shape))


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    token,
    stride_st,
    stride_sh,
    cos,
    sin,
    num_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate every head of one token: (x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    src = src_ptr + token * stride_st + heads * stride_sh + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + token * (num_heads * 2 * HALF) + heads * (2 * HALF) + dims
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    positions_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    num_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + dims, mask=dmask, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + dims, mask=dmask, other=0.0)
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        token,
        stride_qt,
        stride_qh,
        cos,
        sin,
        num_heads,
        HALF,
        BLOCK_H,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        token,
        stride_kt,
        stride_kh,
        cos,
        sin,
        num_kv_heads,
        HALF,
        BLOCK_H,
        BLOCK_HALF,
    )


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q`` and ``k`` in one launch, computed in float32.

    ``q_out``/``k_out`` are optional contiguous destinations shaped like ``q``/``k``.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q, k = _inner_contiguous(q), _inner_contiguous(k)
    cache = _inner_contiguous(cos_sin_cache)
    if q_out is None:
        q_out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if num_tokens > 0:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q,
            k,
            q_out,
            k_out,
            positions,
            cache,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cache.stride(0),
            num_heads,
            num_kv_heads,
            HALF=half,
            BLOCK_H=triton.next_power_of_2(max(num_heads, num_kv_heads)),
            BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=_row_warps(num_heads * head_dim),
        )
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU on a fused gate/up activation ``[..., 2*d]`` -> ``[..., d]`` (into ``out`` if
    given, a contiguous ``[..., d]`` tensor)."""
    d = x.shape[-1] // 2
    x2 = _inner_contiguous(x.reshape(-1, 2 * d))
    rows = x2.shape[0]
    if out is None:
        out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    else:
        out = out.view(rows, d)
    block = min(1024, triton.next_power_of_2(d))
    if rows > 0:
        grid = (rows, triton.cdiv(d, block))
        _silu_and_mul_kernel[grid](
            x2, out, x2.stride(0), out.stride(0), d, BLOCK=block, num_warps=_row_warps(block)
        )
    return out.view(*x.shape[:-1], d)
