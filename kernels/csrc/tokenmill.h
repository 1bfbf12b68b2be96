// What the C++ kernels share: the ops one kernel calls from another (decode_layers.cpp runs
// the others layer after layer), and vector helpers used by more than one file.
#pragma once

// The few ATen headers the kernels use, not <ATen/ATen.h>: that one declares every
// operator, and dropping it cuts each file's compile time by a quarter or more.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "simd.h"

// The op namespace, `tokenmill_<target>`: kernels/native.py builds these sources once per
// instruction set (-DTM_OPS=...), and the libraries load side by side, each under its own
// name. The indirection expands TM_OPS before TORCH_LIBRARY pastes it into identifiers.
#ifndef TM_OPS
#error "build through kernels/native.py, which defines TM_OPS"
#endif
#define TM_FRAGMENT_IN(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TM_OPS_FRAGMENT(m) TM_FRAGMENT_IN(TM_OPS, m)
#define TM_IMPL_IN(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
#define TM_OPS_IMPL(m) TM_IMPL_IN(TM_OPS, m)

namespace tokenmill {

// kernels/csrc/int8_gemm.cpp
at::Tensor int8_packed_linear(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& comp, const at::Tensor& scale);
at::Tensor int8_packed_swiglu(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& comp, const at::Tensor& scale,
                              const float* input_scale);

// kernels/csrc/paged_attention.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale);
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
              at::Tensor& v_cache, const at::Tensor& slot_mapping);

// kernels/csrc/layer_ops.cpp: the per-row passes, writing into preallocated outputs. An
// input scale multiplies each output last (the next linear's SmoothQuant scale).
// add_rms_norm_into writes x + residual to `sum`, which may be `residual` itself.
void add_rms_norm_into(const at::Tensor& x, const at::Tensor& residual, const float* weight,
                       const float* input_scale, float eps, at::Tensor& sum, at::Tensor& out);
void rotary_heads_into(const at::Tensor& qkv, const float* bias, const float* q_norm,
                       const float* k_norm, float eps, const int64_t* positions,
                       const float* rope, at::Tensor& q, at::Tensor& k, at::Tensor& v);
void silu_and_mul_into(const at::Tensor& gate_up, const float* input_scale, at::Tensor& out);
// SwiGLU of n values: out = silu(g) * u (times input_scale where given). One definition,
// out of line, for silu_and_mul_into and int8_packed_swiglu's epilogue, so that both round
// every value alike whatever the compiler would contract inline.
void swiglu_span(const float* g, const float* u, const float* input_scale, int64_t n,
                 float* out);
// Rows per task of a per-row pass `width` values wide: one thread up to ~32k values, where
// starting an OpenMP team costs more than the pass itself.
inline int64_t serial_grain(int64_t width) { return std::max<int64_t>(1, 32768 / width); }
// An optional float32 operand's data, checked to be contiguous with `numel` values; null
// where it is absent.
const float* data_or_null(const std::optional<at::Tensor>& t, int64_t numel);
void check_rotary_inputs(const at::Tensor& positions, const at::Tensor& rope_cache,
                         int64_t rows, int64_t head_dim);

}  // namespace tokenmill
