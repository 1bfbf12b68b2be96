"""The decoder layers on tokenmill's C++ kernels alone, for a model whose every linear runs
the C++ int8 GEMM (w8a8 with float32 activations) and whose attention runs the C++ decode kernel.

Two ways in, with the same per-row code (kernels/csrc/layer_ops.cpp):

* `native_dense_blocks`: `DenseBlocks` of C++ ops for prefill and mixed steps, in place of
  Inductor's compiled blocks. They need no compile and are as fast (the GEMMs dominate).
* `native_decode_layers`: a pure decode step's layers as one C++ call
  (kernels/csrc/decode_layers.cpp). A compiled decode graph still spent ~3 ms of a
  16-sequence step on two cores outside the kernels, in Dynamo's guards, Inductor's Python
  wrapper and an OpenMP team per small loop (docs/performance.md).

A row's floats go through the same operations in the same order on both, so a decode token
computes the same bits in a pure decode step as in a step shared with prefill chunks: the
default mode stays batch-invariant (tests/test_batch_invariance.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import kernels
import kernels.native
from engine.linear import CpuLinear
from engine.model import Attention, AttentionMetadata, CausalLM, DecoderLayer, DenseBlocks


def fits(model: CausalLM) -> bool:
    """Whether every layer can run on the C++ kernels alone: each linear on the C++ int8 GEMM
    (`CpuLinear.pack_for_vnni`), only the q/k/v projection with a bias, and decode attention
    in C++ (`engine.compilation.use_native_kernels` moves them)."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if attn.decode_attention is not kernels.native.paged_decode_attention:
            return False
        on_vnni = all(isinstance(m, CpuLinear) and m.on_vnni for m in linears)
        if not on_vnni or any(m.bias is not None for m in linears[1:]):
            return False
    return True


def _qk_norms(attn: Attention) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Qwen3's per-head q and k norm weights; None for models without them."""
    if attn.q_norm is None:
        return None, None
    return attn.q_norm.weight, attn.k_norm.weight


def _attention_input(
    layer: DecoderLayer,
    x: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    rope_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    norm, attn = layer.input_layernorm, layer.self_attn
    x, residual = kernels.native.add_rms_norm(
        x, residual, norm.weight, attn.qkv_proj.input_scale, norm.eps
    )
    q, k, v = kernels.native.rotary_heads(
        attn.qkv_proj.project(x), *_qk_norms(attn), positions.long(), rope_cache,
        attn.num_heads, attn.num_kv_heads, norm.eps,
    )  # fmt: skip
    return q, k, v, residual


def _attention_output_and_mlp(
    layer: DecoderLayer, attn: torch.Tensor, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    x, residual = kernels.native.add_rms_norm(
        layer.self_attn.o_proj(attn), residual, norm.weight, mlp.gate_up_proj.input_scale, norm.eps
    )
    act = kernels.native.silu_and_mul(mlp.gate_up_proj.project(x), mlp.down_proj.input_scale)
    return mlp.down_proj.project(act), residual


def native_dense_blocks() -> DenseBlocks:
    """`DenseBlocks` on the C++ per-row ops, for a model that `fits`."""
    return DenseBlocks(_attention_input, _attention_output_and_mlp, compiled=True)


def native_decode_layers(model: CausalLM) -> Callable:
    """`CausalLM.decode_layers` for a model that `fits`: all layers of a pure decode step in
    one `kernels.native.decode_layers` call."""
    weights: list[torch.Tensor | None] = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
        weights += [layer.input_layernorm.weight, *qkv.w8a8[1], qkv.input_scale, qkv.bias]
        weights += [*_qk_norms(attn), *o.w8a8[1], o.input_scale]
        weights += [layer.post_attention_layernorm.weight, *gate_up.w8a8[1], gate_up.input_scale]
        weights += [*down.w8a8[1], down.input_scale]
    first = model.layers[0]
    num_heads, eps, scale = (
        first.self_attn.num_heads,
        first.input_layernorm.eps,
        first.self_attn.scale,
    )

    def decode_layers(
        model: CausalLM,
        x: torch.Tensor,
        residual: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.native.decode_layers(
            x, residual, positions.long(), model.rope_cache, meta.block_tables,
            meta.context_lens, meta.slot_mapping, weights,
            [layer.self_attn.k_cache for layer in model.layers],
            [layer.self_attn.v_cache for layer in model.layers],
            num_heads, eps, scale,
        )  # fmt: skip

    return decode_layers
