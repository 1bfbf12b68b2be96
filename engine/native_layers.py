"""The decoder layers on tokenmill's C++ kernels alone, for a backend (engine/backend.py) that
`fits`: every linear of every layer packed for the C++ int8 GEMM (w8a8 with float32
activations) and attention in the C++ kernels. `native_backend` completes such a backend
with two ways in, on the same per-row code (kernels/csrc/layer_ops.cpp):

* its `DenseBlocks`, of C++ ops, for prefill and mixed steps, in place of Inductor's
  compiled blocks. They need no compile and are as fast (the GEMMs dominate).
* `native_decode_layers`: a pure decode step's layers as one C++ call
  (kernels/csrc/decode_layers.cpp), its operands laid out once by the slot names that file
  defines (`decode_slots`). A compiled decode graph still spent ~3 ms of a 16-sequence step
  on two cores outside the kernels, in Dynamo's guards, Inductor's Python wrapper and an
  OpenMP team per small loop (docs/performance.md).

A row's floats go through the same operations in the same order on both, so a decode token
computes the same bits in a pure decode step as in a step shared with prefill chunks: the
default mode stays batch-invariant (tests/test_batch_invariance.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

import kernels
import kernels.native
from engine.backend import Backend, PackedLayer
from engine.model import Attention, AttentionMetadata, CausalLM, DecoderLayer, DenseBlocks


def fits(model: CausalLM, backend: Backend) -> bool:
    """Whether every layer can run on the C++ kernels alone under `backend`: decode attention
    in C++, each linear of every layer packed for the C++ int8 GEMM, and only the q/k/v
    projection with a bias (`engine.compilation.with_native_kernels` builds such a
    backend)."""
    if backend.decode_attention is not kernels.native.paged_decode_attention:
        return False
    for layer, packed in zip(model.layers, backend.packed, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        if any(p is None for p in packed):
            return False
        if any(m.bias is not None for m in (attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
            return False
    return True


def native_backend(model: CausalLM, backend: Backend) -> Backend:
    """`backend` (one that `fits`) with the blocks and the decode stack below."""
    return dataclasses.replace(
        backend,
        blocks=DenseBlocks(_attention_input, _attention_output_and_mlp, compiled=True),
        decode_layers=native_decode_layers(model, backend),
    )


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
    packed: PackedLayer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    norm, attn = layer.input_layernorm, layer.self_attn
    x, residual = kernels.native.add_rms_norm(
        x, residual, norm.weight, attn.qkv_proj.input_scale, norm.eps
    )
    q, k, v = kernels.native.rotary_heads(
        attn.qkv_proj.project(x, packed.qkv), *_qk_norms(attn), positions.long(), rope_cache,
        attn.num_heads, attn.num_kv_heads, norm.eps,
    )  # fmt: skip
    return q, k, v, residual


def _attention_output_and_mlp(
    layer: DecoderLayer, attn: torch.Tensor, residual: torch.Tensor, packed: PackedLayer
) -> tuple[torch.Tensor, torch.Tensor]:
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    x, residual = kernels.native.add_rms_norm(
        layer.self_attn.o_proj(attn, packed.o), residual, norm.weight,
        mlp.gate_up_proj.input_scale, norm.eps,
    )  # fmt: skip
    if packed.gate_up is None:
        act = kernels.native.silu_and_mul(mlp.gate_up_proj.project(x), mlp.down_proj.input_scale)
    else:  # SwiGLU in the GEMM's epilogue: the gate_up output is never written out
        act = kernels.native.int8_packed_swiglu(x, *packed.gate_up, mlp.down_proj.input_scale)
    return mlp.down_proj.project(act, packed.down), residual


def decode_slots(layer: DecoderLayer, packed: PackedLayer) -> dict[str, torch.Tensor | None]:
    """A layer's operands of the one-call decode stack, by the names of
    `kernels.native.decode_layer_slots` (kernels/csrc/decode_layers.cpp defines their order):
    norms, then each linear's packed weight, comp, scale and SmoothQuant input scale."""
    attn, mlp = layer.self_attn, layer.mlp
    q_norm, k_norm = _qk_norms(attn)
    slots = {
        "input_norm": layer.input_layernorm.weight,
        "qkv_bias": attn.qkv_proj.bias,
        "q_norm": q_norm,
        "k_norm": k_norm,
        "post_norm": layer.post_attention_layernorm.weight,
    }
    linears = {
        "qkv": (attn.qkv_proj, packed.qkv),
        "o": (attn.o_proj, packed.o),
        "gate_up": (mlp.gate_up_proj, packed.gate_up),
        "down": (mlp.down_proj, packed.down),
    }
    for name, (linear, (weight, comp, scale)) in linears.items():
        slots |= {f"{name}_packed": weight, f"{name}_comp": comp, f"{name}_scale": scale}
        slots[f"{name}_input_scale"] = linear.input_scale
    return slots


def native_decode_layers(model: CausalLM, backend: Backend) -> Callable:
    """A decode stack for a backend that `fits`: all layers of a pure decode step in one
    `kernels.native.decode_layers` call."""
    weights = kernels.native.decode_layer_weights(
        [decode_slots(layer, p) for layer, p in zip(model.layers, backend.packed, strict=True)]
    )
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
