// A 16-lane float32 vector for the kernels' float code, so that one source of each kernel
// builds for every instruction set kernels/native.py compiles it for:
//
// * AVX-512 (`__AVX512F__`): one zmm register; each operation is one intrinsic.
// * AVX2 + FMA (`__AVX2__`): two ymm registers, each operation done on both halves.
// * generic: an array of 16 floats in plain C++ (x86-64 without AVX2, aarch64), left to the
//   compiler's vectoriser; NEON would be a fourth branch here.
//
// Lane arithmetic is the same IEEE operation on every target (mul, add, fma, div), so a
// kernel's per-lane values agree across them; only the horizontal sums (`reduce_add`) add
// lanes in a target-specific order, which is why results are bit-identical within one
// target, not across targets.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace tokenmill::simd {

constexpr int64_t kLanes = 16;

#if defined(__AVX512F__)

struct F16 {
  __m512 v;
};
// Lanes [0, n) set, for n in [0, 16] (callers clamp larger counts).
inline __mmask16 first(int64_t n) {
  return n >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}
inline F16 zero() { return {_mm512_setzero_ps()}; }
inline F16 set1(float x) { return {_mm512_set1_ps(x)}; }
inline F16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }
inline F16 load_first(const float* p, int64_t n) { return {_mm512_maskz_loadu_ps(first(n), p)}; }
inline void store_first(float* p, F16 a, int64_t n) { _mm512_mask_storeu_ps(p, first(n), a.v); }
inline F16 keep_first(F16 a, int64_t n) { return {_mm512_maskz_mov_ps(first(n), a.v)}; }
inline F16 add(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 sub(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F16 mul(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 div(F16 a, F16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F16 fmadd(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 fnmadd(F16 a, F16 b, F16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline F16 max(F16 a, F16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F16 abs(F16 a) { return {_mm512_abs_ps(a.v)}; }
// where a < 0: if_negative, else otherwise
inline F16 select_negative(F16 a, F16 if_negative, F16 otherwise) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, _mm512_setzero_ps(), _CMP_LT_OQ),
                               otherwise.v, if_negative.v)};
}
inline float reduce_add(F16 a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(F16 a) { return _mm512_reduce_max_ps(a.v); }
inline float reduce_max_first(F16 a, int64_t n) { return _mm512_mask_reduce_max_ps(first(n), a.v); }
// Round to the nearest integer, ties to even.
inline F16 round(F16 a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// a * 2^n for integral n in [-126, 0]
inline F16 scale_pow2(F16 a, F16 n) { return {_mm512_scalef_ps(a.v, n.v)}; }

// Lane j of the result: the sum of v[j]'s lanes. Three levels of shuffles and adds, about 3
// instructions a sum against 8 for one horizontal reduction.
inline F16 sum16(const F16* v) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i].v, v[2 * i + 1].v),
                         _mm512_unpackhi_ps(v[2 * i].v, v[2 * i + 1].v));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44),
                                  _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44),
                                  _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return {_mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD))};
}

#elif defined(__AVX2__)

struct F16 {
  __m256 lo, hi;
};
// Lane masks of [0, n) for both halves.
inline void first_masks(int64_t n, __m256i& lo, __m256i& hi) {
  const __m256i count = _mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, kLanes)));
  lo = _mm256_cmpgt_epi32(count, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  hi = _mm256_cmpgt_epi32(count, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
}
inline F16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline F16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, F16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline F16 load_first(const float* p, int64_t n) {
  if (n >= kLanes) return load(p);
  __m256i lo, hi;
  first_masks(n, lo, hi);
  return {_mm256_maskload_ps(p, lo), _mm256_maskload_ps(p + 8, hi)};
}
inline void store_first(float* p, F16 a, int64_t n) {
  if (n >= kLanes) return store(p, a);
  __m256i lo, hi;
  first_masks(n, lo, hi);
  _mm256_maskstore_ps(p, lo, a.lo);
  _mm256_maskstore_ps(p + 8, hi, a.hi);
}
inline F16 keep_first(F16 a, int64_t n) {
  __m256i lo, hi;
  first_masks(n, lo, hi);
  return {_mm256_and_ps(a.lo, _mm256_castsi256_ps(lo)), _mm256_and_ps(a.hi, _mm256_castsi256_ps(hi))};
}
#define TM_SIMD_BINARY(name, intrinsic) \
  inline F16 name(F16 a, F16 b) { return {intrinsic(a.lo, b.lo), intrinsic(a.hi, b.hi)}; }
TM_SIMD_BINARY(add, _mm256_add_ps)
TM_SIMD_BINARY(sub, _mm256_sub_ps)
TM_SIMD_BINARY(mul, _mm256_mul_ps)
TM_SIMD_BINARY(div, _mm256_div_ps)
TM_SIMD_BINARY(max, _mm256_max_ps)
#undef TM_SIMD_BINARY
inline F16 fmadd(F16 a, F16 b, F16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F16 fnmadd(F16 a, F16 b, F16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline F16 abs(F16 a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
inline F16 select_negative(F16 a, F16 if_negative, F16 otherwise) {
  const __m256 z = _mm256_setzero_ps();
  return {_mm256_blendv_ps(otherwise.lo, if_negative.lo, _mm256_cmp_ps(a.lo, z, _CMP_LT_OQ)),
          _mm256_blendv_ps(otherwise.hi, if_negative.hi, _mm256_cmp_ps(a.hi, z, _CMP_LT_OQ))};
}
inline float reduce8_add(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_add(F16 a) { return reduce8_add(_mm256_add_ps(a.lo, a.hi)); }
inline float reduce_max(F16 a) {
  __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max_first(F16 a, int64_t n) {
  if (n >= kLanes) return reduce_max(a);
  alignas(32) float t[kLanes];
  store(t, a);
  return *std::max_element(t, t + n);
}
inline F16 round(F16 a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
inline __m256 pow2(__m256 n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
// a * 2^n for integral n in [-126, 0]: one exact power of two, so the one rounding of the
// product is scalef's.
inline F16 scale_pow2(F16 a, F16 n) {
  return {_mm256_mul_ps(a.lo, pow2(n.lo)), _mm256_mul_ps(a.hi, pow2(n.hi))};
}
// The sums of eight vectors' lanes, in lane order.
inline __m256 sum8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
inline F16 sum16(const F16* v) {
  __m256 halves[kLanes];
  for (int i = 0; i < kLanes; ++i) halves[i] = _mm256_add_ps(v[i].lo, v[i].hi);
  return {sum8(halves), sum8(halves + 8)};
}

#else  // generic C++

struct F16 {
  float v[kLanes];
};
#define TM_SIMD_MAP(expr)                            \
  F16 r;                                             \
  for (int64_t i = 0; i < kLanes; ++i) r.v[i] = expr; \
  return r;
inline F16 zero() { TM_SIMD_MAP(0.0f) }
inline F16 set1(float x) { TM_SIMD_MAP(x) }
inline F16 load(const float* p) { TM_SIMD_MAP(p[i]) }
inline void store(float* p, F16 a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline F16 load_first(const float* p, int64_t n) { TM_SIMD_MAP(i < n ? p[i] : 0.0f) }
inline void store_first(float* p, F16 a, int64_t n) {
  for (int64_t i = 0; i < std::min(n, kLanes); ++i) p[i] = a.v[i];
}
inline F16 keep_first(F16 a, int64_t n) { TM_SIMD_MAP(i < n ? a.v[i] : 0.0f) }
inline F16 add(F16 a, F16 b) { TM_SIMD_MAP(a.v[i] + b.v[i]) }
inline F16 sub(F16 a, F16 b) { TM_SIMD_MAP(a.v[i] - b.v[i]) }
inline F16 mul(F16 a, F16 b) { TM_SIMD_MAP(a.v[i] * b.v[i]) }
inline F16 div(F16 a, F16 b) { TM_SIMD_MAP(a.v[i] / b.v[i]) }
inline F16 fmadd(F16 a, F16 b, F16 c) { TM_SIMD_MAP(std::fma(a.v[i], b.v[i], c.v[i])) }
inline F16 fnmadd(F16 a, F16 b, F16 c) { TM_SIMD_MAP(std::fma(-a.v[i], b.v[i], c.v[i])) }
inline F16 max(F16 a, F16 b) { TM_SIMD_MAP(a.v[i] > b.v[i] ? a.v[i] : b.v[i]) }
inline F16 abs(F16 a) { TM_SIMD_MAP(std::fabs(a.v[i])) }
inline F16 select_negative(F16 a, F16 if_negative, F16 otherwise) {
  TM_SIMD_MAP(a.v[i] < 0.0f ? if_negative.v[i] : otherwise.v[i])
}
inline F16 round(F16 a) { TM_SIMD_MAP(std::nearbyint(a.v[i])) }
inline F16 scale_pow2(F16 a, F16 n) { TM_SIMD_MAP(std::ldexp(a.v[i], static_cast<int>(n.v[i]))) }
inline float reduce_add(F16 a) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += a.v[i];
  return s;
}
inline float reduce_max_first(F16 a, int64_t n) {
  return *std::max_element(a.v, a.v + std::min(n, kLanes));
}
inline float reduce_max(F16 a) { return reduce_max_first(a, kLanes); }
inline F16 sum16(const F16* v) { TM_SIMD_MAP(reduce_add(v[i])) }
#undef TM_SIMD_MAP

#endif

// exp(x) for x <= 0 to about 2 ulp: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2.
inline F16 exp_nonpositive(F16 x) {
  x = max(x, set1(-87.0f));
  const F16 n = round(mul(x, set1(1.44269504088896341f)));
  // x - n * ln2 in two parts (Cody-Waite); fnmadd(a, b, c) = c - a * b, rounded once
  F16 r = fnmadd(n, set1(0.693145751953125f), x);
  r = fnmadd(n, set1(1.428606765330187045e-06f), r);
  F16 p = set1(1.0f / 5040);
  p = fmadd(p, r, set1(1.0f / 720));
  p = fmadd(p, r, set1(1.0f / 120));
  p = fmadd(p, r, set1(1.0f / 24));
  p = fmadd(p, r, set1(1.0f / 6));
  p = fmadd(p, r, set1(0.5f));
  p = fmadd(p, r, set1(1.0f));
  p = fmadd(p, r, set1(1.0f));
  return scale_pow2(p, n);
}

}  // namespace tokenmill::simd
