// The small per-row passes of a decoder layer on CPU: residual add and RMSNorm, the q/k/v
// split with rotary, and SwiGLU. decode_layers.cpp runs them inside its one-call decode
// step, and engine/native_layers.py calls the same code as ops for prefill and mixed steps,
// so a token's result does not depend on which of the two paths its step took.
//
// Each row is computed on its own, in a fixed order of float operations, whatever the row
// count or thread split: the engine's batch invariance rests on it. Semantics are those of
// kernels.reference.rms_norm, apply_rotary (rotate-half) and silu_and_mul, to float rounding.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "tokenmill.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace {

using tokenmill::simd::F16;
using tokenmill::simd::kLanes;
namespace simd = tokenmill::simd;
constexpr int64_t kMaxHeadDim = 128;

// One head of `d` values: plus bias, RMSNorm with `norm` (both optional), then rotate-half
// rotary with cos = cs[0, d/2) and sin = cs[d/2, d) unless cs is null, into dst.
void head_in(const float* src, const float* bias, const float* norm, float eps, const float* cs,
             int64_t d, float* dst) {
  float t[kMaxHeadDim];
  for (int64_t j = 0; j < d; ++j) t[j] = bias != nullptr ? src[j] + bias[j] : src[j];
  if (norm != nullptr) {
    float sum = 0.0f;
    for (int64_t j = 0; j < d; ++j) sum += t[j] * t[j];
    const float r = 1.0f / std::sqrt(sum / d + eps);
    for (int64_t j = 0; j < d; ++j) t[j] = norm[j] * (t[j] * r);
  }
  if (cs == nullptr) {
    std::copy(t, t + d, dst);
    return;
  }
  const int64_t half = d / 2;
  for (int64_t j = 0; j < half; ++j) {
    dst[j] = t[j] * cs[j] - t[j + half] * cs[half + j];
    dst[j + half] = t[j + half] * cs[j] + t[j] * cs[half + j];
  }
}

}  // namespace

namespace tokenmill {

const float* data_or_null(const std::optional<at::Tensor>& t, int64_t numel) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel,
              "expected a contiguous float32 tensor of ", numel, " values");
  return t->data_ptr<float>();
}

void add_rms_norm_into(const at::Tensor& x, const at::Tensor& residual, const float* weight,
                       const float* input_scale, float eps, at::Tensor& sum, at::Tensor& out) {
  const int64_t rows = x.size(0), h = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, serial_grain(h), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = xp + i * h;
      const float* rr = rp + i * h;
      float* sr = sp + i * h;
      float* orow = op + i * h;
      F16 squares = simd::zero();
      for (int64_t j = 0; j < h; j += kLanes) {
        const int64_t m = h - j;
        const F16 v = simd::add(simd::load_first(xr + j, m), simd::load_first(rr + j, m));
        simd::store_first(sr + j, v, m);
        squares = simd::fmadd(v, v, squares);
      }
      const F16 r = simd::set1(1.0f / std::sqrt(simd::reduce_add(squares) / h + eps));
      for (int64_t j = 0; j < h; j += kLanes) {
        const int64_t m = h - j;
        F16 v = simd::mul(simd::load_first(sr + j, m), r);
        v = simd::mul(simd::load_first(weight + j, m), v);
        if (input_scale != nullptr) v = simd::mul(v, simd::load_first(input_scale + j, m));
        simd::store_first(orow + j, v, m);
      }
    }
  });
}

void rotary_heads_into(const at::Tensor& qkv, const float* bias, const float* q_norm,
                       const float* k_norm, float eps, const int64_t* positions,
                       const float* rope, at::Tensor& q, at::Tensor& k, at::Tensor& v) {
  const int64_t rows = q.size(0), heads = q.size(1), kv_heads = k.size(1), d = q.size(2);
  const int64_t width = qkv.size(1), kv_offset = heads * d;
  const float* src = qkv.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  at::parallel_for(0, rows, serial_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = src + i * width;
      const float* cs = rope + positions[i] * d;
      for (int64_t h = 0; h < heads; ++h)
        head_in(row + h * d, bias ? bias + h * d : nullptr, q_norm, eps, cs, d,
                qp + (i * heads + h) * d);
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t kc = kv_offset + h * d, vc = kv_offset + (kv_heads + h) * d;
        head_in(row + kc, bias ? bias + kc : nullptr, k_norm, eps, cs, d,
                kp + (i * kv_heads + h) * d);
        head_in(row + vc, bias ? bias + vc : nullptr, nullptr, eps, nullptr, d,
                vp + (i * kv_heads + h) * d);
      }
    }
  });
}

void swiglu_span(const float* g, const float* u, const float* input_scale, int64_t n,
                 float* out) {
  const F16 one = simd::set1(1.0f);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t m = n - j;
    const F16 gv = simd::load_first(g + j, m);
    // sigmoid from exp(-|g|), which never overflows
    const F16 e = simd::exp_nonpositive(simd::sub(simd::zero(), simd::abs(gv)));
    const F16 sigmoid = simd::div(simd::select_negative(gv, e, one), simd::add(one, e));
    F16 v = simd::mul(simd::mul(gv, sigmoid), simd::load_first(u + j, m));
    if (input_scale != nullptr) v = simd::mul(v, simd::load_first(input_scale + j, m));
    simd::store_first(out + j, v, m);
  }
}

void silu_and_mul_into(const at::Tensor& gate_up, const float* input_scale, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, serial_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* g = gp + i * 2 * n;
      swiglu_span(g, g + n, input_scale, n, op + i * n);
    }
  });
}

void check_rotary_inputs(const at::Tensor& positions, const at::Tensor& rope_cache,
                         int64_t rows, int64_t head_dim) {
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "head_dim must be even and at most ",
              kMaxHeadDim);
  TORCH_CHECK(rope_cache.dim() == 2 && rope_cache.size(1) == head_dim &&
                  rope_cache.scalar_type() == at::kFloat && rope_cache.is_contiguous(),
              "rope_cache must be contiguous float32 [positions, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == rows,
              "positions must hold one int64 per row");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < rope_cache.size(0), "position ", pos[i], " out of range");
}

// The ops: functional versions of the passes above for engine/native_layers.py. An input
// scale (the next linear's SmoothQuant scale) multiplies each output last, rounded as a
// separate multiply would round it.

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight,
                                                const std::optional<at::Tensor>& input_scale,
                                                double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == at::kFloat,
              "x and residual must be alike [rows, hidden] float32");
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  at::Tensor sum = at::empty_like(xc), out = at::empty_like(xc);
  const int64_t h = x.size(1);
  add_rms_norm_into(xc, rc, data_or_null(weight, h), data_or_null(input_scale, h),
                    static_cast<float>(eps), sum, out);
  return {out, sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rotary_heads(
    const at::Tensor& qkv, const std::optional<at::Tensor>& q_norm,
    const std::optional<at::Tensor>& k_norm, const at::Tensor& positions,
    const at::Tensor& rope_cache, int64_t num_heads, int64_t num_kv_heads, double eps) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat, "qkv must be 2-D float32");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && qkv.size(1) % (num_heads + 2 * num_kv_heads) == 0,
              "qkv's width must split into ", num_heads, " + 2 x ", num_kv_heads, " heads");
  const int64_t rows = qkv.size(0), d = qkv.size(1) / (num_heads + 2 * num_kv_heads);
  const at::Tensor pos = positions.contiguous();
  check_rotary_inputs(pos, rope_cache, rows, d);
  const at::Tensor src = qkv.contiguous();
  at::Tensor q = at::empty({rows, num_heads, d}, qkv.options());
  at::Tensor k = at::empty({rows, num_kv_heads, d}, qkv.options());
  at::Tensor v = at::empty({rows, num_kv_heads, d}, qkv.options());
  rotary_heads_into(src, nullptr, data_or_null(q_norm, d), data_or_null(k_norm, d),
                    static_cast<float>(eps), pos.data_ptr<int64_t>(), rope_cache.data_ptr<float>(), q,
                    k, v);
  return {q, k, v};
}

at::Tensor silu_and_mul(const at::Tensor& gate_up, const std::optional<at::Tensor>& input_scale) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kFloat && gate_up.size(1) % 2 == 0,
              "gate_up must be [rows, 2 * n] float32");
  const at::Tensor src = gate_up.contiguous();
  at::Tensor out = at::empty({src.size(0), src.size(1) / 2}, src.options());
  silu_and_mul_into(src, data_or_null(input_scale, out.size(1)), out);
  return out;
}

}  // namespace tokenmill

TM_OPS_FRAGMENT(m) {
  m.def(
      "add_rms_norm(Tensor x, Tensor residual, Tensor weight, Tensor? input_scale, float eps) "
      "-> (Tensor, Tensor)");
  m.def(
      "rotary_heads(Tensor qkv, Tensor? q_norm, Tensor? k_norm, Tensor positions, "
      "Tensor rope_cache, int num_heads, int num_kv_heads, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up, Tensor? input_scale) -> Tensor");
}

TM_OPS_IMPL(m) {
  m.impl("add_rms_norm", tokenmill::add_rms_norm);
  m.impl("rotary_heads", tokenmill::rotary_heads);
  m.impl("silu_and_mul", tokenmill::silu_and_mul);
}
