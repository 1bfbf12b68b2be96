// All decoder layers of a CPU decode step in one call: norms, projections, rotary, the KV
// write, attention and the MLP, layer after layer, without returning to Python.
//
// Why: a torch.compile graph around the same GEMMs and attention spends about 3 ms of a
// ~18 ms 16-sequence decode step of SmolLM2-135M outside them (two cores), in Dynamo's
// guards, Inductor's Python wrapper (some 180 kernel calls and 750 size asserts a step) and
// one OpenMP team per small fused loop. Here the small passes (layer_ops.cpp) run on the
// calling thread below ~32k values, and only the GEMMs and attention fork.
//
// Semantics are those of kernels.reference.decode_layers: the w8a8 linears of
// int8_packed_linear (SmoothQuant input scales applied first), Hugging Face's RMSNorm and
// rotate-half rotary, optional q/k bias and per-head q/k norms (Qwen2, Qwen3). Every float
// operation on a row is the one engine/native_layers.py's blocks perform, in the same order,
// so both give the same bits. `weights` holds kPerLayer entries per layer in the order of
// TM_DECODE_LAYER_SLOTS below, the one definition of that layout: Python reads the names
// (the `decode_layer_slots` op, kernels/native.py) and fills the list by name.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "tokenmill.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

// One layer's entries of `weights`, in order: (enumerator, name Python fills it by). A linear
// is its packed weight, comp and scale (consecutive, as `linear` reads them), then its
// SmoothQuant input scale. Input scales, the q/k/v bias and the q/k norms may be None.
#define TM_DECODE_LAYER_SLOTS(X)                                                        \
  X(kInputNorm, "input_norm")                                                           \
  X(kQkv, "qkv_packed") X(kQkvComp, "qkv_comp") X(kQkvScale, "qkv_scale")               \
  X(kQkvInputScale, "qkv_input_scale") X(kQkvBias, "qkv_bias")                          \
  X(kQNorm, "q_norm") X(kKNorm, "k_norm")                                               \
  X(kO, "o_packed") X(kOComp, "o_comp") X(kOScale, "o_scale")                           \
  X(kOInputScale, "o_input_scale")                                                      \
  X(kPostNorm, "post_norm")                                                             \
  X(kGateUp, "gate_up_packed") X(kGateUpComp, "gate_up_comp")                           \
  X(kGateUpScale, "gate_up_scale") X(kGateUpInputScale, "gate_up_input_scale")          \
  X(kDown, "down_packed") X(kDownComp, "down_comp") X(kDownScale, "down_scale")         \
  X(kDownInputScale, "down_input_scale")

#define TM_SLOT_ENUMERATOR(enumerator, name) enumerator,
enum Slot : int64_t { TM_DECODE_LAYER_SLOTS(TM_SLOT_ENUMERATOR) kPerLayer };
#undef TM_SLOT_ENUMERATOR

std::vector<std::string> decode_layer_slots() {
#define TM_SLOT_NAME(enumerator, name) name,
  return {TM_DECODE_LAYER_SLOTS(TM_SLOT_NAME)};
#undef TM_SLOT_NAME
}

using Weights = std::vector<std::optional<at::Tensor>>;

void scale_columns(at::Tensor& x, const float* scale) {
  const int64_t rows = x.size(0), n = x.size(1);
  float* p = x.data_ptr<float>();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) p[i * n + j] *= scale[j];
}

at::Tensor linear(const at::Tensor& x, const Weights& w, int64_t slot) {
  return tokenmill::int8_packed_linear(x, *w[slot], *w[slot + 1], *w[slot + 2]);
}

// A layer's small float operands, each checked for its size; the norms must be there.
struct LayerData {
  const float *input_norm, *qkv_input_scale, *qkv_bias, *q_norm, *k_norm, *o_input_scale,
      *post_norm, *gate_up_input_scale, *down_input_scale;
};

LayerData layer_data(const Weights& w, int64_t base, int64_t hidden, int64_t heads,
                     int64_t kv_heads, int64_t d) {
  for (Slot slot : {kQkv, kQkvComp, kQkvScale, kO, kOComp, kOScale, kGateUp, kGateUpComp,
                    kGateUpScale, kDown, kDownComp, kDownScale})
    TORCH_CHECK(w[base + slot].has_value(), "a linear lacks its packed weight");
  const int64_t inter = w[base + kDown]->size(1) * 4;  // pack_int8_vnni: [out/16, in/4, 16, 4]
  const auto operand = [&](Slot slot, int64_t numel) {
    return tokenmill::data_or_null(w[base + slot], numel);
  };
  const LayerData data{operand(kInputNorm, hidden),
                       operand(kQkvInputScale, hidden),
                       operand(kQkvBias, (heads + 2 * kv_heads) * d),
                       operand(kQNorm, d),
                       operand(kKNorm, d),
                       operand(kOInputScale, heads * d),
                       operand(kPostNorm, hidden),
                       operand(kGateUpInputScale, hidden),
                       operand(kDownInputScale, inter)};
  TORCH_CHECK(data.input_norm != nullptr && data.post_norm != nullptr, "a layer lacks its norms");
  return data;
}

}  // namespace

namespace tokenmill {

std::tuple<at::Tensor, at::Tensor> decode_layers(
    const at::Tensor& x_in, const at::Tensor& residual_in, const at::Tensor& positions_in,
    const at::Tensor& rope_cache, const at::Tensor& block_tables, const at::Tensor& context_lens,
    const at::Tensor& slot_mapping, const c10::List<std::optional<at::Tensor>>& weights,
    at::TensorList k_caches, at::TensorList v_caches, int64_t num_heads, double eps,
    double scale) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && residual_in.sizes() == x_in.sizes() &&
                  residual_in.scalar_type() == at::kFloat,
              "x and residual must be alike [rows, hidden] float32");
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(layers > 0 && v_caches.size() == k_caches.size(), "one k and v cache per layer");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kPerLayer, "expected ",
              layers * kPerLayer, " weights (", kPerLayer, " per layer), got ", weights.size());
  const int64_t rows = x_in.size(0), hidden = x_in.size(1);
  const int64_t kv_heads = k_caches[0].size(2), d = k_caches[0].size(3);
  const at::Tensor positions = positions_in.contiguous();
  check_rotary_inputs(positions, rope_cache, rows, d);
  const int64_t* pos = positions.data_ptr<int64_t>();
  // Every operand is checked before the first cache write.
  const Weights w(weights.begin(), weights.end());
  std::vector<LayerData> data;
  for (int64_t l = 0; l < layers; ++l)
    data.push_back(layer_data(w, l * kPerLayer, hidden, num_heads, kv_heads, d));

  at::Tensor x = x_in.contiguous();
  at::Tensor residual = residual_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor normed = at::empty_like(residual);
  const auto opts = x.options();
  at::Tensor q = at::empty({rows, num_heads, d}, opts);
  at::Tensor k = at::empty({rows, kv_heads, d}, opts);
  at::Tensor v = at::empty({rows, kv_heads, d}, opts);
  const float* rope = rope_cache.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t b = l * kPerLayer;
    const LayerData& p = data[l];
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    add_rms_norm_into(x, residual, p.input_norm, p.qkv_input_scale, feps, residual, normed);
    const at::Tensor qkv = linear(normed, w, b + kQkv);
    rotary_heads_into(qkv, p.qkv_bias, p.q_norm, p.k_norm, feps, pos, rope, q, k, v);
    store_kv(k, v, k_cache, v_cache, slot_mapping);
    at::Tensor attn = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
                          .view({rows, num_heads * d});
    if (p.o_input_scale != nullptr) scale_columns(attn, p.o_input_scale);
    const at::Tensor o = linear(attn, w, b + kO);
    add_rms_norm_into(o, residual, p.post_norm, p.gate_up_input_scale, feps, residual, normed);
    const at::Tensor act = int8_packed_swiglu(normed, *w[b + kGateUp], *w[b + kGateUpComp],
                                              *w[b + kGateUpScale], p.down_input_scale);
    x = linear(act, w, b + kDown);
  }
  return {x, residual};
}

}  // namespace tokenmill

TM_OPS_FRAGMENT(m) {
  m.def(
      "decode_layers(Tensor x, Tensor residual, Tensor positions, Tensor rope_cache, "
      "Tensor block_tables, Tensor context_lens, Tensor slot_mapping, Tensor?[] weights, "
      "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int num_heads, float eps, float scale) "
      "-> (Tensor, Tensor)");
  // No tensor to dispatch on: one kernel for every dispatch key.
  m.def("decode_layer_slots() -> str[]", &decode_layer_slots);
}

TM_OPS_IMPL(m) { m.impl("decode_layers", tokenmill::decode_layers); }
