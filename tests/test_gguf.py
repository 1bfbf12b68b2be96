"""GGUF reading: dequantizers vs gguf's reference, q/k un-permutation, metadata -> config."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine.config import UnsupportedModelError
from engine.loader import load_model
from engine.loader.gguf import (
    GGUFFormatError,
    config_from_gguf,
    dequantize,
    read_gguf,
    unpermute_rotary,
)
from engine.loader.resolve import resolve_model

Q = GGMLQuantizationType
# Types gguf-py can quantize (we quantize real data) and types it can only dequantize
# (we feed it random blocks with sane fp16 scale fields).
QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16]
K_QUANTS = {  # byte offsets of the fp16 fields in each block
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}


def _random_blocks(qtype: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator):
    _, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in K_QUANTS[qtype]:
        scales = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference_on_quantized_data(qtype):
    data = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32)
    packed = gguf.quants.quantize(data, qtype)
    expected = gguf.quants.dequantize(packed, qtype)
    got = dequantize(torch.from_numpy(packed.view(np.uint8).copy()).flatten(), qtype, data.shape)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-6, atol=1e-6)
    # The quantization really happened: the result is close to, not equal to, the input.
    assert qtype == Q.BF16 or not np.array_equal(expected, data)


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda t: t.name)
def test_dequantize_k_quants_match_gguf_reference(qtype):
    raw = _random_blocks(qtype, 64, np.random.default_rng(1))
    expected = gguf.quants.dequantize(raw, qtype).reshape(16, 1024)
    got = dequantize(torch.from_numpy(raw).flatten(), qtype, (16, 1024))
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16], ids=lambda t: t.name)
def test_float_types_are_reinterpreted(qtype):
    data = (
        np.random.default_rng(2)
        .standard_normal((4, 8))
        .astype(np.float32 if qtype == Q.F32 else np.float16)
    )
    got = dequantize(torch.from_numpy(data.view(np.uint8).copy()).flatten(), qtype, (4, 8))
    torch.testing.assert_close(got, torch.from_numpy(data.astype(np.float32)))


def test_dequantize_casts_to_requested_dtype():
    data = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    packed = gguf.quants.quantize(data, Q.Q8_0)
    expected = torch.from_numpy(gguf.quants.dequantize(packed, Q.Q8_0)).to(torch.bfloat16)
    got = dequantize(torch.from_numpy(packed).flatten(), Q.Q8_0, (8, 64), torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unsupported_tensor_type_names_the_supported_ones():
    _, size = GGML_QUANT_SIZES[Q.Q2_K]
    with pytest.raises(UnsupportedModelError, match=r"Q2_K is not supported.*Q4_K"):
        dequantize(torch.zeros(size, dtype=torch.uint8), Q.Q2_K, (256,))


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files written the way llama.cpp's converter writes them.

_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"


def _converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's reordering of Llama q/k rows (re-implemented)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def write_gguf(
    path: Path,
    arch: str,
    cfg,
    state: dict[str, torch.Tensor],
    qtype: GGMLQuantizationType = Q.F32,
    extra=None,
) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(_head_dim(cfg))
    w.add_value_length(_head_dim(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    if extra:
        extra(w)
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            data = _converter_permute(data, heads)
        if data.ndim == 2 and qtype != Q.F32:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(_gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def _tiny(arch: str, **kw):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(**_TINY, head_dim=16, tie_word_embeddings=False, **kw)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(**_TINY, tie_word_embeddings=True, **kw)
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = Qwen3Config(**_TINY, head_dim=32, tie_word_embeddings=True, **kw)
        model = Qwen3ForCausalLM(cfg)
    # Randomise the norms too, so a swapped or missing norm would show.
    state = {
        k: v + torch.randn_like(v) * 0.1 if k.endswith("norm.weight") else v
        for k, v in model.state_dict().items()
    }
    return cfg, state


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_round_trip_restores_hf_weights(tmp_path, arch):
    cfg, state = _tiny(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, cfg, state)
    loaded = load_model(str(path))
    c = loaded.config
    assert (
        c.architecture,
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
    ) == (arch, 64, 2, 4, 2, _head_dim(cfg), 96)
    assert c.tie_word_embeddings == cfg.tie_word_embeddings
    assert c.attention_bias == (arch == "qwen2")
    assert c.qk_norm == (arch == "qwen3")
    expected = {
        k: v for k, v in state.items() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    }
    assert loaded.weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded.weights[name], tensor, rtol=0, atol=0, msg=name)
    assert loaded.tokenizer is None  # the tiny file carries no vocabulary


def test_unpermute_inverts_the_converter_permutation():
    w = np.random.default_rng(4).standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = torch.from_numpy(_converter_permute(w, 3))
    assert not torch.equal(permuted, torch.from_numpy(w))
    torch.testing.assert_close(unpermute_rotary(permuted, 3), torch.from_numpy(w))


def test_quantized_gguf_round_trip_in_half_precision(tmp_path):
    cfg, state = _tiny("llama")
    path = tmp_path / "tiny-q8.gguf"
    write_gguf(path, "llama", cfg, state, qtype=Q.Q8_0)
    loaded = load_model(str(path), dtype=torch.float16)
    q = loaded.weights["model.layers.1.self_attn.q_proj.weight"]
    assert q.dtype == torch.float16
    # Q8_0 keeps ~2-3 significant digits; a row permutation error would be O(1).
    torch.testing.assert_close(
        q.float(), state["model.layers.1.self_attn.q_proj.weight"], rtol=0, atol=2e-3
    )


def _llama3_rope_freqs(theta, head_dim, factor, low, high, orig):
    """The per-frequency divisors llama.cpp writes as rope_freqs for llama3 scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize(
    "scaling", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 2.0, 4096)]
)
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, scaling):
    factor, low, high, orig = scaling
    freqs = _llama3_rope_freqs(500000.0, 128, factor, low, high, orig)
    gf_path = tmp_path / "rope.gguf"
    w = gguf.GGUFWriter(str(gf_path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(512)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_key_length(128)
    w.add_rope_freq_base(500000.0)
    w.add_tensor("rope_freqs.weight", freqs)
    w.add_tensor("token_embd.weight", np.zeros((8, 512), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rs = config_from_gguf(read_gguf(gf_path)).rope_scaling
    assert rs["rope_type"] == "llama3"
    assert rs["factor"] == pytest.approx(factor)
    assert rs["low_freq_factor"] == pytest.approx(low, rel=1e-3)
    assert rs["high_freq_factor"] == pytest.approx(high, rel=1e-3)
    assert rs["original_max_position_embeddings"] == orig


def test_linear_rope_scaling_from_metadata(tmp_path):
    cfg, state = _tiny("qwen2")

    def extra(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32768)

    path = tmp_path / "yarn.gguf"
    write_gguf(path, "qwen2", cfg, state, extra=extra)
    assert config_from_gguf(read_gguf(path)).rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }


def test_unsupported_architecture_is_rejected(tmp_path):
    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(path), "gemma")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"'gemma'.*llama, qwen2, qwen3"):
        load_model(str(path))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        load_model(str(path))


def test_truncated_gguf_file(tmp_path):
    cfg, state = _tiny("qwen3")
    path = tmp_path / "cut.gguf"
    write_gguf(path, "qwen3", cfg, state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFFormatError, match="truncated"):
        load_model(str(path))


# ---------------------------------------------------------------------------------------------
# The default model.


@pytest.fixture(scope="module")
def default_gguf():
    return read_gguf(resolve_model("smollm2-135m-instruct").path)


def test_default_model_config(default_gguf):
    c = config_from_gguf(default_gguf)
    assert (
        c.architecture,
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    ) == ("llama", 49152, 576, 1536, 30, 9, 3, 64)
    assert c.rope_theta == 100000.0
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.tie_word_embeddings
    assert c.rope_scaling is None
    assert (c.bos_token_id, c.eos_token_ids) == (1, [2])


def test_default_model_tensors_match_gguf_reference(default_gguf):
    gf = default_gguf
    for name in ("token_embd.weight", "blk.3.ffn_down.weight", "blk.0.attn_norm.weight"):
        info = gf.tensors[name]
        expected = gguf.quants.dequantize(gf.raw(info).numpy(), info.ggml_type)
        got = dequantize(gf.raw(info), info.ggml_type, info.shape)
        torch.testing.assert_close(got, torch.from_numpy(expected).reshape(info.shape))


def test_default_model_loads_all_weights():
    loaded = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    assert len(loaded.weights) == 2 + 30 * 9
    assert "lm_head.weight" not in loaded.weights
    assert all(t.dtype == torch.bfloat16 for t in loaded.weights.values())
    assert loaded.weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert loaded.tokenizer is not None


def test_gguf_with_unsupported_tensor_type_fails_before_loading(tmp_path):
    path = tmp_path / "q2k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(0)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(2)
    _, size = GGML_QUANT_SIZES[Q.Q2_K]
    w.add_tensor("token_embd.weight", np.zeros((4, size), np.uint8), raw_dtype=Q.Q2_K)
    w.add_tensor("output_norm.weight", np.ones(256, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"Q2_K is not supported.*Q4_K_M"):
        load_model(str(path))
