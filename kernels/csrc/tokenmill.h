// What the C++ kernels share: the ops one kernel calls from another (decode_layers.cpp runs
// the others layer after layer), and vector helpers used by more than one file.
#pragma once

#include <ATen/ATen.h>

#include <immintrin.h>

#include <optional>

namespace tokenmill {

// kernels/csrc/int8_gemm.cpp
at::Tensor int8_packed_linear(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& comp, const at::Tensor& scale);

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
// An optional float32 operand's data, checked to be contiguous with `numel` values; null
// where it is absent.
const float* data_or_null(const std::optional<at::Tensor>& t, int64_t numel);
void check_rotary_inputs(const at::Tensor& positions, const at::Tensor& rope_cache,
                         int64_t rows, int64_t head_dim);

// exp(x) for x <= 0 to about 2 ulp: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace tokenmill
