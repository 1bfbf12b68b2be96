"""The PyTorch references against independent ground truth: a float64 attention written out
token by token, and transformers' own Llama RMSNorm / rotary / activation code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from kernels import reference
from tests.kernels.cases import make_paged_batch, naive_attention, relative_error

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_decode_reference_matches_float64(num_heads, num_kv_heads):
    batch = make_paged_batch(
        [1, 16, 37, 70], [1, 1, 1, 1], num_heads, num_kv_heads, 32, 16, torch.float32, "cpu"
    )
    out = reference.paged_decode_attention(*batch.decode_args())
    assert out.dtype == batch.q.dtype
    assert relative_error(out, naive_attention(batch)) < 1e-5


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
def test_prefill_reference_matches_float64(num_heads, num_kv_heads):
    # Fresh prefill, prefix-cache hit, a chunk in the middle, and a decode row in one batch.
    batch = make_paged_batch(
        [20, 45, 33, 9], [20, 13, 1, 4], num_heads, num_kv_heads, 32, 16, torch.float32, "cpu"
    )
    out = reference.paged_prefill_attention(*batch.prefill_args())
    assert relative_error(out, naive_attention(batch)) < 1e-5


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_reference(slot_dtype):
    k_cache = torch.zeros(4, 8, 2, 16)
    v_cache = torch.zeros(4, 8, 2, 16)
    key, value = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([3, -1, 31, 8, 17], dtype=slot_dtype)
    reference.store_kv(key, value, k_cache, v_cache, slots)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(k_cache[s // 8, s % 8], key[t])
            assert torch.equal(v_cache[s // 8, s % 8], value[t])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 4  # the skipped token wrote nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_reference_matches_transformers(dtype):
    norm = LlamaRMSNorm(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x, residual = torch.randn(3, 5, 96).to(dtype), torch.randn(3, 5, 96).to(dtype)
    with torch.no_grad():
        assert torch.equal(reference.rms_norm(x, norm.weight, 1e-6), norm(x))
        out, new_residual = reference.rms_norm(x, norm.weight, 1e-6, residual)
        assert torch.equal(new_residual, x + residual)
        assert torch.equal(out, norm(x + residual))


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_reference_matches_transformers(scaling, dtype):
    config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=scaling,
        max_position_embeddings=1024,
    )
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 1023])
    q, k = torch.randn(7, 4, 64).to(dtype), torch.randn(7, 2, 64).to(dtype)
    q_in, k_in = q.clone(), k.clone()
    cos, sin = rotary(q, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cache = reference.build_rope_cache(64, 1024, 500000.0, scaling)
    assert cache.shape == (1024, 64) and cache.dtype == torch.float32
    q_out, k_out = reference.apply_rotary(q, k, positions, cache)
    assert torch.equal(q_out, q_hf[0].transpose(0, 1))
    assert torch.equal(k_out, k_hf[0].transpose(0, 1))
    assert torch.equal(q, q_in) and torch.equal(k, k_in)


def test_rope_cache_accepts_legacy_type_key_and_rejects_unknown():
    legacy = {**LLAMA3_SCALING, "type": "llama3"}
    del legacy["rope_type"]
    new = reference.build_rope_cache(64, 128, 10000.0, LLAMA3_SCALING)
    assert torch.equal(reference.build_rope_cache(64, 128, 10000.0, legacy), new)
    assert not torch.equal(reference.build_rope_cache(64, 128, 10000.0, None), new)
    assert torch.equal(
        reference.build_rope_cache(64, 128, 10000.0, {"rope_type": "default"}),
        reference.build_rope_cache(64, 128, 10000.0),
    )
    with pytest.raises(ValueError, match="yarn"):
        reference.build_rope_cache(64, 128, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_silu_and_mul_reference_matches_float64():
    x = torch.randn(3, 4, 2 * 50)
    expected = F.silu(x[..., :50].double()) * x[..., 50:].double()
    out = reference.silu_and_mul(x)
    assert out.shape == (3, 4, 50)
    assert relative_error(out, expected) < 1e-6


def test_pack_int8_vnni_round_trips_and_rejects_odd_shapes():
    q = torch.randint(-127, 128, (32, 12), dtype=torch.int8)
    packed, comp = reference.pack_int8_vnni(q)
    assert packed.shape == (2, 3, 16, 4)
    assert torch.equal(packed[1, 2, 5], q[16 + 5, 8:12])
    assert torch.equal(comp, q.int().sum(dim=1) * 128)
    x = torch.randn(3, 12)
    scale = torch.rand(32)
    assert torch.equal(
        reference.int8_packed_linear(x, packed, comp, scale),
        reference.int8_dynamic_linear(x, q, scale),
    )
    with pytest.raises(ValueError, match="cannot be packed"):
        reference.pack_int8_vnni(torch.zeros(24, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match="cannot be packed"):
        reference.pack_int8_vnni(torch.zeros(32, 10, dtype=torch.int8))
