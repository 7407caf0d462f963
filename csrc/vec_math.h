// Vectorised fp32 helpers shared by the CPU epilogues: exp, max and tanh, and loads/stores of
// fp32, bf16 and fp16 rows as fp32 vectors. Include this header *before* any other ATen header:
// it selects ATen's AVX2 Vectorized<float> (see below), which must be decided before ATen is
// first seen.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(CPU_CAPABILITY)
// ATen picks its AVX2 Vectorized<float> / <BFloat16> / <Half> only under CPU_CAPABILITY_AVX2,
// which torch defines when it builds its own kernels, not for extensions (which otherwise get
// the generic array-of-scalars fallback). Naming the inline namespace AVX2 keeps these
// instantiations apart from generic ones another translation unit of _C may compile.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define UK_VEC_AVX2 1
#endif

// ATen's vector headers use `#pragma unroll`, unknown to GCC (silenced here on GCC >= 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstdint>
#include <tuple>

#if defined(UK_VEC_AVX2)
#include <immintrin.h>
#endif

// The per-vector helpers must inline into the row loops (an out-of-line call passes the
// vectors through memory).
#define UK_INLINE C10_ALWAYS_INLINE

namespace unlearn_kernels::vec_math {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kStep = 2 * kLanes;  // elements per load/store step (one 16-bit vector)
constexpr int kAllLanes = (1 << kLanes) - 1;  // a lane bit mask with every lane set

// ---------------------------------------------------------------------------------------------
// exp, max and tanh. The AVX2 versions are inline FMA code (no Sleef call); the
// fallback maps the scalar std:: functions lane by lane.

#if defined(UK_VEC_AVX2)

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
template <bool kNonPositive = false>
UK_INLINE Vec exp_vec(const Vec& v) {
  const __m256 x_in = v;
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  // Operand order makes min/max return x when x is NaN.
  __m256 x = kNonPositive ? x_in : _mm256_min_ps(_mm256_set1_ps(88.37f), x_in);
  x = _mm256_max_ps(lo, x);
  const __m256 shifter = _mm256_set1_ps(12582912.f + 127.f);  // 1.5·2^23 + exponent bias
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(t, shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.383684459e-03f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.374815807e-03f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166822508e-02f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666641980e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.999999106e-01f));
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

// tanh(y) and, when kDeriv, d = 1 − tanh(y)². With a = |y|:
//   a < 0.625: tanh = a + a³·P(a²), P of degree 5 fitted for relative error (< 1e-9);
//   otherwise: e = exp(−2a), tanh = (1 − e)/(1 + e), d = 4e/(1 + e)² (no cancellation in d).
// The second branch (an exp and a division) is skipped when all lanes are small, the common
// case for softcapped logits (|x| < 0.625·c). Max error 2 ulp for tanh, 4.5 ulp for d.
template <bool kDeriv>
UK_INLINE Vec tanh_vec(const Vec& v, Vec* deriv) {
  const __m256 y = v;
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  const __m256 sign = _mm256_and_ps(y, sign_bit);
  const __m256 a = _mm256_andnot_ps(sign_bit, y);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 u = _mm256_mul_ps(a, a);
  __m256 poly = _mm256_set1_ps(2.167856554e-03f);
  poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(-8.205491118e-03f));
  poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(2.171256766e-02f));
  poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(-5.394906178e-02f));
  poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(1.333322525e-01f));
  poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(-3.333333135e-01f));
  __m256 t = _mm256_fmadd_ps(_mm256_mul_ps(poly, u), a, a);
  __m256 d;
  if constexpr (kDeriv) d = _mm256_fnmadd_ps(t, t, one);
  const __m256 small = _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
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

#else  // portable fallback

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

}  // namespace unlearn_kernels::vec_math
