// Cross-entropy epilogue of the CPU backend. The contract (and readable reference) is
// unlearn_kernels/backends/torch_backend.py: ce_forward / ce_backward, with the per-row options
// of unlearn_kernels/_options.py:CERowMath.
//
// For a chunk of logits x [n, V] (contiguous; fp32, bf16 or fp16 with all math in fp32; fp64,
// for gradcheck, in a plain double loop), class weights c (all ones without them), C = Σ_v c_v:
//   z = c·tanh(x/c) with softcap c (z = x without),   lse_i = log Σ_v exp(z_iv) (returned fp64),
//   nll_i = lse_i − z_{i,y},  CE_i = (1 − ε) c_y nll_i + (ε/V) (C·nll_i − Σ_v c_v (z_v − z_y)),
//   loss_i = π_i (CE_i + c_y s lse_i²),  π_i = exp(−nll_i) with token scaling, else 1;
//   gradient (only when grad_scale a is given), written over x in x's dtype:
//     x_iv ← aπ (P p_iv − (ε/V) c_v − [v = y] (1 − ε) c_y) · ∂z/∂x,
//     P = (1 − ε) c_y + εC/V + 2 s c_y lse_i,   ∂z/∂x = 1 − (z/c)² (or 1).
// Every option at its default gives loss = nll and x ← a (p − e_y), the plain cross-entropy.
//
// One parallel sweep over rows (at::parallel_for). Per row, pass 1 reads the row once for an
// online max + sum of exp (per-lane running max, the sum rescaled only when the max moves,
// Kahan-compensated), and, when asked, Σ_v c_v (z_v − z_y) (label smoothing) and the argmax;
// pass 2 (gradient only) reads it again (usually from L2: one fp32 row of
// a 128k vocabulary is 0.5 MB), recomputes exp and stores the gradient in place. exp is only
// ever taken of a shifted logit (z − max, or z − fp32(lse)), with the shift exact near the
// maximum, so logits of order ±1e4 keep full fp32 accuracy. Options that are off cost nothing:
// smoothing, class weights and the argmax are template parameters of the row loops, and the
// rest are per-row scalars.

#include "vec_math.h"  // first: selects ATen's vectors for CPU_CAPABILITY

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "kernels.h"
#include "row_sweep.h"

namespace unlearn_kernels::CPU_CAPABILITY {
namespace {

using vec_math::exp_vec;
using vec_math::Io;
using vec_math::kAllLanes;
using vec_math::kLanes;
using vec_math::kStep;
using vec_math::max_vec;
using vec_math::tanh_vec;
using vec_math::Vec;

constexpr int64_t kTile = 2 * kStep;  // elements per online-max tile in pass 1
constexpr float kLowest = std::numeric_limits<float>::lowest();

// Softcap parameters: z = cap·tanh(x·inv_cap).
struct Cap {
  float cap = 0.f;
  float inv_cap = 0.f;
};

template <bool kCap>
UK_INLINE Vec to_z(const Vec& x, const Cap& c) {
  if constexpr (kCap) {
    return Vec(c.cap) * tanh_vec<false>(x * Vec(c.inv_cap), nullptr);
  } else {
    return x;
  }
}

// z and ∂z/∂x of the target logit, by the same vector code as the rest of the row (so a row
// whose target is its dominant maximum gets loss = log Σ exp(z − max) exactly; V = 1 gives 0).
template <bool kCap>
inline void target_z(float x, const Cap& c, float& z, float& dz) {
  if constexpr (kCap) {
    Vec d;
    alignas(64) float zs[kLanes], ds[kLanes];
    (Vec(c.cap) * tanh_vec<true>(Vec(x) * Vec(c.inv_cap), &d)).store(zs);
    d.store(ds);
    z = zs[0];
    dz = ds[0];
  } else {
    z = x;
    dz = 1.f;
  }
}

// Per-lane online logsumexp state: lanes hold a running max m and Σ exp(z − m) as a Kahan sum
// (s, comp).
struct OnlineLse {
  Vec m{kLowest};
  Vec s{0.f};
  Vec comp{0.f};

  // Fold in 4 vectors of z (masked lanes hold kLowest, whose exp is 0).
  UK_INLINE void add(const Vec& z0, const Vec& z1, const Vec& z2, const Vec& z3) {
    const Vec mn = max_vec(m, max_vec(max_vec(z0, z1), max_vec(z2, z3)));
    // Rescale only when some lane's max moved (rare after the first tiles of a row). A NaN
    // logit reaches the sum through exp (NaN in, NaN out), so the row's lse is NaN.
    if (Vec(mn != m).zero_mask() != kAllLanes) {
      const Vec scale = exp_vec<true>(m - mn);
      s = s * scale;
      comp = comp * scale;
      m = mn;
    }
    const Vec t = (exp_vec<true>(z0 - m) + exp_vec<true>(z1 - m)) +
                  (exp_vec<true>(z2 - m) + exp_vec<true>(z3 - m));
    const Vec y = t - comp;
    const Vec sum = s + y;
    comp = (sum - s) - y;
    s = sum;
  }

  // Row max M (lanes' max) and S = Σ exp(z − M), combined across lanes in double.
  inline void finish(float& row_max, double& row_sum) const {
    alignas(64) float mm[kLanes], ss[kLanes], cc[kLanes];
    m.store(mm);
    s.store(ss);
    comp.store(cc);
    float mx = mm[0];
    for (int64_t l = 1; l < kLanes; ++l) mx = std::max(mx, mm[l]);
    double total = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) {
      total += (static_cast<double>(ss[l]) - cc[l]) * std::exp(static_cast<double>(mm[l]) - mx);
    }
    row_max = mx;
    row_sum = total;
  }
};

// Label smoothing modes (template parameter kSmooth): off, uniform (no class weights), weighted.
constexpr int kNoSmooth = 0;
constexpr int kUniform = 1;
constexpr int kWeighted = 2;

// Per-lane Kahan sum of c_v (z_v − z_y) (c_v = 1 when uniform). Masked lanes hold z_y (and, when
// weighted, c_v = 0), so they add 0.
struct Spread {
  Vec s{0.f};
  Vec comp{0.f};

  UK_INLINE void add(const Vec& t) {
    const Vec y = t - comp;
    const Vec sum = s + y;
    comp = (sum - s) - y;
    s = sum;
  }

  inline double finish() const {
    alignas(64) float ss[kLanes], cc[kLanes];
    s.store(ss);
    comp.store(cc);
    double total = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) total += static_cast<double>(ss[l]) - cc[l];
    return total;
  }
};

// Per-lane argmax: the running best value and the column where it first occurred (columns
// held as floats, exact below 2^24).
struct ArgMax {
  Vec best{-std::numeric_limits<float>::infinity()};
  Vec col{0.f};

  UK_INLINE void add(const Vec& z, int64_t first) {
    const Vec cols = Vec::arange(static_cast<float>(first), 1.f);
    const Vec better = z > best;  // strict: the first occurrence wins within a lane
    best = Vec::blendv(best, z, better);
    col = Vec::blendv(col, cols, better);
  }

  // The largest value's smallest column (lanes that only saw padding, column ≥ V, are skipped).
  inline int64_t finish(int64_t V) const {
    alignas(64) float bb[kLanes], cc[kLanes];
    best.store(bb);
    col.store(cc);
    int64_t arg = 0;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < kLanes; ++l) {
      const auto c = static_cast<int64_t>(cc[l]);
      if (c >= V) continue;
      if (bb[l] > top || (bb[l] == top && c < arg)) {
        top = bb[l];
        arg = c;
      }
    }
    return arg;
  }
};

// What pass 1 finds in a row.
struct RowStats {
  float max;      // M
  double sum;     // Σ exp(z − M)
  double spread;  // Σ_v c_v (z_v − z_y) (smoothing only)
  int64_t argmax;
};

// Pass 1 over one row: row max, Σ exp(z − max) and, when asked, the smoothing spread and the
// argmax.
template <typename T, bool kCap, int kSmooth, bool kArgmax>
inline RowStats row_stats(const T* row, int64_t V, const Cap& c, const float* cw, float z_y) {
  OnlineLse acc;
  Spread spread;
  ArgMax best;
  const Vec zy(z_y);
  // Fold 4 vectors of z (columns j, j + kLanes, ...); w: class weights of those columns.
  auto fold = [&](int64_t j, const Vec& z0, const Vec& z1, const Vec& z2, const Vec& z3) {
    acc.add(z0, z1, z2, z3);
    if constexpr (kSmooth == kUniform) {
      spread.add(((z0 - zy) + (z1 - zy)) + ((z2 - zy) + (z3 - zy)));
    } else if constexpr (kSmooth == kWeighted) {
      Vec w0, w1, w2, w3;
      Io<float>::load(cw + j, w0, w1);
      Io<float>::load(cw + j + kStep, w2, w3);
      spread.add(((z0 - zy) * w0 + (z1 - zy) * w1) + ((z2 - zy) * w2 + (z3 - zy) * w3));
    }
    if constexpr (kArgmax) {
      best.add(z0, j);
      best.add(z1, j + kLanes);
      best.add(z2, j + 2 * kLanes);
      best.add(z3, j + 3 * kLanes);
    }
  };
  Vec x0, x1, x2, x3;
  int64_t j = 0;
  for (; j + kTile <= V; j += kTile) {
    Io<T>::load(row + j, x0, x1);
    Io<T>::load(row + j + kStep, x2, x3);
    fold(j, to_z<kCap>(x0, c), to_z<kCap>(x1, c), to_z<kCap>(x2, c), to_z<kCap>(x3, c));
  }
  const int64_t rest = V - j;
  if (rest > 0) {
    const int64_t n0 = std::min(rest, kStep);
    const int64_t n1 = rest - n0;
    Vec z0 = zy, z1 = zy, z2 = zy, z3 = zy;
    Io<T>::load(row + j, n0, x0, x1);
    z0 = to_z<kCap>(x0, c);
    z1 = to_z<kCap>(x1, c);
    if (n1 > 0) {
      Io<T>::load(row + j + kStep, n1, x2, x3);
      z2 = to_z<kCap>(x2, c);
      z3 = to_z<kCap>(x3, c);
    }
    // Padding lanes: kLowest for the max and the sums of exp (exp(kLowest − m) = 0) and the
    // argmax (it is skipped there as column ≥ V unless the row is that short); z_y for the
    // spread, so that they add 0 to it.
    const Vec low(kLowest);
    const int64_t counts[4] = {std::min(n0, kLanes), std::max<int64_t>(n0 - kLanes, 0),
                               std::min(n1, kLanes), std::max<int64_t>(n1 - kLanes, 0)};
    Vec* zs[4] = {&z0, &z1, &z2, &z3};
    Vec spread_z[4];
    for (int k = 0; k < 4; ++k) {
      spread_z[k] = Vec::set(zy, *zs[k], counts[k]);
      *zs[k] = Vec::set(low, *zs[k], counts[k]);
    }
    acc.add(z0, z1, z2, z3);
    if constexpr (kSmooth != kNoSmooth) {
      if constexpr (kSmooth == kUniform) {
        spread.add(((spread_z[0] - zy) + (spread_z[1] - zy)) +
                   ((spread_z[2] - zy) + (spread_z[3] - zy)));
      } else {
        Vec w0, w1, w2, w3;
        Io<float>::load(cw + j, n0, w0, w1);
        w2 = w3 = Vec(0.f);
        if (n1 > 0) Io<float>::load(cw + j + kStep, n1, w2, w3);
        spread.add(((spread_z[0] - zy) * w0 + (spread_z[1] - zy) * w1) +
                   ((spread_z[2] - zy) * w2 + (spread_z[3] - zy) * w3));
      }
    }
    if constexpr (kArgmax) {
      best.add(z0, j);
      best.add(z1, j + kLanes);
      best.add(z2, j + 2 * kLanes);
      best.add(z3, j + 3 * kLanes);
    }
  }
  RowStats out{};
  acc.finish(out.max, out.sum);
  if constexpr (kSmooth != kNoSmooth) out.spread = spread.finish();
  if constexpr (kArgmax) out.argmax = best.finish(V);
  return out;
}

// Gradient of kLanes logits: (k·exp(z − shift) − kc·w)·∂z/∂x (the kc term with smoothing only;
// w = 1 when uniform).
template <bool kCap, int kSmooth>
UK_INLINE Vec grad_vec(const Vec& x, const Vec& shift, const Vec& k, const Vec& kc, const Vec& w,
                       const Cap& c) {
  Vec d, z;
  if constexpr (kCap) {
    z = Vec(c.cap) * tanh_vec<true>(x * Vec(c.inv_cap), &d);
  } else {
    z = x;
  }
  Vec g = exp_vec(z - shift) * k;
  if constexpr (kSmooth == kUniform) g = g - kc;
  if constexpr (kSmooth == kWeighted) g = g - kc * w;
  if constexpr (kCap) g = g * d;
  return g;
}

// Pass 2 over one row: x_v ← (k·exp(z_v − shift) − kc·c_v)·∂z/∂x for every v (the target is
// fixed after).
template <typename T, bool kCap, int kSmooth>
inline void row_grad(T* row, int64_t V, float shift_f, float k_f, float kc_f, const float* cw,
                     const Cap& c) {
  const Vec shift(shift_f), k(k_f), kc(kc_f);
  Vec x0, x1, w0(1.f), w1(1.f);
  int64_t j = 0;
  for (; j + kStep <= V; j += kStep) {
    Io<T>::load(row + j, x0, x1);
    if constexpr (kSmooth == kWeighted) Io<float>::load(cw + j, w0, w1);
    Io<T>::store(row + j, grad_vec<kCap, kSmooth>(x0, shift, k, kc, w0, c),
                 grad_vec<kCap, kSmooth>(x1, shift, k, kc, w1, c));
  }
  const int64_t rest = V - j;
  if (rest > 0) {
    Io<T>::load(row + j, rest, x0, x1);
    if constexpr (kSmooth == kWeighted) Io<float>::load(cw + j, rest, w0, w1);
    Io<T>::store(row + j, rest, grad_vec<kCap, kSmooth>(x0, shift, k, kc, w0, c),
                 grad_vec<kCap, kSmooth>(x1, shift, k, kc, w1, c));
  }
}

inline Cap make_cap(std::optional<double> softcap) {
  return softcap ? Cap{static_cast<float>(*softcap), static_cast<float>(1.0 / *softcap)} : Cap{};
}

// The per-row options (CERowMath) as the kernels use them.
struct CeMath {
  double eps = 0.0;        // label smoothing ε
  double class_sum = 0.0;  // C = Σ_v c_v (V without class weights)
  double z_scale = 0.0;    // s of the z-loss
  bool token_scaling = false;
  int64_t V = 1;

  // (ℓ, π Z) of a row from nll, lse, c_y and the smoothing spread Σ_v c_v (z_v − z_y).
  std::pair<double, double> loss(double nll, double lse, double c_y, double spread) const {
    double ce = c_y * nll;
    if (eps > 0.0) ce = (1.0 - eps) * ce + eps / static_cast<double>(V) * (class_sum * nll - spread);
    double z_part = c_y * z_scale * lse * lse;
    if (token_scaling) {
      const double pi = std::exp(-nll);
      ce *= pi;
      z_part *= pi;
    }
    return {ce + z_part, z_part};
  }
};

// Gradient factors of a row with scale s: g_v = a (P p_v − (ε/V) c_v), and at the target
// g_y = a (P p_y − c_eps), c_eps = (1 − ε + ε/V) c_y (the ε/V·c_y of the smoothing included).
struct GradFactors {
  double a, P, kc, c_eps;

  GradFactors(const CeMath& m, double s, double nll, double lse, double c_y) {
    const double inv_v = 1.0 / static_cast<double>(m.V);
    a = m.token_scaling ? s * std::exp(-nll) : s;
    P = (1.0 - m.eps) * c_y + m.eps * m.class_sum * inv_v + 2.0 * m.z_scale * c_y * lse;
    kc = a * m.eps * inv_v;
    c_eps = (1.0 - m.eps + m.eps * inv_v) * c_y;
  }
};

// Per-row outputs of the forward (pointers are null when not asked).
struct RowOut {
  float* loss;
  double* lse;
  float* z_part;
  int64_t* argmax;
};

template <typename T, bool kCap, int kSmooth, bool kArgmax>
void ce_forward_impl(T* x, int64_t n, int64_t V, const int64_t* target, const float* grad_scale,
                     const float* cw, const CeMath& m, const Cap& c, const RowOut& out) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const int64_t y = target[i];
      float z_y, dz_y;
      target_z<kCap>(static_cast<float>(row[y]), c, z_y, dz_y);
      const RowStats st = row_stats<T, kCap, kSmooth, kArgmax>(row, V, c, cw, z_y);
      const double log_sum = std::log(st.sum);
      const double nll = (static_cast<double>(st.max) - z_y) + log_sum;
      const double lse = st.max + log_sum;
      const double c_y = cw != nullptr ? cw[y] : 1.0;
      const auto [loss, z_part] = m.loss(nll, lse, c_y, st.spread);
      out.loss[i] = static_cast<float>(loss);
      out.lse[i] = lse;
      if (out.z_part != nullptr) out.z_part[i] = static_cast<float>(z_part);
      if constexpr (kArgmax) out.argmax[i] = st.argmax;
      if (grad_scale != nullptr) {
        const GradFactors f(m, grad_scale[i], nll, lse, c_y);
        // exp(z − lse) = exp(z − max) / S: the shift z − max is exact in fp32 even for huge
        // logits, where z − fp32(lse) would carry lse's rounding (ulp(1e4) ≈ 1e-3).
        row_grad<T, kCap, kSmooth>(row, V, st.max, static_cast<float>(f.a * f.P / st.sum),
                                   static_cast<float>(f.kc), cw, c);
        const double p_y = std::exp(static_cast<double>(z_y) - st.max) / st.sum;
        row[y] = static_cast<T>(static_cast<float>(f.a * (f.P * p_y - f.c_eps) * dz_y));
      }
    }
  });
}

template <typename T, bool kCap, int kSmooth>
void ce_backward_impl(T* x, int64_t n, int64_t V, const int64_t* target, const double* lse,
                      const float* grad_scale, const float* cw, const CeMath& m, const Cap& c) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const int64_t y = target[i];
      float z_y, dz_y;
      target_z<kCap>(static_cast<float>(row[y]), c, z_y, dz_y);
      const double c_y = cw != nullptr ? cw[y] : 1.0;
      const GradFactors f(m, grad_scale[i], lse[i] - z_y, lse[i], c_y);
      // lse = hi + lo with hi in fp32: z − hi is exact near the maximum, and exp(−lo) is folded
      // into the row's factor, so the saved fp64 lse rebuilds the softmax to fp32 accuracy.
      const float hi = static_cast<float>(lse[i]);
      row_grad<T, kCap, kSmooth>(row, V, hi, static_cast<float>(f.a * f.P * std::exp(hi - lse[i])),
                                 static_cast<float>(f.kc), cw, c);
      const double p_y = std::exp(static_cast<double>(z_y) - lse[i]);
      row[y] = static_cast<T>(static_cast<float>(f.a * (f.P * p_y - f.c_eps) * dz_y));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// fp64 inputs (for gradcheck): the same computation in plain scalar double arithmetic.

inline void z_f64(double x, std::optional<double> softcap, double& z, double& dz) {
  if (softcap) {
    const double y = x / *softcap;
    z = *softcap * std::tanh(y);
    const double ch = std::cosh(y);  // 1 − tanh² = sech², without the cancellation
    dz = 1.0 / (ch * ch);
  } else {
    z = x;
    dz = 1.0;
  }
}

// Per-row outputs of the fp64 forward (null when not asked, all null in backward).
struct RowOut64 {
  double* loss;
  double* lse;
  double* z_part;
  int64_t* argmax;
};

void ce_f64(double* x, int64_t n, int64_t V, const int64_t* target, const double* lse_in,
            const double* grad_scale, const double* cw, const CeMath& m,
            std::optional<double> softcap, const RowOut64& out) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double* row = x + i * V;
      const int64_t y = target[i];
      double z, dz, z_y, dz_y;
      z_f64(row[y], softcap, z_y, dz_y);
      const double c_y = cw != nullptr ? cw[y] : 1.0;
      double lse;
      if (lse_in != nullptr) {
        lse = lse_in[i];
      } else {
        double mx = std::numeric_limits<double>::lowest(), sum = 0.0, spread = 0.0;
        int64_t arg = 0;
        for (int64_t v = 0; v < V; ++v) {
          z_f64(row[v], softcap, z, dz);
          if (z > mx) {
            sum = sum * std::exp(mx - z) + 1.0;
            mx = z;
            arg = v;
          } else {
            sum += std::exp(z - mx);  // 0 for z = −inf; NaN propagates
          }
          if (m.eps > 0.0) spread += (cw != nullptr ? cw[v] : 1.0) * (z - z_y);
        }
        lse = mx + std::log(sum);
        const auto [loss, z_part] = m.loss((mx - z_y) + std::log(sum), lse, c_y, spread);
        out.loss[i] = loss;
        out.lse[i] = lse;
        if (out.z_part != nullptr) out.z_part[i] = z_part;
        if (out.argmax != nullptr) out.argmax[i] = arg;
      }
      if (grad_scale != nullptr) {
        const GradFactors f(m, grad_scale[i], lse - z_y, lse, c_y);
        for (int64_t v = 0; v < V; ++v) {
          z_f64(row[v], softcap, z, dz);
          const double w = cw != nullptr ? cw[v] : 1.0;
          row[v] = (f.a * f.P * std::exp(z - lse) - f.kc * w) * dz;
        }
        row[y] = f.a * (f.P * std::exp(z_y - lse) - f.c_eps) * dz_y;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points.

// Calls fn(T{}, cap, smooth, ...flags) with the compile-time flavour of each runtime choice:
// x's (reduced or single precision) dtype, std::bool_constant for softcap (and each flag),
// std::integral_constant for the smoothing mode.
template <typename Fn>
void with_bools(Fn&& fn) {
  fn();
}

template <typename Fn, typename... Rest>
void with_bools(Fn&& fn, bool flag, Rest... rest) {
  with_bools([&](auto... tags) {
    if (flag) {
      fn(std::true_type{}, tags...);
    } else {
      fn(std::false_type{}, tags...);
    }
  }, rest...);
}

template <typename Fn>
void dispatch(at::ScalarType dtype, int smooth, Fn&& fn) {
  auto with_smooth = [&](auto tag) {
    switch (smooth) {
      case kNoSmooth: return fn(tag, std::integral_constant<int, kNoSmooth>{});
      case kUniform: return fn(tag, std::integral_constant<int, kUniform>{});
      default: return fn(tag, std::integral_constant<int, kWeighted>{});
    }
  };
  switch (dtype) {
    case at::kFloat: return with_smooth(float{});
    case at::kBFloat16: return with_smooth(c10::BFloat16{});
    case at::kHalf: return with_smooth(c10::Half{});
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", dtype);
  }
}

// Shape/dtype/device checks shared by both entry points; targets are range-checked so the
// kernel never reads outside a row.
void check_common(const char* fn, const at::Tensor& x, const at::Tensor& target,
                  std::optional<double> softcap, double label_smoothing,
                  double lse_square_scale) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), fn, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, fn, ": x must be [n, V], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), fn, ": x must be contiguous (it is written in place)");
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                    fn, ": x must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK_VALUE(x.size(1) > 0 || x.size(0) == 0, fn, ": x must have V >= 1 columns");
  TORCH_CHECK_VALUE(target.device().is_cpu() && target.scalar_type() == at::kLong &&
                        target.dim() == 1 && target.size(0) == x.size(0),
                    fn, ": target must be a CPU int64 tensor of shape [", x.size(0), "], got ",
                    target.scalar_type(), " of shape ", target.sizes());
  TORCH_CHECK_VALUE(!softcap || (std::isfinite(*softcap) && *softcap > 0.0), fn,
                    ": softcap must be a positive finite number or None, got ", *softcap);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing < 1.0, fn,
                    ": label_smoothing must lie in [0, 1), got ", label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(lse_square_scale) && lse_square_scale >= 0.0, fn,
                    ": lse_square_scale must be finite and >= 0, got ", lse_square_scale);
}

void check_targets(const char* fn, const at::Tensor& target, int64_t V) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.size(0); ++i) {
    TORCH_CHECK_VALUE(t[i] >= 0 && t[i] < V, fn, ": target[", i, "] = ", t[i],
                      " is outside [0, ", V, ")");
  }
}

// A per-row vector ([n], any float dtype) as a contiguous tensor of `dtype` (n values: free).
at::Tensor row_vector(const char* fn, const char* name, const at::Tensor& v, int64_t n,
                      at::ScalarType dtype) {
  TORCH_CHECK_VALUE(v.device().is_cpu() && at::isFloatingType(v.scalar_type()) && v.dim() == 1 &&
                        v.size(0) == n,
                    fn, ": ", name, " must be a floating-point CPU tensor of shape [", n,
                    "], got ", v.scalar_type(), " of shape ", v.sizes());
  return v.to(dtype).contiguous();
}

// Accumulation dtype: fp32, or fp64 for fp64 logits.
at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The options of CERowMath, and the class weights ([V], accumulation dtype) when given.
struct Options {
  CeMath math;
  at::Tensor class_weight;
  int smooth = kNoSmooth;

  Options(const char* fn, const at::Tensor& x, const std::optional<at::Tensor>& class_weight_in,
          double label_smoothing, double class_weight_sum, double lse_square_scale,
          bool token_scaling) {
    const int64_t V = x.size(1);
    if (class_weight_in) class_weight = row_vector(fn, "class_weight", *class_weight_in, V, acc_dtype(x));
    const bool weighted = class_weight.defined();
    math = CeMath{label_smoothing, weighted ? class_weight_sum : static_cast<double>(V),
                  lse_square_scale, token_scaling, std::max<int64_t>(V, 1)};
    if (label_smoothing > 0.0) smooth = weighted ? kWeighted : kUniform;
  }

  template <typename A>
  const A* weights() const {
    return class_weight.defined() ? class_weight.data_ptr<A>() : nullptr;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>
ce_forward(at::Tensor x, const at::Tensor& target_in,
           const std::optional<at::Tensor>& grad_scale_in, std::optional<double> softcap,
           const std::optional<at::Tensor>& class_weight, double label_smoothing,
           double class_weight_sum, double lse_square_scale, bool token_scaling, bool argmax,
           bool z_loss) {
  constexpr const char* fn = "ce_forward";
  check_common(fn, x, target_in, softcap, label_smoothing, lse_square_scale);
  const int64_t n = x.size(0), V = x.size(1);
  const at::Tensor target = target_in.contiguous();
  check_targets(fn, target, V);
  const at::ScalarType acc = acc_dtype(x);
  at::Tensor grad_scale;
  if (grad_scale_in) grad_scale = row_vector(fn, "grad_scale", *grad_scale_in, n, acc);
  const Options opt(fn, x, class_weight, label_smoothing, class_weight_sum, lse_square_scale,
                    token_scaling);
  at::Tensor loss = at::empty({n}, x.options().dtype(acc));
  at::Tensor lse = at::empty({n}, x.options().dtype(at::kDouble));
  std::optional<at::Tensor> z_part, arg;
  if (z_loss) z_part = at::empty({n}, x.options().dtype(acc));
  if (argmax) arg = at::empty({n}, x.options().dtype(at::kLong));
  if (n == 0) return {loss, lse, z_part, arg};
  int64_t* arg_ptr = argmax ? arg->data_ptr<int64_t>() : nullptr;
  if (acc == at::kDouble) {
    ce_f64(x.data_ptr<double>(), n, V, target.data_ptr<int64_t>(), nullptr,
           grad_scale.defined() ? grad_scale.data_ptr<double>() : nullptr, opt.weights<double>(),
           opt.math, softcap,
           RowOut64{loss.data_ptr<double>(), lse.data_ptr<double>(),
                    z_loss ? z_part->data_ptr<double>() : nullptr, arg_ptr});
  } else {
    const RowOut out{loss.data_ptr<float>(), lse.data_ptr<double>(),
                     z_loss ? z_part->data_ptr<float>() : nullptr, arg_ptr};
    dispatch(x.scalar_type(), opt.smooth, [&](auto tag, auto smooth) {
      using T = decltype(tag);
      with_bools([&](auto cap, auto with_argmax) {
        ce_forward_impl<T, decltype(cap)::value, decltype(smooth)::value,
                        decltype(with_argmax)::value>(
            x.data_ptr<T>(), n, V, target.data_ptr<int64_t>(),
            grad_scale.defined() ? grad_scale.data_ptr<float>() : nullptr, opt.weights<float>(),
            opt.math, make_cap(softcap), out);
      }, softcap.has_value(), argmax);
    });
  }
  if (grad_scale.defined()) mark_written(x);
  return {loss, lse, z_part, arg};
}

void ce_backward(at::Tensor x, const at::Tensor& target_in, const at::Tensor& lse_in,
                 const at::Tensor& grad_scale_in, std::optional<double> softcap,
                 const std::optional<at::Tensor>& class_weight, double label_smoothing,
                 double class_weight_sum, double lse_square_scale, bool token_scaling) {
  constexpr const char* fn = "ce_backward";
  check_common(fn, x, target_in, softcap, label_smoothing, lse_square_scale);
  const int64_t n = x.size(0), V = x.size(1);
  const at::Tensor target = target_in.contiguous();
  check_targets(fn, target, V);
  const at::ScalarType acc = acc_dtype(x);
  const at::Tensor lse = row_vector(fn, "lse", lse_in, n, at::kDouble);
  const at::Tensor grad_scale = row_vector(fn, "grad_scale", grad_scale_in, n, acc);
  const Options opt(fn, x, class_weight, label_smoothing, class_weight_sum, lse_square_scale,
                    token_scaling);
  if (n == 0) return;
  if (acc == at::kDouble) {
    ce_f64(x.data_ptr<double>(), n, V, target.data_ptr<int64_t>(), lse.data_ptr<double>(),
           grad_scale.data_ptr<double>(), opt.weights<double>(), opt.math, softcap,
           RowOut64{nullptr, nullptr, nullptr, nullptr});
  } else {
    dispatch(x.scalar_type(), opt.smooth, [&](auto tag, auto smooth) {
      using T = decltype(tag);
      with_bools([&](auto cap) {
        ce_backward_impl<T, decltype(cap)::value, decltype(smooth)::value>(
            x.data_ptr<T>(), n, V, target.data_ptr<int64_t>(), lse.data_ptr<double>(),
            grad_scale.data_ptr<float>(), opt.weights<float>(), opt.math, make_cap(softcap));
      }, softcap.has_value());
    });
  }
  mark_written(x);
}

}  // namespace unlearn_kernels::CPU_CAPABILITY
