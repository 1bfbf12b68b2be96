// int8 x int8 GEMM for the w8a8 linears of a CPU decode step, one inner kernel per target:
//
// * AVX-512 VNNI: vpdpbusd, four multiply-adds of 16 outputs in one instruction.
// * AVX-VNNI (Intel client CPUs from Alder Lake on, which lack AVX-512): vpdpbusd on ymm,
//   four multiply-adds of 8 outputs in one instruction.
// * AVX2: two vpmaddubsw, a vpaddw, a vpmaddwd and a vpaddd per 64 multiply-adds.
//   vpmaddubsw adds two products of an unsigned activation byte and a signed weight in 16
//   signed bits; two such sums (four products) still fit there when activations are at
//   most 127 and |w| <= 64 (4 x 127 x 64 = 32512). So on this target w8a8 rounds its
//   weights to [-64, 64] (kernels.native.int8_weight_range; packing refuses others) and its
//   activations to [-63, 63] (kernels.native.int8_activation_limit), stored as code + 64,
//   and the multiplies, the bound on this instruction sequence, fall from four to three
//   per 64 multiply-adds. Full-range activations (one vpmaddwd per vpmaddubsw) make a GEMM
//   ~1.3x slower, full-range weights (|w| * sign(a, w), a fourth instruction) slower still.
// * generic: plain C++ loops over the same layout.
//
// Why not torch._int_mm: oneDNN's kernel is tuned for large row counts; at the 1-32 rows of a
// decode step the 30 layers of SmolLM2-135M take about 1.5x longer there than here on AVX-512
// VNNI, and on AVX2 it runs at a few GOP/s. The activations' quantization and the output's
// scaling also cost extra passes around it. This kernel takes float32 activations, rounds
// each row to int8 exactly as kernels.reference.quantize_rows_int8 does, and writes float32
// outputs scaled as kernels.cpu_ops.int8_dynamic_linear scales them. Integer sums are exact on
// every target, so all of them agree with that function (given the target's activation
// limit) bit for bit.
//
// Layout: the weight [N, K] (int8, one scale per output) is packed by
// kernels.reference.pack_int8_vnni as [N / 16][K / 4][16][4]: one 64-byte load gives four
// consecutive k of 16 outputs, the operand of one vpdpbusd (two ymm loads on AVX2 and
// AVX-VNNI). vpdpbusd and vpmaddubsw multiply unsigned by signed bytes, so on the SIMD
// targets activations are stored as q + 128 (q + 64 on AVX2) and 128 * sum_k w[n, k]
// (`comp`; half of it on AVX2) is subtracted from every sum; the generic target stores q.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "tokenmill.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>

namespace {

using tokenmill::simd::F16;
using tokenmill::simd::kLanes;  // outputs per column block (one zmm of int32 sums)
namespace simd = tokenmill::simd;

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, const int32_t*,
                        const float*, const float*, float*, int64_t, const int8_t*, int);

// Pull the next tile's weights toward L2 while this one computes: without it the first row
// tile of every column block waits on L3.
inline void prefetch_next(const int8_t* prefetch, int64_t k, int prefetch_blocks) {
  for (int p = 0; p < prefetch_blocks; ++p)
    __builtin_prefetch(prefetch + (k * prefetch_blocks + 4 * p) * kLanes, 0, 2);
}

#if defined(__AVX512VNNI__)

constexpr int kActivationLimit = 127;
constexpr int kActivationOffset = 128;
constexpr int kRows = 4;    // rows per register tile
constexpr int kBlocks = 4;  // column blocks per register tile (4 x 4 accumulators)

// Sums of a tile of MB rows x NV column blocks over all of K, then the float epilogue.
// Accumulators are named variables rather than an array: GCC 12 otherwise copies each one
// once per step, which halved the throughput.
template <int MB, int NV>
void tile(const uint8_t* a, int64_t k_len, const int8_t* b, int64_t block_bytes,
          const int32_t* comp, const float* a_scale, const float* b_scale, float* c,
          int64_t ldc, const int8_t* prefetch, int prefetch_blocks) {
  static_assert(MB >= 1 && MB <= kRows && NV >= 1 && NV <= kBlocks);
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z;
  __m512i c20 = z, c21 = z, c22 = z, c23 = z, c30 = z, c31 = z, c32 = z, c33 = z;
  const int8_t* b1 = b + (NV > 1 ? block_bytes : 0);
  const int8_t* b2 = b + (NV > 2 ? 2 * block_bytes : 0);
  const int8_t* b3 = b + (NV > 3 ? 3 * block_bytes : 0);
#define TM_ROW(I)                                                                        \
  if constexpr (MB > I) {                                                                \
    const __m512i av = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + I * k_len + k)); \
    c##I##0 = _mm512_dpbusd_epi32(c##I##0, av, v0);                                      \
    if constexpr (NV > 1) c##I##1 = _mm512_dpbusd_epi32(c##I##1, av, v1);                \
    if constexpr (NV > 2) c##I##2 = _mm512_dpbusd_epi32(c##I##2, av, v2);                \
    if constexpr (NV > 3) c##I##3 = _mm512_dpbusd_epi32(c##I##3, av, v3);                \
  }
  for (int64_t k = 0; k < k_len; k += 4) {
    const __m512i v0 = _mm512_loadu_si512(b + k * kLanes);
    const __m512i v1 = NV > 1 ? _mm512_loadu_si512(b1 + k * kLanes) : z;
    const __m512i v2 = NV > 2 ? _mm512_loadu_si512(b2 + k * kLanes) : z;
    const __m512i v3 = NV > 3 ? _mm512_loadu_si512(b3 + k * kLanes) : z;
    TM_ROW(0) TM_ROW(1) TM_ROW(2) TM_ROW(3)
    prefetch_next(prefetch, k, prefetch_blocks);
  }
#undef TM_ROW
  alignas(64) int32_t sums[kRows][kBlocks * kLanes];
  const __m512i acc[kRows][kBlocks] = {
      {c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NV; ++j) _mm512_store_si512(sums[i] + j * kLanes, acc[i][j]);
  for (int i = 0; i < MB; ++i) {
    const __m512 row_scale = _mm512_set1_ps(a_scale[i]);
    for (int j = 0; j < NV; ++j) {
      const __m512i s = _mm512_sub_epi32(_mm512_load_si512(sums[i] + j * kLanes),
                                         _mm512_loadu_si512(comp + j * kLanes));
      // (sum * row scale) * column scale, the order of cpu_ops.int8_dynamic_linear.
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), row_scale),
                                     _mm512_loadu_ps(b_scale + j * kLanes));
      _mm512_storeu_ps(c + i * ldc + j * kLanes, v);
    }
  }
}

#else  // AVX-VNNI, AVX2 and generic: one column block per tile

#if defined(__AVXVNNI__)
constexpr int kActivationLimit = 127;
constexpr int kActivationOffset = 128;  // unsigned activations, as on AVX-512 VNNI
#elif defined(__AVX2__)
constexpr int kActivationLimit = 63;  // codes + 64 <= 127: two pair sums add in 16 bits
constexpr int kActivationOffset = 64;
#else
constexpr int kActivationLimit = 127;
constexpr int kActivationOffset = 0;  // signed activations
#endif
constexpr int kRows = 4;
constexpr int kBlocks = 1;

#if defined(__AVX2__)
// The sums of MB rows x 16 outputs, two ymm of 8 each per row (minus `comp` still to come).
template <int MB>
void block_sums(const uint8_t* a, int64_t k_len, const int8_t* b, const int8_t* prefetch,
                int prefetch_blocks, int32_t (*sums)[kLanes]) {
  const __m256i z = _mm256_setzero_si256();
  __m256i c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z;
  const auto weights = [&](int64_t k, int half) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k * kLanes + 32 * half));
  };
  const auto activations = [&](int row, int64_t k) {
    return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a + row * k_len + k));
  };
  int64_t k = 0;
#if defined(__AVXVNNI__)
#define TM_ROW(I)                                                                        \
  if constexpr (MB > I) {                                                                \
    const __m256i av = activations(I, k);                                                \
    c##I##0 = _mm256_dpbusd_avx_epi32(c##I##0, av, w0);                                  \
    c##I##1 = _mm256_dpbusd_avx_epi32(c##I##1, av, w1);                                  \
  }
#else
  // Eight consecutive k per step: the 16-bit sums of k..k+3 and k+4..k+7 add exactly
  // (codes + 64 <= 127, |w| <= 64), then one vpmaddwd widens both to 32 bits.
  const __m256i ones = _mm256_set1_epi16(1);
#define TM_PAIR(acc, lo, hi) \
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(av, lo), _mm256_maddubs_epi16(av4, hi)), ones));
#define TM_ROW8(I)                                                                       \
  if constexpr (MB > I) {                                                                \
    const __m256i av = activations(I, k), av4 = activations(I, k + 4);                   \
    TM_PAIR(c##I##0, w0, w2)                                                             \
    TM_PAIR(c##I##1, w1, w3)                                                             \
  }
  for (; k + 8 <= k_len; k += 8) {
    const __m256i w0 = weights(k, 0), w1 = weights(k, 1), w2 = weights(k + 4, 0),
                  w3 = weights(k + 4, 1);
    TM_ROW8(0) TM_ROW8(1) TM_ROW8(2) TM_ROW8(3)
    prefetch_next(prefetch, k, prefetch_blocks);
    prefetch_next(prefetch, k + 4, prefetch_blocks);
  }
#undef TM_ROW8
#undef TM_PAIR
  // K % 8 == 4: the last four k alone.
#define TM_ROW(I)                                                                        \
  if constexpr (MB > I) {                                                                \
    const __m256i av = activations(I, k);                                                \
    c##I##0 = _mm256_add_epi32(c##I##0, _mm256_madd_epi16(_mm256_maddubs_epi16(av, w0), ones)); \
    c##I##1 = _mm256_add_epi32(c##I##1, _mm256_madd_epi16(_mm256_maddubs_epi16(av, w1), ones)); \
  }
#endif
  for (; k < k_len; k += 4) {
    const __m256i w0 = weights(k, 0), w1 = weights(k, 1);
    TM_ROW(0) TM_ROW(1) TM_ROW(2) TM_ROW(3)
    prefetch_next(prefetch, k, prefetch_blocks);
  }
#undef TM_ROW
  const __m256i acc[kRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int i = 0; i < MB; ++i)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[i] + 8 * h), acc[i][h]);
}
#else
template <int MB>
void block_sums(const uint8_t* a, int64_t k_len, const int8_t* b, const int8_t* prefetch,
                int prefetch_blocks, int32_t (*sums)[kLanes]) {
  for (int i = 0; i < MB; ++i) std::fill(sums[i], sums[i] + kLanes, 0);
  for (int64_t k = 0; k < k_len; k += 4) {
    const int8_t* w = b + k * kLanes;
    for (int i = 0; i < MB; ++i) {
      const int8_t* x = reinterpret_cast<const int8_t*>(a + i * k_len + k);  // signed codes
      for (int64_t n = 0; n < kLanes; ++n)
        sums[i][n] += x[0] * w[4 * n] + x[1] * w[4 * n + 1] + x[2] * w[4 * n + 2] +
                      x[3] * w[4 * n + 3];
    }
    prefetch_next(prefetch, k, prefetch_blocks);
  }
}
#endif

template <int MB, int NV>
void tile(const uint8_t* a, int64_t k_len, const int8_t* b, int64_t, const int32_t* comp,
          const float* a_scale, const float* b_scale, float* c, int64_t ldc,
          const int8_t* prefetch, int prefetch_blocks) {
  static_assert(MB >= 1 && MB <= kRows && NV == 1);
  int32_t sums[kRows][kLanes];
  block_sums<MB>(a, k_len, b, prefetch, prefetch_blocks, sums);
  // (sum * row scale) * column scale, the order of cpu_ops.int8_dynamic_linear.
  for (int i = 0; i < MB; ++i)
    for (int64_t n = 0; n < kLanes; ++n) {
      // comp = 128 * sum_k w[n, k], exactly twice the AVX2 target's 64 * sum.
      const int32_t sum = sums[i][n] - comp[n] / 128 * kActivationOffset;
      c[i * ldc + n] = static_cast<float>(sum) * a_scale[i] * b_scale[n];
    }
}

#endif

// kTiles[rows][blocks]: the tile for a row count in [1, kRows] and a block count in
// [1, kBlocks].
template <int MB, size_t... NV>
constexpr std::array<TileFn, kBlocks + 1> tile_row(std::index_sequence<NV...>) {
  return {nullptr, tile<MB, static_cast<int>(NV) + 1>...};
}
template <int MB>
constexpr std::array<TileFn, kBlocks + 1> kTileRow = tile_row<MB>(std::make_index_sequence<kBlocks>());
constexpr const TileFn* kTiles[kRows + 1] = {nullptr, kTileRow<1>.data(), kTileRow<2>.data(),
                                             kTileRow<3>.data(), kTileRow<4>.data()};

// One row to codes round(x / s) (+ kActivationOffset) with s = max|x| / kActivationLimit,
// as quantize_rows_int8 rounds it: true division and round-half-even.
void quantize_row(const float* x, int64_t k_len, uint8_t* q, float* scale) {
  F16 m = simd::zero();
  int64_t k = 0;
  for (; k + kLanes <= k_len; k += kLanes) m = simd::max(m, simd::abs(simd::load(x + k)));
  float absmax = simd::reduce_max(m);
  for (; k < k_len; ++k) absmax = std::max(absmax, std::fabs(x[k]));
  const float s = std::max(absmax / kActivationLimit, 1.17549435e-38f);  // the smallest normal float
  const F16 sv = simd::set1(s);
  k = 0;
#if defined(__AVX512F__)
  const __m512i offset = _mm512_set1_epi32(kActivationOffset);
  for (; k + kLanes <= k_len; k += kLanes) {
    // cvtps2dq rounds half to even, the default MXCSR mode
    const __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + k), sv.v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtepi32_epi8(_mm512_add_epi32(v, offset)));
  }
#elif defined(__AVX2__)
  // Four vectors of eight codes packed to 32 bytes: the packs interleave 128-bit lanes, so
  // dwords come out as v0[0:4], v1[0:4], v2[0:4], v3[0:4], v0[4:8], .. and one permute
  // restores their order.
  const __m256i offset = _mm256_set1_epi32(kActivationOffset);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const auto codes = [&](int64_t at) {
    return _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + at), sv.lo)),
                            offset);
  };
  for (; k + 32 <= k_len; k += 32) {
    const __m256i low = _mm256_packs_epi32(codes(k), codes(k + 8));
    const __m256i high = _mm256_packs_epi32(codes(k + 16), codes(k + 24));
    const __m256i bytes = _mm256_packus_epi16(low, high);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                        _mm256_permutevar8x32_epi32(bytes, order));
  }
#else
  for (; k + kLanes <= k_len; k += kLanes) {
    float r[kLanes];
    simd::store(r, simd::round(simd::div(simd::load(x + k), sv)));
    for (int64_t j = 0; j < kLanes; ++j)
      q[k + j] = static_cast<uint8_t>(static_cast<int>(r[j]) + kActivationOffset);
  }
#endif
  for (; k < k_len; ++k)
    q[k] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(x[k] / s)) + kActivationOffset);
  *scale = s;
}

}  // namespace

namespace tokenmill {
namespace {

// A GEMM's checked operands, and its activations rounded to int8 codes per row.
struct Operands {
  int64_t m, k_len, blocks;
  at::Tensor q, row_scale;  // the codes' and scales' storage, which qp and sp point into
  const uint8_t* qp;
  const float* sp;
  const int8_t* packed;
  const int32_t* comp;
  const float* scale;

  // The tile for rows [i, i + mb) and column blocks [j, j + nv) into c (row stride ldc),
  // pulling `count` panels from block `next` on toward L2 meanwhile.
  void tile(int64_t i, int mb, int64_t j, int nv, float* c, int64_t ldc, int64_t next,
            int count) const {
    const int64_t block_bytes = k_len * kLanes;
    kTiles[mb][nv](qp + i * k_len, k_len, packed + j * block_bytes, block_bytes,
                   comp + j * kLanes, sp + i, scale + j * kLanes, c, ldc,
                   packed + next * block_bytes, count);
  }
};

Operands operands(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp,
                  const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be 2-D float32");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kLanes && packed.size(3) == 4 &&
                  packed.scalar_type() == at::kChar && packed.is_contiguous(),
              "packed must come from pack_int8_vnni");
  const int64_t m = x.size(0), k_len = x.size(1), blocks = packed.size(0);
  const int64_t n = blocks * kLanes;
  TORCH_CHECK(packed.size(1) * 4 == k_len, "x has ", k_len, " columns, the weight ",
              packed.size(1) * 4);
  TORCH_CHECK(comp.numel() == n && comp.scalar_type() == at::kInt && comp.is_contiguous());
  TORCH_CHECK(scale.numel() == n && scale.scalar_type() == at::kFloat && scale.is_contiguous());
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty({m, k_len}, x.options().dtype(at::kByte));
  at::Tensor row_scale = at::empty({m}, x.options());
  const float* xp = xc.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = row_scale.data_ptr<float>();
  at::parallel_for(0, m, tokenmill::serial_grain(k_len), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_row(xp + i * k_len, k_len, qp + i * k_len, sp + i);
  });
  return {m,  k_len, blocks, q, row_scale, qp, sp, packed.data_ptr<int8_t>(),
          comp.data_ptr<int32_t>(), scale.data_ptr<float>()};
}

// Threads split the column blocks [0, blocks); each walks its share kBlocks at a time, all
// rows per step, so a weight panel is read from memory once and reused from cache by every
// row tile. `step(j, nv, i, mb, next, count)` computes one tile's worth; `next` and `count`
// spread the prefetch of the share's next blocks over the row tiles.
template <typename Step>
void for_tiles(int64_t m, int64_t blocks, const Step& step) {
  const int64_t row_tiles = (m + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j += kBlocks) {
      const int nv = static_cast<int>(std::min<int64_t>(kBlocks, end - j));
      const int64_t next = std::min<int64_t>(kBlocks, end - j - nv);
      const int64_t per_tile = next > 0 ? (next + row_tiles - 1) / row_tiles : 0;
      for (int64_t i = 0, t = 0; i < m; i += kRows, ++t) {
        const int mb = static_cast<int>(std::min<int64_t>(kRows, m - i));
        const int64_t first = std::min(t * per_tile, next);
        const int count = static_cast<int>(std::min(per_tile, next - first));
        step(j, nv, i, mb, j + nv + first, count);
      }
    }
  });
}

}  // namespace

at::Tensor int8_packed_linear(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& comp, const at::Tensor& scale) {
  const Operands a = operands(x, packed, comp, scale);
  const int64_t n = a.blocks * kLanes;
  at::Tensor out = at::empty({a.m, n}, x.options());
  float* op = out.data_ptr<float>();
  for_tiles(a.m, a.blocks, [&](int64_t j, int nv, int64_t i, int mb, int64_t next, int count) {
    a.tile(i, mb, j, nv, op + i * n + j * kLanes, n, next, count);
  });
  return out;
}

at::Tensor int8_packed_swiglu(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& comp, const at::Tensor& scale,
                              const float* input_scale) {
  const Operands a = operands(x, packed, comp, scale);
  TORCH_CHECK(a.blocks % 2 == 0, "gate_up must have as many gate as up outputs, in blocks of ",
              kLanes);
  const int64_t half = a.blocks / 2, n = half * kLanes;  // gate: blocks [0, half), up: the rest
  at::Tensor out = at::empty({a.m, n}, x.options());
  float* op = out.data_ptr<float>();
  for_tiles(a.m, half, [&](int64_t j, int nv, int64_t i, int mb, int64_t next, int count) {
    alignas(64) float gate[kRows][kBlocks * kLanes], up[kRows][kBlocks * kLanes];
    a.tile(i, mb, j, nv, gate[0], kBlocks * kLanes, next, count);
    a.tile(i, mb, half + j, nv, up[0], kBlocks * kLanes, half + next, count);
    for (int r = 0; r < mb; ++r)
      swiglu_span(gate[r], up[r], input_scale != nullptr ? input_scale + j * kLanes : nullptr,
                  nv * kLanes, op + (i + r) * n + j * kLanes);
  });
  return out;
}

at::Tensor int8_packed_swiglu_op(const at::Tensor& x, const at::Tensor& packed,
                                 const at::Tensor& comp, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& input_scale) {
  return int8_packed_swiglu(x, packed, comp, scale,
                            data_or_null(input_scale, packed.size(0) / 2 * kLanes));
}

}  // namespace tokenmill

TM_OPS_FRAGMENT(m) {
  m.def("int8_packed_linear(Tensor x, Tensor packed, Tensor comp, Tensor scale) -> Tensor");
  m.def(
      "int8_packed_swiglu(Tensor x, Tensor packed, Tensor comp, Tensor scale, "
      "Tensor? input_scale) -> Tensor");
}

TM_OPS_IMPL(m) {
  m.impl("int8_packed_linear", tokenmill::int8_packed_linear);
  m.impl("int8_packed_swiglu", tokenmill::int8_packed_swiglu_op);
}
