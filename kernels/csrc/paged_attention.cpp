// Decode attention over the paged KV cache, and the cache write, for CPU decode steps.
//
// Why: kernels/cpu_ops.py runs decode attention as an index_select of every sequence's K/V
// into a padded batch plus one SDPA call, per layer. At 16 sequences of ~200 tokens that
// costs ~0.15 ms per layer, most of it the gather and SDPA's setup. Here each
// (sequence, KV head) reads its blocks in place: K and V are each read once for the whole
// GQA group, scores are kept in a small buffer, and the softmax is exact (max-subtracted).
//
// Semantics are those of kernels.reference.paged_decode_attention and write_kv: q [S, H, D]
// float32; caches [blocks, block_size, KVH, D] in float32 or bfloat16; block_tables [S, *]
// and context_lens [S] int32; a sequence with an empty context gets zeros.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;
constexpr int kMaxChunks = 8;   // head_dim up to 128
constexpr int kMaxGroup = 16;   // query heads per KV head

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

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

struct DecodeShape {
  int64_t block_size, kv_heads, group, table_stride;
  float scale;
};

// One sequence and KV head: the `group` query heads that share it, NC chunks of 16 dims.
template <int NC, typename T>
void attend(const float* q, const T* k_cache, const T* v_cache, const int32_t* table,
            int64_t ctx, int64_t kvh, const DecodeShape& s, float* out, std::vector<float>& buf) {
  constexpr int64_t D = NC * kLanes;
  const int64_t G = s.group;
  if (ctx == 0) {
    std::fill(out, out + G * D, 0.0f);
    return;
  }
  const int64_t row = s.kv_heads * D;  // elements between consecutive positions of a block
  buf.resize(static_cast<size_t>(G * ctx));
  __m512 qv[kMaxGroup][NC];
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < NC; ++c)
      qv[g][c] = _mm512_mul_ps(_mm512_loadu_ps(q + g * D + c * kLanes), _mm512_set1_ps(s.scale));
  float best[kMaxGroup];
  std::fill(best, best + G, -std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < ctx; ++t) {
    const T* kp = k_cache + (static_cast<int64_t>(table[t / s.block_size]) * s.block_size +
                             t % s.block_size) * row + kvh * D;
    __m512 kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = load16(kp + c * kLanes);
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(qv[g][c], kv[c], acc);
      const float score = _mm512_reduce_add_ps(acc);
      buf[g * ctx + t] = score;
      best[g] = std::max(best[g], score);
    }
  }
  float inv_total[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* p = buf.data() + g * ctx;
    const __m512 m = _mm512_set1_ps(best[g]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < ctx; t += kLanes) {
      const __mmask16 live = ctx - t >= kLanes ? 0xFFFF : (1u << (ctx - t)) - 1;
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + t), m));
      _mm512_mask_storeu_ps(p + t, live, e);
      sum = _mm512_mask_add_ps(sum, live, sum, e);
    }
    inv_total[g] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  __m512 acc[kMaxGroup][NC];
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ctx; ++t) {
    const T* vp = v_cache + (static_cast<int64_t>(table[t / s.block_size]) * s.block_size +
                             t % s.block_size) * row + kvh * D;
    __m512 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load16(vp + c * kLanes);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(buf[g * ctx + t]);
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(w, vv[c], acc[g][c]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < NC; ++c)
      _mm512_storeu_ps(out + g * D + c * kLanes,
                       _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv_total[g])));
}

template <int NC, typename T>
void decode_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& tables, const at::Tensor& lens, const DecodeShape& s,
                at::Tensor& out) {
  const int64_t seqs = q.size(0), heads = q.size(1), D = NC * kLanes;
  const float* qp = q.data_ptr<float>();
  const T* kp = reinterpret_cast<const T*>(k_cache.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v_cache.data_ptr());
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, seqs * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / s.kv_heads, kvh = task % s.kv_heads;
      const int64_t head = kvh * s.group;
      attend<NC, T>(qp + (seq * heads + head) * D, kp, vp, tp + seq * s.table_stride, lp[seq],
                    kvh, s, op + (seq * heads + head) * D, buf);
    }
  });
}

template <int NC>
void decode_dtype(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& tables, const at::Tensor& lens, const DecodeShape& s,
                  at::Tensor& out) {
  if (k.scalar_type() == at::kFloat) {
    decode_all<NC, float>(q, k, v, tables, lens, s, out);
  } else {
    decode_all<NC, c10::BFloat16>(q, k, v, tables, lens, s, out);
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat,
              "q must be a [seqs, heads, head_dim] float32 tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "the KV cache must be float32 or bfloat16");
  const int64_t seqs = q.size(0), heads = q.size(1), D = q.size(2);
  const int64_t blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % kLanes == 0 && D / kLanes <= kMaxChunks,
              "head_dim must be a multiple of 16 up to 128, and match the cache");
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup,
              "query heads must be a multiple of KV heads, at most 16 per KV head");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  block_tables.dim() == 2 && block_tables.size(0) == seqs &&
                  context_lens.numel() == seqs && block_tables.stride(1) == 1 &&
                  context_lens.is_contiguous(),
              "block_tables [seqs, *] and context_lens [seqs] must be int32");
  // Check every block a context reaches before any thread reads one.
  const int32_t* tp = block_tables.data_ptr<int32_t>();
  const int32_t* lp = context_lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < seqs; ++i) {
    const int64_t used = (static_cast<int64_t>(lp[i]) + block_size - 1) / block_size;
    TORCH_CHECK(lp[i] >= 0 && used <= block_tables.size(1), "context length out of range");
    for (int64_t b = 0; b < used; ++b) {
      const int32_t id = tp[i * block_tables.stride(0) + b];
      TORCH_CHECK(id >= 0 && id < blocks, "block id ", id, " outside the pool of ", blocks);
    }
  }
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);
  const DecodeShape s{block_size, kv_heads, heads / kv_heads, block_tables.stride(0),
                      static_cast<float>(scale)};
  switch (D / kLanes) {
    case 1: decode_dtype<1>(qc, k_cache, v_cache, block_tables, context_lens, s, out); break;
    case 2: decode_dtype<2>(qc, k_cache, v_cache, block_tables, context_lens, s, out); break;
    case 3: decode_dtype<3>(qc, k_cache, v_cache, block_tables, context_lens, s, out); break;
    case 4: decode_dtype<4>(qc, k_cache, v_cache, block_tables, context_lens, s, out); break;
    case 5: decode_dtype<5>(qc, k_cache, v_cache, block_tables, context_lens, s, out); break;
    case 6: decode_dtype<6>(qc, k_cache, v_cache, block_tables, context_lens, s, out); break;
    case 7: decode_dtype<7>(qc, k_cache, v_cache, block_tables, context_lens, s, out); break;
    default: decode_dtype<8>(qc, k_cache, v_cache, block_tables, context_lens, s, out); break;
  }
  return out;
}

// float32 -> bfloat16 rounding to nearest even, NaN to 0x7FC0: c10::BFloat16's rounding.
inline uint16_t to_bf16(float f) {
  return c10::BFloat16(f).x;
}

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
              at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() &&
                  key.scalar_type() == at::kFloat && value.scalar_type() == at::kFloat,
              "key and value must be [tokens, kv_heads, head_dim] float32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache must be alike and contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == key.size(0),
              "slot_mapping must hold one int64 slot per token");
  const int64_t tokens = key.size(0), width = key.size(1) * key.size(2);
  const int64_t slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(k_cache.numel() == slots * width, "the cache rows do not match key's shape");
  const at::Tensor kc = key.contiguous(), vc = value.contiguous();
  const at::Tensor sm = slot_mapping.contiguous();
  const int64_t* sp = sm.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i)
    TORCH_CHECK(sp[i] < slots, "slot ", sp[i], " outside the cache of ", slots);
  const float* src[2] = {kc.data_ptr<float>(), vc.data_ptr<float>()};
  void* dst[2] = {k_cache.data_ptr(), v_cache.data_ptr()};
  const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || k_cache.scalar_type() == at::kFloat, "the KV cache must be float32 or bfloat16");
  for (int which = 0; which < 2; ++which) {
    for (int64_t i = 0; i < tokens; ++i) {
      if (sp[i] < 0) continue;  // padding tokens have no slot
      const float* row = src[which] + i * width;
      if (bf16) {
        uint16_t* d = static_cast<uint16_t*>(dst[which]) + sp[i] * width;
        for (int64_t j = 0; j < width; ++j) d[j] = to_bf16(row[j]);
      } else {
        std::copy(row, row + width, static_cast<float*>(dst[which]) + sp[i] * width);
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
  m.def(
      "store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
  m.impl("store_kv", store_kv);
}
