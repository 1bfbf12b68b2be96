// Decode attention over the paged KV cache, and the cache write, for CPU decode steps.
//
// Why: kernels/cpu_ops.py runs decode attention as an index_select of every sequence's K/V
// into a padded batch plus one SDPA call, per layer: 0.28 ms per layer at 16 sequences of
// 200 tokens on this project's 2-core machine, against 0.08 ms here (cache-hot; in a real
// step, where K/V come from memory, 0.14 ms). Each (sequence, KV head) reads its blocks in
// place, once for the whole GQA group, with an online softmax (flash-decoding's running max
// and sum), so nothing is gathered or buffered, and it cannot be traced into graph breaks:
// engine/compilation.py compiles whole decode steps around it.
//
// Prefill attention is the same kernel once per query token, over the context up to and
// including its own position: it reads only the causal half of the scores (SDPA with a mask
// computes all of them), and a token's result is the one a decode step would compute.
//
// Semantics are those of kernels.reference.paged_decode_attention, paged_prefill_attention
// and write_kv: q [tokens, H, D] float32; caches [blocks, block_size, KVH, D] in float32 or
// bfloat16; block_tables [S, *] and context_lens [S] int32; a sequence with an empty context
// gets zeros.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "tokenmill.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using tokenmill::simd::F16;
using tokenmill::simd::kLanes;
namespace simd = tokenmill::simd;
constexpr int kMaxGroup = 8;  // query heads per KV head
constexpr int kMaxPass = 4;   // query heads one pass over a KV head's context serves

// A cache row of NC * 16 values as NC vectors. On AVX-512, bfloat16 rows of whole 32-value
// groups load 32 at a time and widen with one instruction per 16: even-indexed values come
// out of a shift, odd-indexed ones out of a mask, so vector 2j holds values 32j + 0, 2, ..,
// 30 and vector 2j + 1 values 32j + 1, 3, .., 31 (`kernel order`). Queries are permuted the
// same way and outputs back, which a dot product or a weighted sum of rows does not notice.
// Other targets widen 16 values at a time in natural order.
template <int NC>
inline void load_row(const float* p, F16* out) {
  for (int c = 0; c < NC; ++c) out[c] = simd::load(p + c * kLanes);
}

#if defined(__AVX512F__)
template <int NC, typename T>
constexpr bool kSplitsPairs = std::is_same_v<T, c10::BFloat16> && NC % 2 == 0;

template <int NC>
inline void load_row(const c10::BFloat16* p, F16* out) {
  if constexpr (NC % 2 == 0) {
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int c = 0; c < NC; c += 2) {
      const __m512i x = _mm512_loadu_si512(p + c * kLanes);
      out[c].v = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      out[c + 1].v = _mm512_castsi512_ps(_mm512_and_si512(x, high));
    }
  } else {
    for (int c = 0; c < NC; ++c) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + c * kLanes));
      out[c].v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}
#else
template <int NC, typename T>
constexpr bool kSplitsPairs = false;

#if defined(__AVX2__)
inline __m256 widen8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <int NC>
inline void load_row(const c10::BFloat16* p, F16* out) {
  for (int c = 0; c < NC; ++c) out[c] = {widen8(p + c * kLanes), widen8(p + c * kLanes + 8)};
}
#else
template <int NC>
inline void load_row(const c10::BFloat16* p, F16* out) {
  for (int c = 0; c < NC; ++c)
    for (int64_t i = 0; i < kLanes; ++i) {
      const uint32_t bits = static_cast<uint32_t>(p[c * kLanes + i].x) << 16;
      std::memcpy(&out[c].v[i], &bits, sizeof(bits));
    }
}
#endif
#endif

// A float32 row (a query) into kernel order, times `scale`.
template <int NC, typename T>
inline void to_kernel_order(const float* x, float scale, F16* out) {
  const F16 sv = simd::set1(scale);
#if defined(__AVX512F__)
  if constexpr (kSplitsPairs<NC, T>) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int c = 0; c < NC; c += 2) {
      const __m512 lo = _mm512_loadu_ps(x + c * kLanes), hi = _mm512_loadu_ps(x + (c + 1) * kLanes);
      out[c].v = _mm512_mul_ps(_mm512_permutex2var_ps(lo, even, hi), sv.v);
      out[c + 1].v = _mm512_mul_ps(_mm512_permutex2var_ps(lo, odd, hi), sv.v);
    }
    return;
  }
#endif
  for (int c = 0; c < NC; ++c) out[c] = simd::mul(simd::load(x + c * kLanes), sv);
}

// Vectors in kernel order, times `scale`, back to a float32 row in natural order.
template <int NC, typename T>
inline void from_kernel_order(const F16* v, float scale, float* out) {
  const F16 sv = simd::set1(scale);
#if defined(__AVX512F__)
  if constexpr (kSplitsPairs<NC, T>) {
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int c = 0; c < NC; c += 2) {
      const __m512 e = _mm512_mul_ps(v[c].v, sv.v), o = _mm512_mul_ps(v[c + 1].v, sv.v);
      _mm512_storeu_ps(out + c * kLanes, _mm512_permutex2var_ps(e, first, o));
      _mm512_storeu_ps(out + (c + 1) * kLanes, _mm512_permutex2var_ps(e, second, o));
    }
    return;
  }
#endif
  for (int c = 0; c < NC; ++c) simd::store(out + c * kLanes, simd::mul(v[c], sv));
}

struct DecodeShape {
  int64_t block_size, kv_heads, table_stride;
  float scale;
};

// One sequence and KV head: the G query heads that share it, NC vectors of 16 dimensions.
// One pass over the context, 16 positions at a time, with an online softmax (flash-decoding's
// running max and sum, accumulators rescaled when the max grows). Each K and V row is loaded
// and widened once for the whole group; the G x NC accumulators stay in registers.
template <int NC, int G, typename T>
void attend(const float* q, const T* k_cache, const T* v_cache, const int32_t* table,
            int64_t ctx, int64_t kvh, const DecodeShape& s, float* out) {
  constexpr int64_t D = NC * kLanes;
  if (ctx == 0) {
    std::fill(out, out + G * D, 0.0f);
    return;
  }
  const int64_t row = s.kv_heads * D;  // elements between consecutive positions of a block
  F16 qv[G][NC], acc[G][NC], total[G];  // total: softmax denominators, lane-wise
  float best[G];
  for (int g = 0; g < G; ++g) {
    to_kernel_order<NC, T>(q + g * D, s.scale, qv[g]);
    for (int c = 0; c < NC; ++c) acc[g][c] = simd::zero();
    best[g] = -std::numeric_limits<float>::infinity();
    total[g] = simd::zero();
  }
  F16 part[G][kLanes];
  alignas(64) float p[G][kLanes];
  // A position's cache slot; block sizes are powers of two (checked), so no division.
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(s.block_size));
  const int64_t mask = s.block_size - 1;
  auto slot = [&](int64_t t) {
    return (static_cast<int64_t>(table[t >> shift]) << shift) | (t & mask);
  };
  for (int64_t t0 = 0; t0 < ctx; t0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, ctx - t0));
    // Start the next chunk's rows on their way from memory, into L2 (prefetcht1): on an AMD
    // Zen 4 host a decode step's attention ran twice as fast as with the same prefetches into
    // L1 (prefetcht0), and a quarter faster with slots computed here than read back from a
    // buffer the same loop had just written.
    for (int64_t t = t0 + kLanes; t < std::min<int64_t>(ctx, t0 + 2 * kLanes); ++t) {
      const char* k_row = reinterpret_cast<const char*>(k_cache + slot(t) * row + kvh * D);
      const char* v_row = reinterpret_cast<const char*>(v_cache + slot(t) * row + kvh * D);
      for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) {
        __builtin_prefetch(k_row + b, 0, 2);
        __builtin_prefetch(v_row + b, 0, 2);
      }
    }
    const T* rows_k[kLanes];
    const T* rows_v[kLanes];
    for (int i = 0; i < n; ++i) {
      rows_k[i] = k_cache + slot(t0 + i) * row + kvh * D;
      rows_v[i] = v_cache + slot(t0 + i) * row + kvh * D;
    }
    for (int i = 0; i < n; ++i) {
      F16 k[NC];
      load_row<NC>(rows_k[i], k);
      for (int g = 0; g < G; ++g) {
        F16 a = simd::mul(qv[g][0], k[0]);
        for (int c = 1; c < NC; ++c) a = simd::fmadd(qv[g][c], k[c], a);
        part[g][i] = a;
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int i = n; i < kLanes; ++i) part[g][i] = simd::zero();
      const F16 scores = simd::sum16(part[g]);
      const float chunk_best = simd::reduce_max_first(scores, n);
      if (chunk_best > best[g]) {  // rare after the first chunks: rescale what came before
        const F16 rescale = simd::set1(std::exp(best[g] - chunk_best));  // 0 at first
        total[g] = simd::mul(total[g], rescale);
        for (int c = 0; c < NC; ++c) acc[g][c] = simd::mul(acc[g][c], rescale);
        best[g] = chunk_best;
      }
      const F16 e = simd::keep_first(
          simd::exp_nonpositive(simd::sub(scores, simd::set1(best[g]))), n);
      simd::store(p[g], e);
      total[g] = simd::add(total[g], e);
    }
#if defined(__AVX512F__)
    for (int i = 0; i < n; ++i) {
      F16 v[NC];
      load_row<NC>(rows_v[i], v);
      for (int g = 0; g < G; ++g) {
        const F16 w = simd::set1(p[g][i]);
        for (int c = 0; c < NC; ++c) acc[g][c] = simd::fmadd(w, v[c], acc[g][c]);
      }
    }
#else
    // Elsewhere an F16 takes two registers or more, and a group's G x NC accumulators do
    // not fit in AVX2's sixteen: one 16-dimension slice at a time keeps that slice's G in
    // registers. Each accumulator still adds the positions in order: the same sums.
    for (int c = 0; c < NC; ++c) {
      F16 slice[G];
      for (int g = 0; g < G; ++g) slice[g] = acc[g][c];
      for (int i = 0; i < n; ++i) {
        F16 v;
        load_row<1>(rows_v[i] + c * kLanes, &v);
        for (int g = 0; g < G; ++g) slice[g] = simd::fmadd(simd::set1(p[g][i]), v, slice[g]);
      }
      for (int g = 0; g < G; ++g) acc[g][c] = slice[g];
    }
#endif
  }
  for (int g = 0; g < G; ++g)
    from_kernel_order<NC, T>(acc[g], 1.0f / simd::reduce_add(total[g]), out + g * D);
}

// Query rows, each attending to a context of its own: row r reads table row seq[r] over
// ctx[r] positions. Tasks (row, KV head) run in the order of rows `order` lists, which lets a
// caller interleave long and short contexts across the threads' contiguous shares.
struct Rows {
  const float* q;
  int64_t heads;
  const int32_t* tables;
  const int64_t* seq;
  const int64_t* ctx;
  const int64_t* order;
  int64_t count;
  float* out;
};

// A group's query heads in passes of at most kMaxPass: each head's sums are its own in
// `attend`, so every head gets the same bits in any pass, and four kernels per head size and
// cache type cover every group (a pass of more would not keep its accumulators in registers).
template <int NC, typename T>
void attend_group(int64_t group, const float* q, const T* k_cache, const T* v_cache,
                  const int32_t* table, int64_t ctx, int64_t kvh, const DecodeShape& s,
                  float* out) {
  constexpr int64_t D = NC * kLanes;
  for (int64_t g = 0; g < group; g += kMaxPass) {
    const float* qg = q + g * D;
    float* og = out + g * D;
    switch (std::min<int64_t>(kMaxPass, group - g)) {
      case 1: attend<NC, 1, T>(qg, k_cache, v_cache, table, ctx, kvh, s, og); break;
      case 2: attend<NC, 2, T>(qg, k_cache, v_cache, table, ctx, kvh, s, og); break;
      case 3: attend<NC, 3, T>(qg, k_cache, v_cache, table, ctx, kvh, s, og); break;
      default: attend<NC, kMaxPass, T>(qg, k_cache, v_cache, table, ctx, kvh, s, og);
    }
  }
}

template <int NC, typename T>
void attend_rows(const Rows& rows, const void* k_cache, const void* v_cache, const DecodeShape& s) {
  constexpr int64_t D = NC * kLanes;
  const T* kp = static_cast<const T*>(k_cache);
  const T* vp = static_cast<const T*>(v_cache);
  const int64_t group = rows.heads / s.kv_heads;
  at::parallel_for(0, rows.count * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = rows.order[task / s.kv_heads], kvh = task % s.kv_heads;
      const int64_t at = (r * rows.heads + kvh * group) * D;
      attend_group<NC, T>(group, rows.q + at, kp, vp, rows.tables + rows.seq[r] * s.table_stride,
                          rows.ctx[r], kvh, s, rows.out + at);
    }
  });
}

using AttendFn = void (*)(const Rows&, const void*, const void*, const DecodeShape&);

template <typename T>
AttendFn pick_type(int64_t head_dim) {
  switch (head_dim) {
    case 16: return attend_rows<1, T>;
    case 32: return attend_rows<2, T>;
    case 64: return attend_rows<4, T>;
    default: return attend_rows<8, T>;  // 128
  }
}

// Checks shared by both attention ops; returns the kernel for these shapes.
AttendFn check_and_pick(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat,
              "q must be a [tokens, heads, head_dim] float32 tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "the KV cache must be float32 or bfloat16");
  const int64_t heads = q.size(1), D = q.size(2);
  const int64_t blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0,
              "block_size must be a power of two");
  TORCH_CHECK(k_cache.size(3) == D && (D == 16 || D == 32 || D == 64 || D == 128),
              "head_dim must be 16, 32, 64 or 128, and match the cache");
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup,
              "query heads must be a multiple of KV heads, at most 8 per KV head");
  const int64_t seqs = context_lens.numel();
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  block_tables.dim() == 2 && block_tables.size(0) == seqs &&
                  block_tables.stride(1) == 1 && context_lens.is_contiguous(),
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
  return k_cache.scalar_type() == at::kFloat ? pick_type<float>(D)
                                             : pick_type<c10::BFloat16>(D);
}

// float32 -> bfloat16 rounding to nearest even, NaN to 0x7FC0: c10::BFloat16's rounding.
inline uint16_t to_bf16(float f) {
  return c10::BFloat16(f).x;
}

}  // namespace

namespace tokenmill {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale) {
  const AttendFn run = check_and_pick(q, k_cache, v_cache, block_tables, context_lens);
  const int64_t seqs = q.size(0);
  TORCH_CHECK(context_lens.numel() == seqs, "one context length per sequence");
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);
  std::vector<int64_t> index(seqs), ctx(seqs);
  for (int64_t i = 0; i < seqs; ++i) {
    index[i] = i;
    ctx[i] = context_lens.data_ptr<int32_t>()[i];
  }
  const Rows rows{qc.data_ptr<float>(), q.size(1), block_tables.data_ptr<int32_t>(),
                  index.data(), ctx.data(), index.data(), seqs, out.data_ptr<float>()};
  run(rows, k_cache.data_ptr(), v_cache.data_ptr(),
      DecodeShape{k_cache.size(1), k_cache.size(2), block_tables.stride(0), static_cast<float>(scale)});
  return out;
}

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& block_tables,
                                   const at::Tensor& query_start_loc,
                                   const at::Tensor& context_lens, double scale) {
  const AttendFn run = check_and_pick(q, k_cache, v_cache, block_tables, context_lens);
  const int64_t tokens = q.size(0), seqs = context_lens.numel();
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.numel() == seqs + 1,
              "query_start_loc must hold seqs + 1 int32 offsets");
  const at::Tensor starts = query_start_loc.contiguous();
  const int32_t* sp = starts.data_ptr<int32_t>();
  const int32_t* lp = context_lens.data_ptr<int32_t>();
  TORCH_CHECK(sp[0] == 0 && sp[seqs] == tokens, "query_start_loc must span q's tokens");
  // Each query token attends causally: the last n of a context of c sit at c - n .. c - 1.
  std::vector<int64_t> seq(tokens), ctx(tokens), order(tokens);
  for (int64_t i = 0; i < seqs; ++i) {
    const int64_t n = sp[i + 1] - sp[i];
    TORCH_CHECK(n >= 0 && n <= lp[i], "sequence ", i, " has more queries than context");
    for (int64_t j = 0; j < n; ++j) {
      seq[sp[i] + j] = i;
      ctx[sp[i] + j] = lp[i] - n + j + 1;
    }
  }
  // Rows late in a prompt read the most: interleave both ends so that the threads' shares
  // of the task range cost about the same.
  for (int64_t t = 0; t < tokens; ++t) order[t] = t % 2 == 0 ? t / 2 : tokens - 1 - t / 2;
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);
  const Rows rows{qc.data_ptr<float>(), q.size(1), block_tables.data_ptr<int32_t>(),
                  seq.data(),           ctx.data(), order.data(),
                  tokens,               out.data_ptr<float>()};
  run(rows, k_cache.data_ptr(), v_cache.data_ptr(),
      DecodeShape{k_cache.size(1), k_cache.size(2), block_tables.stride(0), static_cast<float>(scale)});
  return out;
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

}  // namespace tokenmill

TM_OPS_FRAGMENT(m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
  m.def(
      "paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor query_start_loc, Tensor context_lens, float scale) -> Tensor");
  m.def(
      "store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping) -> ()");
}

TM_OPS_IMPL(m) {
  m.impl("paged_decode_attention", tokenmill::paged_decode_attention);
  m.impl("paged_prefill_attention", tokenmill::paged_prefill_attention);
  m.impl("store_kv", tokenmill::store_kv);
}
