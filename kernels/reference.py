"""Plain PyTorch implementations of every kernel.

These define the semantics the Triton kernels are tested against, and they are what the engine
runs on CPU. They favour clarity, but avoid per-token Python loops and never materialise K/V
repeated across a GQA group, so the CPU engine stays usable on small models.

Shapes follow the paged-KV layout shared by the whole engine:
``k_cache``/``v_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]`` and a token at
slot ``s`` lives in block ``s // block_size`` at offset ``s % block_size``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "apply_rotary",
    "build_rope_cache",
    "dequantize_int4",
    "dequantize_int8",
    "int4_linear",
    "int8_dynamic_linear",
    "int8_linear",
    "pack_int4",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "silu_and_mul",
    "store_kv",
    "writable_slots",
    "write_kv",
]


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Gather the first ``num_blocks`` blocks named by ``block_table`` into a contiguous sequence.

    ``block_table`` is ``[..., max_blocks]``; the result is ``[..., num_blocks * block_size,
    num_kv_heads, head_dim]``. Padding entries may hold any value (even -1), so they are clamped
    into range; the caller masks the positions they produce.
    """
    ids = block_table[..., :num_blocks].long().clamp(0, cache.shape[0] - 1)
    blocks = cache[ids]  # [..., num_blocks, block_size, kvh, d]
    return blocks.flatten(-4, -3)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attending to all of its ``context_lens[i]`` cached tokens.

    The whole batch is gathered to the longest context and padded positions are masked, which
    keeps this a handful of batched matmuls instead of a Python loop over sequences.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_seqs == 0:
        return q.new_empty(q.shape)
    max_len = int(context_lens.max())
    num_blocks = max(1, math.ceil(max_len / block_size))
    k = _gather_kv(k_cache, block_tables, num_blocks).float()  # [S, T, kvh, d]
    v = _gather_kv(v_cache, block_tables, num_blocks).float()
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.einsum("skgd,stkd->skgt", qg, k) * scale
    positions = torch.arange(k.shape[1], device=q.device)
    invalid = positions[None, :] >= context_lens.to(q.device).long()[:, None]  # [S, T]
    scores.masked_fill_(invalid[:, None, None, :], float("-inf"))
    # Slots past a context may hold anything (the pool is not zeroed), and 0 * NaN is NaN.
    v.masked_fill_(invalid[:, :, None, None], 0.0)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # empty contexts give zeros
    out = torch.einsum("skgt,stkd->skgd", probs, v)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for packed queries that are the last tokens of each sequence's context.

    Query ``j`` of sequence ``i`` sits at absolute position ``context_lens[i] - query_len_i + j``
    and may attend to every cached position up to and including its own. Handles fresh prefill,
    prefill after a prefix-cache hit, chunked prefill and decode rows in one call.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = q.new_empty(q.shape)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    for i, ctx in enumerate(lens):
        q_lo, q_hi = starts[i], starts[i + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        num_blocks = max(1, math.ceil(ctx / block_size))
        k = _gather_kv(k_cache, block_tables[i], num_blocks)[:ctx].float()  # [T, kvh, d]
        v = _gather_kv(v_cache, block_tables[i], num_blocks)[:ctx].float()
        # Fold the GQA group into the query axis: [kvh, group * q_len, d] against [kvh, T, d].
        qi = q[q_lo:q_hi].float().view(q_len, num_kv_heads, group, head_dim)
        qi = qi.permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len, head_dim)
        query_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        allowed = torch.arange(ctx, device=q.device)[None, :] <= query_pos[:, None]
        allowed = allowed.repeat(group, 1)  # [group * q_len, T]
        o = F.scaled_dot_product_attention(
            qi, k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=scale
        )
        o = o.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
        out[q_lo:q_hi] = o.reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V into its cache slot, in place; negative slots are skipped.

    Negative slots let the runner pad a batch (e.g. for CUDA graphs) without a scratch block.
    """
    write_kv(key, value, k_cache, v_cache, *writable_slots(slot_mapping))


def writable_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The int64 slots `store_kv` writes, and the mask of rows it keeps (None: all of them)."""
    slots = slot_mapping.long()
    keep = slots >= 0
    if bool(keep.all()):
        return slots, None
    return slots[keep], keep


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    keep: torch.Tensor | None,
) -> None:
    """`store_kv` once its slots are known (see `writable_slots`)."""
    if keep is not None:
        key, value = key[keep], value[keep]
    # One flat row per slot: index_copy_ on a view is several times faster than
    # two-index advanced assignment into the 4-D pool.
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with Hugging Face LlamaRMSNorm rounding, optionally fused with a residual add.

    With ``residual`` the sum ``x + residual`` is both normalised and returned as the new
    residual stream, which is how pre-norm decoder layers chain together.
    """
    if residual is not None:
        x = x + residual
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight * normed.to(x.dtype)).to(x.dtype)
    return out if residual is None else (out, x)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency remapping: keep high frequencies, divide low ones by ``factor``,
    and interpolate smoothly in between (same arithmetic order as transformers)."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_rope_cache(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Precompute ``[max_position, head_dim]`` float32: cos in the first half, sin in the second.

    Frequencies are computed exactly as transformers does so that rotary outputs match it bit
    for bit in float32.
    """
    rope_type = "default"
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    positions = torch.arange(max_position, device=device, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in the Llama "rotate_half" layout, returning new tensors.

    cos/sin are cast to the input dtype before use, as transformers does, so low-precision
    outputs round the same way as the Hugging Face model.
    """
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]  # [num_tokens, head_dim]
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1)[:, None, :]
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1)[:, None, :]
    q_out = _rotate(q, cos.to(q.dtype), sin.to(q.dtype))
    k_out = _rotate(k, cos.to(k.dtype), sin.to(k.dtype))
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation on a fused gate/up projection: ``silu(gate) * up``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T`` for int8 weights with one scale per output channel.

    ``qweight`` is ``[out, in]`` int8 and ``scale`` ``[out]``; computed in float32, returned in
    ``x.dtype``.
    """
    return F.linear(x.float(), dequantize_int8(qweight, scale)).to(x.dtype)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``qweight * scale[:, None]``; see `int8_linear`."""
    return qweight.float() * scale.float()[:, None]


def quantize_rows_int8(
    x: torch.Tensor, scale_dtype: torch.dtype = torch.float32, limit: int = 127
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``x ~= q * scale[:, None]`` with ``scale = max|row| / limit``,
    so codes lie in [-limit, limit] (a smaller `limit` for a kernel that multiplies fewer
    bits exactly, `kernels.native.int8_weight_range`).

    The float32 scales are first rounded to ``scale_dtype`` (a kernel that applies them in
    bfloat16 wants the rows rounded with exactly those values). An all-zero row gets the
    smallest normal scale, so it divides to zeros. No clamp is needed: a scale rounded down
    to bfloat16 stretches a row's extreme to at most limit * (1 + 2**-9), which still rounds
    to the limit. This runs on every matmul input in w8a8 mode, hence the few, plain ops."""
    xf = x.float()
    scale = xf.abs().amax(dim=1).div_(limit)
    if scale_dtype != torch.float32:
        scale = scale.to(scale_dtype).float()
    scale.clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.round(xf / scale[:, None]).to(torch.int8), scale


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, activation_limit: int = 127
) -> torch.Tensor:
    """`int8_linear` with the activations quantized too: each row of ``x`` is rounded to codes
    in [-activation_limit, activation_limit] with its own scale (`quantize_rows_int8`; a CPU
    target's limit is `kernels.native.int8_activation_limit`), the integer product is exact,
    and the result is ``(xq @ qweight.T) * x_scale[:, None] * scale``, in ``x.dtype``."""
    xq, x_scale = quantize_rows_int8(x, limit=activation_limit)
    acc = xq.double() @ qweight.double().T  # exact: |sums| stay far below 2**53
    return (acc.float() * x_scale[:, None] * scale.float()).to(x.dtype)


def int8_vnni_fits(qweight: torch.Tensor) -> bool:
    """Whether `pack_int8_vnni` can lay out this ``[out, in]`` weight."""
    return qweight.shape[0] % 16 == 0 and qweight.shape[1] % 4 == 0


def pack_int8_vnni(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out an ``[out, in]`` int8 weight for `int8_packed_linear`: ``[out / 16, in / 4, 16,
    4]`` (four consecutive inputs of 16 outputs together, one VNNI operand), and
    ``comp = 128 * row sums`` in int32, which the VNNI kernel subtracts because it multiplies
    activations stored as unsigned ``q + 128``. Needs ``out % 16 == 0`` and ``in % 4 == 0``."""
    n, k = qweight.shape
    if not int8_vnni_fits(qweight):
        raise ValueError(f"a [{n}, {k}] weight cannot be packed: need out % 16 == in % 4 == 0")
    packed = qweight.view(n // 16, 16, k // 4, 4).transpose(1, 2).contiguous()
    return packed, qweight.sum(dim=1, dtype=torch.int32) * 128


def int8_packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    comp: torch.Tensor,
    scale: torch.Tensor,
    activation_limit: int = 127,
) -> torch.Tensor:
    """`int8_dynamic_linear` on a weight packed by `pack_int8_vnni` (``comp`` follows from the
    weight, so the reference ignores it)."""
    qweight = packed.transpose(1, 2).reshape(packed.shape[0] * 16, packed.shape[1] * 4)
    return int8_dynamic_linear(x, qweight, scale, activation_limit)


def pack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The reference keeps 4-bit weights unpacked: ``[out, in]`` uint8 values in [0, 15]."""
    return qweight.to(torch.uint8)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``x @ W.T`` for group-quantized 4-bit weights ``W = (q - 8) * scale + zero``.

    ``packed`` comes from :func:`pack_int4` (for the reference, ``q`` itself). ``scales_zeros``
    is ``[in / group_size, out, 2]``: the scale and zero of every group of ``group_size``
    consecutive inputs of every output. Computed in float32, returned in ``x.dtype``.
    """
    weight = dequantize_int4(packed, scales_zeros, group_size)
    return F.linear(x.float(), weight).to(x.dtype)


def dequantize_int4(
    qweight: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """float32 ``(q - 8) * scale + zero`` for unpacked ``[out, in]`` codes; see `int4_linear`."""
    scale = scales_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)
    zero = scales_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (qweight.float() - 8) * scale + zero


def decode_layers(
    x: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    rope_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    slot_mapping: torch.Tensor,
    layers: Sequence[Mapping[str, torch.Tensor | None]],
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    num_heads: int,
    eps: float,
    scale: float,
    activation_limit: int = 127,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder layer of a decode step (one query token per sequence), as engine.model
    runs them with w8a8 linears: returns (hidden states, residual) after the last layer and
    writes each layer's K/V. ``layers`` holds each layer's operands by the slot names of
    kernels/csrc/decode_layers.cpp (`kernels.native.decode_layer_slots`): a linear's
    `pack_int8_vnni` weight, comp, per-output scale and optional SmoothQuant input scale.
    ``activation_limit``: as in `int8_dynamic_linear`."""
    rows, head_dim = x.shape[0], k_caches[0].shape[-1]

    def linear(h: torch.Tensor, w: Mapping, name: str) -> torch.Tensor:
        if w[f"{name}_input_scale"] is not None:
            h = h * w[f"{name}_input_scale"]
        return int8_packed_linear(
            h, w[f"{name}_packed"], w[f"{name}_comp"], w[f"{name}_scale"], activation_limit
        )

    for w, k_cache, v_cache in zip(layers, k_caches, v_caches, strict=True):
        h, residual = rms_norm(x, w["input_norm"], eps, residual)
        qkv = linear(h, w, "qkv")
        if w["qkv_bias"] is not None:
            qkv = qkv + w["qkv_bias"]
        q, k, v = qkv.view(rows, -1, head_dim).split(
            [num_heads, k_cache.shape[2], k_cache.shape[2]], dim=1
        )
        if w["q_norm"] is not None:
            q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
        q, k = apply_rotary(q, k, positions, rope_cache)
        store_kv(k, v, k_cache, v_cache, slot_mapping)
        attn = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
        h, residual = rms_norm(
            linear(attn.reshape(rows, -1), w, "o"), w["post_norm"], eps, residual
        )
        x = linear(silu_and_mul(linear(h, w, "gate_up")), w, "down")
    return x, residual
