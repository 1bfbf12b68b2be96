// int8 x int8 GEMM with AVX-512 VNNI for the w8a8 linears of a CPU decode step.
//
// Why not torch._int_mm: oneDNN's kernel is tuned for large row counts; at the 1-32 rows of a
// decode step the 30 layers of SmolLM2-135M took about 1.5x longer there than here, and the
// activations' quantization and the output's scaling cost extra passes around it. This kernel
// takes float32 activations, rounds each row to int8 exactly as
// kernels.reference.quantize_rows_int8 does, and writes float32 outputs scaled as
// kernels.cpu_ops.int8_dynamic_linear scales them, so the two agree bit for bit.
//
// Layout: the weight [N, K] (int8, one scale per output) is packed by
// kernels.reference.pack_int8_vnni as [N / 16][K / 4][16][4]: one 64-byte load gives four
// consecutive k of 16 outputs, the operand of one vpdpbusd. vpdpbusd multiplies unsigned by
// signed bytes, so activations are stored as q + 128 and 128 * sum_k w[n, k] (`comp`) is
// subtracted from every sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "tokenmill.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kLanes = 16;   // int32 lanes of a zmm register: outputs per column block
constexpr int kRows = 4;         // rows per register tile
constexpr int kBlocks = 4;       // column blocks per register tile (4 x 4 accumulators)

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
    // Pull the next tile's weights toward L2 while this one computes: without it the first
    // row tile of every column block waits on L3.
    for (int p = 0; p < prefetch_blocks; ++p)
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + (k * prefetch_blocks + 4 * p) * kLanes),
                   _MM_HINT_T1);
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

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, const int32_t*,
                        const float*, const float*, float*, int64_t, const int8_t*, int);

template <int MB>
constexpr TileFn kTileRow[kBlocks + 1] = {nullptr, tile<MB, 1>, tile<MB, 2>, tile<MB, 3>,
                                          tile<MB, 4>};
constexpr const TileFn* kTiles[kRows + 1] = {nullptr, kTileRow<1>, kTileRow<2>, kTileRow<3>,
                                             kTileRow<4>};

// One row to codes round(x / s) + 128 with s = max|x| / 127, as quantize_rows_int8 rounds
// it: true division and round-half-even (the default MXCSR mode of cvtps2dq).
void quantize_row(const float* x, int64_t k_len, uint8_t* q, float* scale) {
  __m512 m = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kLanes <= k_len; k += kLanes) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float absmax = _mm512_reduce_max_ps(m);
  for (; k < k_len; ++k) absmax = std::max(absmax, std::fabs(x[k]));
  const float s = std::max(absmax / 127.0f, 1.17549435e-38f);  // the smallest normal float
  const __m512 sv = _mm512_set1_ps(s);
  const __m512i offset = _mm512_set1_epi32(128);
  for (k = 0; k + kLanes <= k_len; k += kLanes) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + k), sv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtepi32_epi8(_mm512_add_epi32(v, offset)));
  }
  for (; k < k_len; ++k) q[k] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(x[k] / s)) + 128);
  *scale = s;
}

}  // namespace

namespace tokenmill {

at::Tensor int8_packed_linear(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& comp, const at::Tensor& scale) {
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
  at::Tensor out = at::empty({m, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = row_scale.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) quantize_row(xp + i * k_len, k_len, qp + i * k_len, sp + i);

  const int8_t* bp = packed.data_ptr<int8_t>();
  const int32_t* cp = comp.data_ptr<int32_t>();
  const float* wp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t block_bytes = k_len * kLanes;
  const int64_t row_tiles = (m + kRows - 1) / kRows;
  // Threads split the column blocks; each walks its blocks four at a time, all rows per step,
  // so a weight panel is read from memory once and reused from cache by every row tile.
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j += kBlocks) {
      const int nv = static_cast<int>(std::min<int64_t>(kBlocks, end - j));
      const int64_t next = std::min<int64_t>(kBlocks, end - j - nv);
      const int64_t per_tile = next > 0 ? (next + row_tiles - 1) / row_tiles : 0;
      for (int64_t i = 0, t = 0; i < m; i += kRows, ++t) {
        const int mb = static_cast<int>(std::min<int64_t>(kRows, m - i));
        const int64_t first = std::min(t * per_tile, next);
        const int count = static_cast<int>(std::min(per_tile, next - first));
        kTiles[mb][nv](qp + i * k_len, k_len, bp + j * block_bytes, block_bytes,
                       cp + j * kLanes, sp + i, wp + j * kLanes, op + i * n + j * kLanes, n,
                       bp + (j + nv + first) * block_bytes, count);
      }
    }
  });
  return out;
}

}  // namespace tokenmill

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("int8_packed_linear(Tensor x, Tensor packed, Tensor comp, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("int8_packed_linear", tokenmill::int8_packed_linear); }
