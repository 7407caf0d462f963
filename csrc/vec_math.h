// Vectorised fp32 helpers shared by the CPU epilogues: exp, max and tanh, and loads/stores of
// fp32, bf16 and fp16 rows as fp32 vectors.
//
// Every kernel file is compiled once per instruction set (setup.py): with CPU_CAPABILITY set to
// DEFAULT (the baseline target: SSE2 on x86-64), AVX2 (-mavx2 -mfma -mf16c) or AVX512
// (-mavx512f/bw/vl/dq), as ATen compiles its own kernels. CPU_CAPABILITY names the inline
// namespace of ATen's Vectorized<T> (its AVX2 and AVX-512 versions are only selected by
// CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512) and the namespace of the kernels
// (unlearn_kernels::AVX2::ce_forward, ...), so the copies never share a symbol; bindings.cpp
// calls the one the CPU supports. Include this header *before* any other ATen header.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "compile csrc/ kernels through setup.py, which sets CPU_CAPABILITY per instruction set"
#endif

// ATen's vector headers use `#pragma unroll`, unknown to GCC (silenced here on GCC >= 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

// The per-vector helpers must inline into the row loops (an out-of-line call passes the
// vectors through memory).
#define UK_INLINE C10_ALWAYS_INLINE

namespace unlearn_kernels::CPU_CAPABILITY::vec_math {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kStep = 2 * kLanes;  // elements per load/store step (one 16-bit vector)
constexpr int kAllLanes = (1 << kLanes) - 1;  // a lane bit mask with every lane set

// ---------------------------------------------------------------------------------------------
// exp, max and tanh: the package's own polynomials (no Sleef call, no libm call), one algorithm
// written three times in intrinsics: AVX-512, AVX2, and SSE2 for the x86-64 baseline (no FMA
// there, so each fused multiply-add is a multiply and an add: the same error bounds within
// 1 ulp). Other architectures map ATen's scalar functions lane by lane.
//
// exp(x) = 2^n · exp(r), n = round(x / ln 2), r = x − n ln 2 ∈ [−ln2/2, ln2/2] (Cody–Waite: ln 2
// split so that n·hi is exact). n is rounded by adding 1.5·2^23 + 127, which also leaves the
// biased exponent n + 127 in the low mantissa bits, ready to shift into place. exp(r) is a
// degree-6 polynomial fitted for relative error (1.7e-8 with fp32 coefficients). Measured
// max error 1.06 ulp (against double exp) over fp32 inputs with normal results.
//
// kNonPositive: the caller guarantees x ≤ 0 (z − running max; −2|y| in tanh_vec), so only the
// lower clamp is applied and results below FLT_MIN (x < −87.34) come out as ~FLT_MIN instead of
// 0, which cannot move a sum that contains exp(0) = 1. Otherwise they are flushed to 0 and
// x > 88.37 saturates at exp(88.37). NaN propagates in both.
//
// tanh(y) and, when kDeriv, d = 1 − tanh(y)². With a = |y|:
//   a < 0.625: tanh = a + a³·P(a²), P of degree 5 fitted for relative error (< 1e-9);
//   otherwise: e = exp(−2a), tanh = (1 − e)/(1 + e), d = 4e/(1 + e)² (no cancellation in d).
// The vector versions skip the second branch (an exp and a division) when all lanes are small,
// the common case for softcapped logits (|x| < 0.625·c). Max error 2 ulp for tanh, 4.5 ulp
// for d.

namespace coef {
constexpr float kExpLo = -87.33654f, kExpHi = 88.37f;
constexpr float kShifter = 12582912.f + 127.f;  // 1.5·2^23 + exponent bias
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExp[5] = {1.383684459e-03f, 8.374815807e-03f, 4.166822508e-02f,
                           1.666641980e-01f, 4.999999106e-01f};  // then r·(·) + 1, twice
constexpr float kTanhSmall = 0.625f;
constexpr float kTanh[6] = {2.167856554e-03f, -8.205491118e-03f, 2.171256766e-02f,
                            -5.394906178e-02f, 1.333322525e-01f,  -3.333333135e-01f};
}  // namespace coef

#if defined(CPU_CAPABILITY_AVX512)

template <bool kNonPositive = false>
UK_INLINE Vec exp_vec(const Vec& v) {
  const __m512 x_in = v;
  const __m512 lo = _mm512_set1_ps(coef::kExpLo);
  // Operand order makes min/max return x when x is NaN.
  __m512 x = kNonPositive ? x_in : _mm512_min_ps(_mm512_set1_ps(coef::kExpHi), x_in);
  x = _mm512_max_ps(lo, x);
  const __m512 shifter = _mm512_set1_ps(coef::kShifter);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(coef::kLog2e), shifter);
  const __m512 n = _mm512_sub_ps(t, shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(coef::kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(coef::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(coef::kExp[0]);
  for (int k = 1; k < 5; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(coef::kExp[k]));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23));
  const __m512 y = _mm512_mul_ps(p, two_n);
  if constexpr (kNonPositive) {
    return y;
  } else {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x_in, lo, _CMP_NLT_UQ), y);
  }
}

UK_INLINE Vec max_vec(const Vec& a, const Vec& b) { return _mm512_max_ps(a, b); }

template <bool kDeriv>
UK_INLINE Vec tanh_vec(const Vec& v, Vec* deriv) {
  const __m512 y = v;
  const __m512 sign_bit = _mm512_set1_ps(-0.f);
  const __m512 sign = _mm512_and_ps(y, sign_bit);
  const __m512 a = _mm512_andnot_ps(sign_bit, y);
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 u = _mm512_mul_ps(a, a);
  __m512 poly = _mm512_set1_ps(coef::kTanh[0]);
  for (int k = 1; k < 6; ++k) poly = _mm512_fmadd_ps(poly, u, _mm512_set1_ps(coef::kTanh[k]));
  __m512 t = _mm512_fmadd_ps(_mm512_mul_ps(poly, u), a, a);
  __m512 d = one;
  if constexpr (kDeriv) d = _mm512_fnmadd_ps(t, t, one);
  const __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(coef::kTanhSmall), _CMP_LT_OQ);
  if (small != static_cast<__mmask16>(kAllLanes)) {
    // −2a ≤ 0; for a > 43.7, e ≈ FLT_MIN rather than 0: tanh = 1, d ≈ 4.7e-38.
    const __m512 e = exp_vec<true>(Vec(_mm512_mul_ps(a, _mm512_set1_ps(-2.f))));
    const __m512 q = _mm512_div_ps(one, _mm512_add_ps(one, e));
    t = _mm512_mask_blend_ps(small, _mm512_mul_ps(_mm512_sub_ps(one, e), q), t);
    if constexpr (kDeriv) {
      const __m512 four_e = _mm512_mul_ps(_mm512_set1_ps(4.f), e);
      d = _mm512_mask_blend_ps(small, _mm512_mul_ps(four_e, _mm512_mul_ps(q, q)), d);
    }
  }
  if constexpr (kDeriv) *deriv = d;
  return _mm512_or_ps(t, sign);
}

#elif defined(CPU_CAPABILITY_AVX2)

template <bool kNonPositive = false>
UK_INLINE Vec exp_vec(const Vec& v) {
  const __m256 x_in = v;
  const __m256 lo = _mm256_set1_ps(coef::kExpLo);
  // Operand order makes min/max return x when x is NaN.
  __m256 x = kNonPositive ? x_in : _mm256_min_ps(_mm256_set1_ps(coef::kExpHi), x_in);
  x = _mm256_max_ps(lo, x);
  const __m256 shifter = _mm256_set1_ps(coef::kShifter);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(coef::kLog2e), shifter);
  const __m256 n = _mm256_sub_ps(t, shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(coef::kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(coef::kLn2Lo), r);
  __m256 p = _mm256_set1_ps(coef::kExp[0]);
  for (int k = 1; k < 5; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(coef::kExp[k]));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
  const __m256 y = _mm256_mul_ps(p, two_n);
  if constexpr (kNonPositive) {
    return y;
  } else {
    return _mm256_andnot_ps(_mm256_cmp_ps(x_in, lo, _CMP_LT_OQ), y);
  }
}

// Lane-wise max; NaN need not propagate here because the sums it feeds do.
UK_INLINE Vec max_vec(const Vec& a, const Vec& b) { return _mm256_max_ps(a, b); }

template <bool kDeriv>
UK_INLINE Vec tanh_vec(const Vec& v, Vec* deriv) {
  const __m256 y = v;
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  const __m256 sign = _mm256_and_ps(y, sign_bit);
  const __m256 a = _mm256_andnot_ps(sign_bit, y);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 u = _mm256_mul_ps(a, a);
  __m256 poly = _mm256_set1_ps(coef::kTanh[0]);
  for (int k = 1; k < 6; ++k) poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(coef::kTanh[k]));
  __m256 t = _mm256_fmadd_ps(_mm256_mul_ps(poly, u), a, a);
  __m256 d;
  if constexpr (kDeriv) d = _mm256_fnmadd_ps(t, t, one);
  const __m256 small = _mm256_cmp_ps(a, _mm256_set1_ps(coef::kTanhSmall), _CMP_LT_OQ);
  if (_mm256_movemask_ps(small) != kAllLanes) {
    // −2a ≤ 0; for a > 43.7, e ≈ FLT_MIN rather than 0: tanh = 1, d ≈ 4.7e-38.
    const __m256 e = exp_vec<true>(Vec(_mm256_mul_ps(a, _mm256_set1_ps(-2.f))));
    const __m256 q = _mm256_div_ps(one, _mm256_add_ps(one, e));
    t = _mm256_blendv_ps(_mm256_mul_ps(_mm256_sub_ps(one, e), q), t, small);
    if constexpr (kDeriv) {
      const __m256 four_e = _mm256_mul_ps(_mm256_set1_ps(4.f), e);
      const __m256 d_large = _mm256_mul_ps(four_e, _mm256_mul_ps(q, q));
      d = _mm256_blendv_ps(d_large, d, small);
    }
  }
  if constexpr (kDeriv) *deriv = d;
  return _mm256_or_ps(t, sign);
}

#elif defined(__SSE2__)  // the x86-64 baseline: SSE2, 4 lanes at a time, no FMA

namespace sse2 {

// a·b + c without FMA: one more rounding, within the error bounds above.
UK_INLINE __m128 mul_add(__m128 a, __m128 b, __m128 c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }

// mask ? a : b
UK_INLINE __m128 select(__m128 mask, __m128 a, __m128 b) {
  return _mm_or_ps(_mm_and_ps(mask, a), _mm_andnot_ps(mask, b));
}

template <bool kNonPositive>
UK_INLINE __m128 exp(__m128 x_in) {
  const __m128 lo = _mm_set1_ps(coef::kExpLo);
  // Operand order makes min/max return x when x is NaN.
  __m128 x = kNonPositive ? x_in : _mm_min_ps(_mm_set1_ps(coef::kExpHi), x_in);
  x = _mm_max_ps(lo, x);
  const __m128 shifter = _mm_set1_ps(coef::kShifter);
  const __m128 t = mul_add(x, _mm_set1_ps(coef::kLog2e), shifter);
  const __m128 n = _mm_sub_ps(t, shifter);
  __m128 r = _mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(coef::kLn2Hi)));
  r = _mm_sub_ps(r, _mm_mul_ps(n, _mm_set1_ps(coef::kLn2Lo)));
  __m128 p = _mm_set1_ps(coef::kExp[0]);
  for (int k = 1; k < 5; ++k) p = mul_add(p, r, _mm_set1_ps(coef::kExp[k]));
  p = mul_add(p, r, _mm_set1_ps(1.f));
  p = mul_add(p, r, _mm_set1_ps(1.f));
  const __m128 two_n = _mm_castsi128_ps(_mm_slli_epi32(_mm_castps_si128(t), 23));
  const __m128 y = _mm_mul_ps(p, two_n);
  if constexpr (kNonPositive) {
    return y;
  } else {
    return _mm_andnot_ps(_mm_cmplt_ps(x_in, lo), y);
  }
}

template <bool kDeriv>
UK_INLINE __m128 tanh(__m128 y, __m128* deriv) {
  const __m128 sign_bit = _mm_set1_ps(-0.f);
  const __m128 sign = _mm_and_ps(y, sign_bit);
  const __m128 a = _mm_andnot_ps(sign_bit, y);
  const __m128 one = _mm_set1_ps(1.f);
  const __m128 u = _mm_mul_ps(a, a);
  __m128 poly = _mm_set1_ps(coef::kTanh[0]);
  for (int k = 1; k < 6; ++k) poly = mul_add(poly, u, _mm_set1_ps(coef::kTanh[k]));
  __m128 t = mul_add(_mm_mul_ps(poly, u), a, a);
  __m128 d = one;
  if constexpr (kDeriv) d = _mm_sub_ps(one, _mm_mul_ps(t, t));
  const __m128 small = _mm_cmplt_ps(a, _mm_set1_ps(coef::kTanhSmall));
  if (_mm_movemask_ps(small) != 0xF) {
    // −2a ≤ 0; for a > 43.7, e ≈ FLT_MIN rather than 0: tanh = 1, d ≈ 4.7e-38.
    const __m128 e = exp<true>(_mm_mul_ps(a, _mm_set1_ps(-2.f)));
    const __m128 q = _mm_div_ps(one, _mm_add_ps(one, e));
    t = select(small, t, _mm_mul_ps(_mm_sub_ps(one, e), q));
    if constexpr (kDeriv) {
      const __m128 four_e = _mm_mul_ps(_mm_set1_ps(4.f), e);
      d = select(small, d, _mm_mul_ps(four_e, _mm_mul_ps(q, q)));
    }
  }
  if constexpr (kDeriv) *deriv = d;
  return _mm_or_ps(t, sign);
}

// fn over the kLanes / 4 SSE registers of v (ATen's baseline Vectorized<float> is an array).
template <typename Fn>
UK_INLINE Vec each(const Vec& v, Fn&& fn) {
  alignas(64) float x[kLanes];
  v.store(x);
  for (int64_t h = 0; h < kLanes; h += 4) _mm_store_ps(x + h, fn(_mm_load_ps(x + h)));
  return Vec::loadu(x);
}

}  // namespace sse2

template <bool kNonPositive = false>
UK_INLINE Vec exp_vec(const Vec& v) {
  return sse2::each(v, [](__m128 x) { return sse2::exp<kNonPositive>(x); });
}

UK_INLINE Vec max_vec(const Vec& a, const Vec& b) {
  alignas(64) float y[kLanes];
  b.store(y);
  int64_t h = 0;
  return sse2::each(a, [&](__m128 x) {
    const __m128 r = _mm_max_ps(x, _mm_load_ps(y + h));
    h += 4;
    return r;
  });
}

template <bool kDeriv>
UK_INLINE Vec tanh_vec(const Vec& v, Vec* deriv) {
  alignas(64) float d[kLanes];
  int64_t h = 0;
  const Vec t = sse2::each(v, [&](__m128 x) {
    __m128 dx;
    const __m128 r = sse2::tanh<kDeriv>(x, &dx);
    if constexpr (kDeriv) _mm_store_ps(d + h, dx);
    h += 4;
    return r;
  });
  if constexpr (kDeriv) *deriv = Vec::loadu(d);
  return t;
}

#else  // other architectures: ATen's own (scalar) maps

template <bool kNonPositive = false>
UK_INLINE Vec exp_vec(const Vec& v) {
  return v.exp();
}

UK_INLINE Vec max_vec(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }

template <bool kDeriv>
UK_INLINE Vec tanh_vec(const Vec& v, Vec* deriv) {
  if constexpr (kDeriv) {
    // 1 − tanh² as 4e/(1 + e)², e = exp(−2|y|): no cancellation for saturated lanes.
    const Vec e = (v.abs() * Vec(-2.f)).exp();
    const Vec q = Vec(1.f) / (Vec(1.f) + e);
    *deriv = Vec(4.f) * e * q * q;
  }
  return v.tanh();
}

#endif

// ---------------------------------------------------------------------------------------------
// Loads and stores of kStep elements as two fp32 vectors (conversion from/to 16-bit formats
// rounds to nearest even, as Tensor.copy_ does). `count` < kStep for a row's tail; lanes past
// `count` load as 0.

template <typename T>
struct Io {
  UK_INLINE static void load(const T* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
  UK_INLINE static void load(const T* p, int64_t count, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, count));
  }
  UK_INLINE static void store(T* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  UK_INLINE static void store(T* p, int64_t count, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p, count);
  }
};

template <>
struct Io<float> {
  UK_INLINE static void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kLanes);
  }
  UK_INLINE static void load(const float* p, int64_t count, Vec& a, Vec& b) {
    a = Vec::loadu(p, std::min(count, kLanes));
    b = count > kLanes ? Vec::loadu(p + kLanes, count - kLanes) : Vec(0.f);
  }
  UK_INLINE static void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + kLanes);
  }
  UK_INLINE static void store(float* p, int64_t count, const Vec& a, const Vec& b) {
    a.store(p, std::min(count, kLanes));
    if (count > kLanes) b.store(p + kLanes, count - kLanes);
  }
};

static_assert(at::vec::Vectorized<c10::BFloat16>::size() == kStep &&
                  at::vec::Vectorized<c10::Half>::size() == kStep,
              "one 16-bit vector must hold two fp32 vectors");

}  // namespace unlearn_kernels::CPU_CAPABILITY::vec_math
