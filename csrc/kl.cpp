// Divergence epilogues of the CPU backend (fused_linear_kl, fused_linear_kl_topk). Contract and
// readable reference: unlearn_kernels/backends/torch_backend.py (kl_forward, kl_backward,
// kl_topk_forward, kl_topk_backward) with the per-row options of _options.py:KLRowMath.
//
// Chunk x [n, V] of student logits (fp32, bf16, fp16, or fp64 for gradcheck; contiguous),
// z = cap(x)/τ (cap(x) = c·tanh(x/c) with softcap, else x), q = softmax(z). Math in fp32 (fp64
// for fp64 x), per-row scalars in fp64.
//
// Exact: x_ref [n, V] (x's dtype), z_r = x_ref/τ (capped too with softcap_ref), p = softmax(z_r),
//   d = log q − log p. Pass 1 (online, per-lane running maxima): lse = log Σ e^z,
//   lse_r = log Σ e^{z_r} and, for the forward KL, Σ_v p_v (z_r − z)_v (reverse: Σ q (z − z_r));
//   KL = that − (lse_r − lse) (both parts small when p ≈ q). The generalised JSD (0 < β < 1)
//   needs both normalisers first: pass 2 forms Σ β p (log p − log m) + (1 − β) q (log q − log m)
//   and its centre K = Σ q (log q − log m), m = βp + (1 − β)q, with one exp and one log1p per
//   logit. Gradient pass (usually from L2/L3): x ← s/τ · g · sech², g = q − p (forward),
//   q (d − K) (reverse, K = KL), (1 − β) q (log q − log m − K) (JSD).
// Top-k: the k logits of the row's top-k are read, then overwritten by −inf so that pass 1
//   sees only the tail: lse_t = log Σ_{v∉K} e^{z_v} directly, never as a difference; lse =
//   logaddexp(lse_t, lse_K). KL̃ = Σ_K p_k (log p_k − log q_k) + p_t (log p_t − log q_t) over k + 1
//   terms in fp64. Gradient: x_v ← s/τ·(P − p_t/q_t)·q_v over the tail (one exp; −inf entries
//   give 0), then x_k ← s/τ·(P q_k − p_k) on the top-k, P = Σ_K p_k + p_t; without a gradient
//   the k logits are restored.
//
// Zero probabilities: p = 0 contributes 0 (a blend, so 0·inf never makes NaN), p_t = 0 drops
// the tail term and its gradient, and an empty tail (k = V) has lse_t = −inf.
// Undefined references (the torch backend's rule): a row whose lse_r is not finite (exact) or
// whose P is not finite (top-k) gets a NaN loss and an all-NaN gradient row.
// Exponentials are only taken of shifted values: z − m, or z − lse with the fp64 lse split into
// fp32 hi + lo (z − hi is exact near the maximum, so |logits| ~ 1e4 keep full precision).
//
// Rows are split over threads with at::parallel_for. Sums accumulate per lane in fp32 for
// kFlush steps, then in fp64.

#include "vec_math.h"  // first: selects ATen's vectors for CPU_CAPABILITY

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
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
using vec_math::tanh_vec;
using vec_math::Vec;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr int64_t kFlush = 16;  // fp32 steps (kStep elements each) before a flush to fp64

// Math type: fp64 for fp64 storage, fp32 otherwise.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool kScalar = std::is_same_v<T, double>;

// A per-row shift c = hi + lo (fp64 c, hi and lo in the math type); ±inf stay (±inf, 0).
template <typename A>
struct Shift {
  A hi, lo;
  explicit Shift(double c) : hi(static_cast<A>(c)), lo(0) {
    if (std::isfinite(hi)) lo = static_cast<A>(c - static_cast<double>(hi));
  }
};

// Lanes ≥ count of (a, b) (a holds lanes [0, kLanes)) set to −inf: masked elements then
// contribute e^{−inf} = 0 to every sum and nothing to any max.
UK_INLINE void mask_tail(Vec& a, Vec& b, int64_t count) {
  const Vec neg_inf(-std::numeric_limits<float>::infinity());
  a = Vec::set(neg_inf, a, std::min(count, kLanes));
  b = Vec::set(neg_inf, b, std::max<int64_t>(count - kLanes, 0));
}

// e · d, and 0 where e = 0 (whatever d is: ±inf or NaN from −inf logits).
UK_INLINE Vec weighted(const Vec& e, const Vec& d) {
  return Vec::blendv(e * d, Vec(0.f), e == Vec(0.f));
}

// Per-lane online log-sum-exp: running max m (kLowest before any finite value, so −inf
// logits never meet −inf − −inf) and Σ e^{z − m}, plus an optional Σ e^{z − m}·d rescaled
// along with it; fp32 partial sums, flushed into fp64 lanes every kFlush steps and rescaled
// (rarely, after a row's first tiles) when a lane's max moves. A NaN logit poisons the row.
struct OnlineLanes {
  Vec m{kLowest};
  Vec part{0.f}, part_d{0.f};
  double total[kLanes] = {}, total_d[kLanes] = {};

  UK_INLINE void raise(const Vec& tile_max) {
    const Vec mn = at::vec::maximum(m, tile_max);
    if (Vec(mn != m).zero_mask() == kAllLanes) return;
    const Vec scale = exp_vec(m - mn);
    part = part * scale;
    part_d = part_d * scale;
    alignas(64) float f[kLanes];
    scale.store(f);
    for (int64_t l = 0; l < kLanes; ++l) {
      total[l] *= f[l];
      total_d[l] *= f[l];
    }
    m = mn;
  }

  void flush() {
    alignas(64) float f[kLanes], g[kLanes];
    part.store(f);
    part_d.store(g);
    for (int64_t l = 0; l < kLanes; ++l) {
      total[l] += f[l];
      total_d[l] += g[l];
    }
    part = Vec(0.f);
    part_d = Vec(0.f);
  }

  // lse = M + log S over the lanes (M their max; −inf when nothing was finite) and
  // Σ e^{z−M}·d / S (the e-weighted mean of d).
  void finish(double& lse, double& mean_d) {
    flush();
    alignas(64) float mm[kLanes];
    m.store(mm);
    float M = mm[0];
    for (int64_t l = 1; l < kLanes; ++l) M = std::isnan(mm[l]) ? mm[l] : std::max(M, mm[l]);
    double S = 0.0, D = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) {
      const double w = std::exp(static_cast<double>(mm[l]) - M);
      S += total[l] * w;
      D += total_d[l] * w;
    }
    lse = M == kLowest ? -kInf : M + std::log(S);
    mean_d = D / S;
  }
};

// ---- logits ----------------------------------------------------------------------------------

// The map of one side's logits: z = cap(x)/τ, cap(x) = c·tanh(x/c) (the identity without
// softcap); A is the math type.
template <typename A>
struct ZMap {
  A inv_tau = 1;
  A cap = 0;
  A inv_cap = 0;
};

// z of kLanes logits and, with kDeriv, sech²(x/c) into *d (∂z/∂x = d/τ; left unset without
// softcap). x = −inf (a masked top-k entry) stays −inf.
template <bool kCap, bool kDeriv = false>
UK_INLINE Vec z_vec(const Vec& x, const ZMap<float>& m, Vec* d = nullptr) {
  if constexpr (kCap) {
    const Vec z = Vec(m.cap) * tanh_vec<kDeriv>(x * Vec(m.inv_cap), d) * Vec(m.inv_tau);
    return Vec::blendv(z, x, x == Vec(-std::numeric_limits<float>::infinity()));
  } else {
    return x * Vec(m.inv_tau);
  }
}

// The scalar map in the math type; fp32 goes through z_vec so that a single logit is rounded
// exactly as the row passes round it.
template <bool kCap, typename A>
inline A z_one(A x, const ZMap<A>& m, A* d = nullptr) {
  if constexpr (std::is_same_v<A, double>) {
    if constexpr (kCap) {
      if (x == -kInf) {
        if (d != nullptr) *d = 0.0;
        return -kInf;
      }
      const double ch = std::cosh(x * m.inv_cap);  // sech² without 1 − tanh²'s cancellation
      if (d != nullptr) *d = 1.0 / (ch * ch);
      return m.cap * std::tanh(x * m.inv_cap) * m.inv_tau;
    } else {
      if (d != nullptr) *d = 1.0;
      return x * m.inv_tau;
    }
  } else {
    Vec dv(1.f);
    alignas(64) float zs[kLanes], ds[kLanes];
    z_vec<kCap, true>(Vec(x), m, &dv).store(zs);
    dv.store(ds);
    if (d != nullptr) *d = ds[0];
    return zs[0];
  }
}

// Divergences (template parameter kDiv): forward KL(p ‖ q), reverse KL(q ‖ p), generalised JSD.
constexpr int kForward = 0;
constexpr int kReverse = 1;
constexpr int kJsd = 2;

// ---- row primitives ------------------------------------------------------------------------

// log Σ_v e^{z_v} (−inf for an all −inf row): one pass.
template <typename T, bool kCap>
double row_lse(const T* row, int64_t V, const ZMap<Acc<T>>& zm) {
  if constexpr (kScalar<T>) {
    double m = -kInf, s = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      const double z = z_one<kCap>(row[v], zm);
      m = std::isnan(z) ? z : std::max(m, z);
    }
    if (m == -kInf) return -kInf;
    for (int64_t v = 0; v < V; ++v) s += std::exp(z_one<kCap>(row[v], zm) - m);
    return m + std::log(s);
  } else {
    OnlineLanes acc;
    auto fold = [&](Vec a, Vec b) {
      acc.raise(at::vec::maximum(a, b));
      acc.part = acc.part + (exp_vec(a - acc.m) + exp_vec(b - acc.m));
    };
    Vec a, b;
    int64_t j = 0;
    for (int64_t step = 1; j + kStep <= V; j += kStep, ++step) {
      Io<T>::load(row + j, a, b);
      fold(z_vec<kCap>(a, zm), z_vec<kCap>(b, zm));
      if (step % kFlush == 0) acc.flush();
    }
    if (j < V) {
      Io<T>::load(row + j, V - j, a, b);
      a = z_vec<kCap>(a, zm);
      b = z_vec<kCap>(b, zm);
      mask_tail(a, b, V - j);
      fold(a, b);
    }
    double lse, unused;
    acc.finish(lse, unused);
    return lse;
  }
}

// Per-lane fp32 sums flushed into fp64 lanes every kFlush steps.
struct LaneSum {
  Vec part{0.f};
  double total[kLanes] = {};
  int64_t steps = 0;

  UK_INLINE void add(const Vec& v) {
    part = part + v;
    if (++steps % kFlush == 0) flush();
  }
  void flush() {
    alignas(64) float f[kLanes];
    part.store(f);
    for (int64_t l = 0; l < kLanes; ++l) total[l] += f[l];
    part = Vec(0.f);
  }
  double finish() {
    flush();
    double s = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) s += total[l];
    return s;
  }
};

// Calls fn(z0, z1, zr0, zr1, d0, d1) for every kStep logits of both rows (the padding lanes of
// the last step hold −inf in both); d0, d1 are sech²(x/c) when kWrite and softcapped. With
// kWrite, fn returns the two gradient vectors, stored over x.
template <typename T, bool kCap, bool kCapRef, bool kWrite, typename Fn>
UK_INLINE void for_both_rows(std::conditional_t<kWrite, T*, const T*> x, const T* xr, int64_t V,
                             const ZMap<float>& zm, const ZMap<float>& zr_map, Fn&& fn) {
  constexpr bool kDeriv = kWrite && kCap;
  Vec a, b, ar, br, da(1.f), db(1.f);
  auto run = [&](int64_t j, int64_t count) {
    if (count == kStep) {
      Io<T>::load(x + j, a, b);
      Io<T>::load(xr + j, ar, br);
    } else {
      Io<T>::load(x + j, count, a, b);
      Io<T>::load(xr + j, count, ar, br);
    }
    Vec z0 = z_vec<kCap, kDeriv>(a, zm, &da), z1 = z_vec<kCap, kDeriv>(b, zm, &db);
    Vec r0 = z_vec<kCapRef>(ar, zr_map), r1 = z_vec<kCapRef>(br, zr_map);
    if (count < kStep) {
      mask_tail(z0, z1, count);
      mask_tail(r0, r1, count);
    }
    if constexpr (kWrite) {
      const auto [g0, g1] = fn(z0, z1, r0, r1, da, db);
      if (count == kStep) {
        Io<T>::store(x + j, g0, g1);
      } else {
        Io<T>::store(x + j, count, g0, g1);
      }
    } else {
      fn(z0, z1, r0, r1, da, db);
    }
  };
  int64_t j = 0;
  for (; j + kStep <= V; j += kStep) run(j, kStep);
  if (j < V) run(j, V - j);
}

// (log p − log m, log q − log m) of the generalised JSD from d = log q − log p (see
// torch_backend._jsd_logs): one exp and one log1p.
struct JsdLogs {
  float lb, l1b;

  UK_INLINE std::pair<Vec, Vec> operator()(const Vec& d) const {
    const Vec shared = exp_vec<true>(Vec(0.f) - (d + Vec(l1b - lb)).abs()).log1p();
    const Vec log_p_m = Vec(0.f) - (at::vec::maximum(d + Vec(l1b), Vec(lb)) + shared);
    const Vec log_q_m = Vec(0.f) - (at::vec::maximum(Vec(lb) - d, Vec(l1b)) + shared);
    return {log_p_m, log_q_m};
  }
};

inline std::pair<double, double> jsd_logs(double d, double beta) {
  const double lb = std::log(beta), l1b = std::log1p(-beta);
  const double shared = std::log1p(std::exp(-std::abs(l1b - lb + d)));
  return {-(std::max(d + l1b, lb) + shared), -(std::max(lb - d, l1b) + shared)};
}

// Per-row statistics of the exact divergences.
struct KlRow {
  double lse, lse_r, loss, centre;
};

// The divergence of one row pair (KLRowMath): pass 1 (online) finds both log-normalisers and,
// for the two KLs, the loss (Σ p (z_r − z) or Σ q (z − z_r) rides along, weighted by the
// online exponentials); the JSD needs the normalisers first, so a second pass forms it and
// its centre K = Σ q (log q − log m).
template <typename T, bool kCap, bool kCapRef, int kDiv>
KlRow row_divergence(const T* x, const T* xr, int64_t V, const ZMap<Acc<T>>& zm,
                     const ZMap<Acc<T>>& zr_map, double beta) {
  KlRow out{};
  if constexpr (kScalar<T>) {
    out.lse = row_lse<T, kCap>(x, V, zm);
    out.lse_r = row_lse<T, kCapRef>(xr, V, zr_map);
    double loss = 0.0, centre = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      const double z = z_one<kCap>(x[v], zm), zr = z_one<kCapRef>(xr[v], zr_map);
      const double log_q = z - out.lse, log_p = zr - out.lse_r;
      const double q = std::exp(log_q), p = std::exp(log_p);
      const double d = (z - zr) + (out.lse_r - out.lse);
      if constexpr (kDiv == kForward) {
        if (p != 0.0) loss -= p * d;
      } else if constexpr (kDiv == kReverse) {
        if (q != 0.0) loss += q * d;
      } else {
        const auto [log_p_m, log_q_m] = jsd_logs(d, beta);
        if (p != 0.0) loss += beta * p * log_p_m;
        if (q != 0.0) {
          loss += (1.0 - beta) * q * log_q_m;
          centre += q * log_q_m;
        }
      }
    }
    out.loss = loss;
    out.centre = kDiv == kReverse ? loss : centre;
  } else {
    OnlineLanes student, ref;
    int64_t steps = 0;
    for_both_rows<T, kCap, kCapRef, false>(
        x, xr, V, zm, zr_map,
        [&](const Vec& z0, const Vec& z1, const Vec& zr0, const Vec& zr1, const Vec&, const Vec&) {
          student.raise(at::vec::maximum(z0, z1));
          ref.raise(at::vec::maximum(zr0, zr1));
          const Vec e0 = exp_vec(z0 - student.m), e1 = exp_vec(z1 - student.m);
          const Vec er0 = exp_vec(zr0 - ref.m), er1 = exp_vec(zr1 - ref.m);
          student.part = student.part + (e0 + e1);
          ref.part = ref.part + (er0 + er1);
          if constexpr (kDiv == kForward) {
            ref.part_d = ref.part_d + (weighted(er0, zr0 - z0) + weighted(er1, zr1 - z1));
          }
          if constexpr (kDiv == kReverse) {
            student.part_d = student.part_d + (weighted(e0, z0 - zr0) + weighted(e1, z1 - zr1));
          }
          if (++steps % kFlush == 0) {
            student.flush();
            ref.flush();
          }
        });
    double mean_s, mean_r;
    student.finish(out.lse, mean_s);
    ref.finish(out.lse_r, mean_r);
    if constexpr (kDiv == kForward) out.loss = mean_r - (out.lse_r - out.lse);
    if constexpr (kDiv == kReverse) out.loss = out.centre = mean_s - (out.lse - out.lse_r);
    if constexpr (kDiv == kJsd) {
      const Shift<float> sq(out.lse), sp(out.lse_r);
      const Vec gap(static_cast<float>(out.lse_r - out.lse));
      const JsdLogs logs{static_cast<float>(std::log(beta)), static_cast<float>(std::log1p(-beta))};
      const Vec b(static_cast<float>(beta)), b1(static_cast<float>(1.0 - beta));
      LaneSum loss, centre;
      auto terms = [&](const Vec& z, const Vec& zr) {
        const Vec q = exp_vec((z - Vec(sq.hi)) - Vec(sq.lo));
        const Vec p = exp_vec((zr - Vec(sp.hi)) - Vec(sp.lo));
        const auto [log_p_m, log_q_m] = logs((z - zr) + gap);
        const Vec q_part = weighted(q, log_q_m);
        loss.add(weighted(p, b * log_p_m) + b1 * q_part);
        centre.add(q_part);
      };
      for_both_rows<T, kCap, kCapRef, false>(
          x, xr, V, zm, zr_map,
          [&](const Vec& z0, const Vec& z1, const Vec& zr0, const Vec& zr1, const Vec&,
              const Vec&) {
            terms(z0, zr0);
            terms(z1, zr1);
          });
      out.loss = loss.finish();
      out.centre = centre.finish();
    }
  }
  return out;
}

// Gradient pass of the exact divergences: x ← c·∂D/∂z·sech²(x/c) (c = s/τ), with
//   forward q − p,  reverse q (d − K),  JSD (1 − β) q (log q − log m − K),  d = log q − log p.
template <typename T, bool kCap, bool kCapRef, int kDiv>
void row_divergence_grad(T* x, const T* xr, int64_t V, const ZMap<Acc<T>>& zm,
                         const ZMap<Acc<T>>& zr_map, double coef, double lse, double lse_r,
                         double centre, double beta) {
  if constexpr (kScalar<T>) {
    for (int64_t v = 0; v < V; ++v) {
      double dz;
      const double z = z_one<kCap>(x[v], zm, &dz), zr = z_one<kCapRef>(xr[v], zr_map);
      const double q = std::exp(z - lse), p = std::exp(zr - lse_r);
      const double d = (z - zr) + (lse_r - lse);
      double g;
      if constexpr (kDiv == kForward) {
        g = q - p;
      } else if constexpr (kDiv == kReverse) {
        g = q != 0.0 ? q * (d - centre) : 0.0;
      } else {
        g = q != 0.0 ? (1.0 - beta) * q * (jsd_logs(d, beta).second - centre) : 0.0;
      }
      x[v] = coef * g * dz;
    }
  } else {
    const Shift<float> sq(lse), sp(lse_r);
    const Vec c(static_cast<float>(kDiv == kJsd ? coef * (1.0 - beta) : coef));
    const Vec k(static_cast<float>(centre)), gap(static_cast<float>(lse_r - lse));
    const JsdLogs logs{static_cast<float>(std::log(beta)), static_cast<float>(std::log1p(-beta))};
    auto grad = [&](const Vec& z, const Vec& zr, const Vec& dz) {
      const Vec q = exp_vec((z - Vec(sq.hi)) - Vec(sq.lo));
      Vec g;
      if constexpr (kDiv == kForward) {
        g = q - exp_vec((zr - Vec(sp.hi)) - Vec(sp.lo));
      } else if constexpr (kDiv == kReverse) {
        g = weighted(q, ((z - zr) + gap) - k);
      } else {
        g = weighted(q, logs((z - zr) + gap).second - k);
      }
      g = g * c;
      if constexpr (kCap) g = g * dz;
      return g;
    };
    for_both_rows<T, kCap, kCapRef, true>(
        x, xr, V, zm, zr_map,
        [&](const Vec& z0, const Vec& z1, const Vec& zr0, const Vec& zr1, const Vec& d0,
            const Vec& d1) { return std::pair<Vec, Vec>(grad(z0, zr0, d0), grad(z1, zr1, d1)); });
  }
}

// x_v ← f·e^{z_v − s}: the top-k tail gradient with one exp (times sech² with softcap).
template <typename T, bool kCap>
void row_scaled_exp(T* x, int64_t V, const ZMap<Acc<T>>& zm, Acc<T> f, const Shift<Acc<T>>& s) {
  if constexpr (kScalar<T>) {
    for (int64_t v = 0; v < V; ++v) {
      double dz;
      const double z = z_one<kCap>(x[v], zm, &dz);
      x[v] = f * std::exp((z - s.hi) - s.lo) * dz;
    }
  } else {
    const Vec k(f), hi(s.hi), lo(s.lo);
    auto grad = [&](const Vec& xv) {
      Vec d;
      const Vec g = k * exp_vec((z_vec<kCap, kCap>(xv, zm, &d) - hi) - lo);
      if constexpr (kCap) return g * d;
      return g;
    };
    Vec a, b;
    int64_t j = 0;
    for (; j + kStep <= V; j += kStep) {
      Io<T>::load(x + j, a, b);
      Io<T>::store(x + j, grad(a), grad(b));
    }
    if (j < V) {
      Io<T>::load(x + j, V - j, a, b);
      Io<T>::store(x + j, V - j, grad(a), grad(b));
    }
  }
}

// Top-k gradient pass without the one-exp shortcut: x_v ← (c1·e^{z_v − s1} − c2·e^{z_v − s2})
// (times sech² with softcap).
template <typename T, bool kCap>
void row_two_exp(T* x, int64_t V, const ZMap<Acc<T>>& zm, Acc<T> c1, const Shift<Acc<T>>& s1,
                 Acc<T> c2, const Shift<Acc<T>>& s2) {
  if constexpr (kScalar<T>) {
    for (int64_t v = 0; v < V; ++v) {
      double dz;
      const double z = z_one<kCap>(x[v], zm, &dz);
      x[v] = (c1 * std::exp((z - s1.hi) - s1.lo) - c2 * std::exp((z - s2.hi) - s2.lo)) * dz;
    }
  } else {
    const Vec k1(c1), k2(c2), h1(s1.hi), l1(s1.lo), h2(s2.hi), l2(s2.lo);
    auto grad = [&](const Vec& xv) {
      Vec d;
      const Vec z = z_vec<kCap, kCap>(xv, zm, &d);
      const Vec g = k1 * exp_vec((z - h1) - l1) - k2 * exp_vec((z - h2) - l2);
      if constexpr (kCap) return g * d;
      return g;
    };
    Vec a, b;
    int64_t j = 0;
    for (; j + kStep <= V; j += kStep) {
      Io<T>::load(x + j, a, b);
      Io<T>::store(x + j, grad(a), grad(b));
    }
    if (j < V) {
      Io<T>::load(x + j, V - j, a, b);
      Io<T>::store(x + j, V - j, grad(a), grad(b));
    }
  }
}

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The gradient row of an undefined reference: all NaN.
template <typename T>
void fill_nan(T* row, int64_t V) {
  std::fill(row, row + V, static_cast<T>(kNaN));
}

// p · d, 0 when p = 0 (log p = −inf) whatever d is.
inline double p_times(double log_p, double d) {
  const double p = std::exp(log_p);
  return p > 0.0 ? p * d : 0.0;
}

// ---- exact divergences -------------------------------------------------------------------------

// Per-row outputs of the exact forward.
template <typename A>
struct KlOut {
  A* loss;
  double* lse;
  double* lse_ref;
  double* centre;
};

template <typename T, bool kCap, bool kCapRef, int kDiv>
void kl_forward_impl(T* x, const T* xr, int64_t n, int64_t V, const double* grad_scale,
                     double temperature, const ZMap<Acc<T>>& zm, const ZMap<Acc<T>>& zr_map,
                     double beta, const KlOut<Acc<T>>& out) {
  using A = Acc<T>;
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const T* ref = xr + i * V;
      const KlRow r = row_divergence<T, kCap, kCapRef, kDiv>(row, ref, V, zm, zr_map, beta);
      out.lse[i] = r.lse;
      out.lse_ref[i] = r.lse_r;
      out.centre[i] = kDiv == kForward ? 0.0 : r.centre;
      if (!std::isfinite(r.lse_r)) {
        out.loss[i] = static_cast<A>(kNaN);
        if (grad_scale != nullptr) fill_nan(row, V);
        continue;
      }
      out.loss[i] = static_cast<A>(r.loss);
      if (grad_scale != nullptr) {
        row_divergence_grad<T, kCap, kCapRef, kDiv>(row, ref, V, zm, zr_map,
                                                    grad_scale[i] / temperature, r.lse, r.lse_r,
                                                    out.centre[i], beta);
      }
    }
  });
}

template <typename T, bool kCap, bool kCapRef, int kDiv>
void kl_backward_impl(T* x, const T* xr, int64_t n, int64_t V, const double* lse,
                      const double* lse_ref, const double* centre, const double* grad_scale,
                      double temperature, const ZMap<Acc<T>>& zm, const ZMap<Acc<T>>& zr_map,
                      double beta) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!std::isfinite(lse_ref[i])) {
        fill_nan(x + i * V, V);
        continue;
      }
      row_divergence_grad<T, kCap, kCapRef, kDiv>(x + i * V, xr + i * V, V, zm, zr_map,
                                                  grad_scale[i] / temperature, lse[i],
                                                  lse_ref[i], centre[i], beta);
    }
  });
}

// ---- top-k KL ----------------------------------------------------------------------------

// Per-row top-k inputs: index [k], log p_k [k], log p_t.
struct TopkRow {
  const int64_t* index;
  const double* logprob;
  double tail;
  int64_t k;

  // P = Σ_K p_k + p_t.
  double total() const {
    double P = std::exp(tail);
    for (int64_t j = 0; j < k; ++j) P += std::exp(logprob[j]);
    return P;
  }
};

// A thread's scratch for the top-k of its rows: z_k, sech² and the saved logits (each written
// before it is read). Not std::vector: its constructor would be compiled once per ISA under one
// name shared by all copies, and the linker keeps one of them (tests/test_cpu_isa.py).
template <typename T>
struct TopkScratch {
  explicit TopkScratch(int64_t k) : zk(new double[k]), dk(new double[k]), saved(new T[k]) {}
  std::unique_ptr<double[]> zk, dk;
  std::unique_ptr<T[]> saved;
};

// z_k and sech²(x_k/c) (1 without softcap) of the row's top-k logits, rounded as the row passes
// round them, then widened to fp64.
template <typename T, bool kCap>
void gather_z(const T* row, const TopkRow& t, const ZMap<Acc<T>>& zm, double* zk, double* dk) {
  for (int64_t j = 0; j < t.k; ++j) {
    Acc<T> d = 1;
    zk[j] = z_one<kCap>(static_cast<Acc<T>>(row[t.index[j]]), zm, &d);
    dk[j] = kCap ? d : 1.0;
  }
}

// Gradient of a row, given the top-k's z_k (already read): the tail formula over the whole
// row, then the top-k entries over it.
template <typename T, bool kCap>
void topk_row_grad(T* row, int64_t V, const TopkRow& t, const double* zk, const double* dk,
                   double lse, double lse_tail, double coef, const ZMap<Acc<T>>& zm) {
  using A = Acc<T>;
  const double P = t.total();
  if (!std::isfinite(P)) {
    fill_nan(row, V);
    return;
  }
  // p_t e^{z − lse_t} = e^{z − (lse_t − log p_t)}; p_t = 0 or an empty student tail gives the
  // shift +inf, i.e. no tail term.
  const double tail_shift = t.tail == -kInf || lse_tail == -kInf ? kInf : lse_tail - t.tail;
  // One exp per logit: c·(P e^{z−lse} − e^{z−shift}) = c·(P − e^{lse−shift})·e^{z−lse}, unless
  // the factor p_t/q_t = e^{lse−shift} is out of fp32 range (q_t below ~1e-30·p_t).
  const double factor = coef * (P - std::exp(lse - tail_shift));
  if (std::abs(factor) < 1e30) {
    row_scaled_exp<T, kCap>(row, V, zm, static_cast<A>(factor), Shift<A>(lse));
  } else {
    row_two_exp<T, kCap>(row, V, zm, static_cast<A>(coef * P), Shift<A>(lse),
                         static_cast<A>(coef), Shift<A>(tail_shift));
  }
  for (int64_t j = 0; j < t.k; ++j) {
    const double g = coef * (P * std::exp(zk[j] - lse) - std::exp(t.logprob[j]));
    row[t.index[j]] = static_cast<T>(static_cast<A>(g * dk[j]));
  }
}

template <typename T, bool kCap>
void kl_topk_forward_impl(T* x, int64_t n, int64_t V, const int64_t* index,
                          const double* logprob, const double* tail, int64_t k,
                          const double* grad_scale, double temperature, const ZMap<Acc<T>>& zm,
                          Acc<T>* kl, double* lse, double* lse_tail) {
  using A = Acc<T>;
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    TopkScratch<T> scratch(k);
    double *zk = scratch.zk.get(), *dk = scratch.dk.get();
    T* saved = scratch.saved.get();
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const TopkRow t{index + i * k, logprob + i * k, tail[i], k};
      gather_z<T, kCap>(row, t, zm, zk, dk);
      for (int64_t j = 0; j < k; ++j) saved[j] = row[t.index[j]];
      for (int64_t j = 0; j < k; ++j) row[t.index[j]] = static_cast<T>(-kInf);
      // Tail, from the row with the top-k masked out (−inf stays −inf through the softcap).
      const double lt = row_lse<T, kCap>(row, V, zm);
      // Top-k, and their union.
      double mk = -kInf;
      for (int64_t j = 0; j < k; ++j) mk = std::max(mk, zk[j]);
      double sk = 0.0;
      for (int64_t j = 0; j < k; ++j) sk += std::exp(zk[j] - mk);
      const double lk = mk + std::log(sk);
      const double hi = std::max(lk, lt);
      const double l = hi + std::log1p(std::exp(std::min(lk, lt) - hi));
      double loss = p_times(t.tail, t.tail - (lt - l));
      for (int64_t j = 0; j < k; ++j) loss += p_times(t.logprob[j], t.logprob[j] - (zk[j] - l));
      kl[i] = static_cast<A>(std::isfinite(t.total()) ? loss : kNaN);
      lse[i] = l;
      lse_tail[i] = lt;
      if (grad_scale != nullptr) {
        topk_row_grad<T, kCap>(row, V, t, zk, dk, l, lt,
                               grad_scale[i] / temperature, zm);
      } else {
        for (int64_t j = 0; j < k; ++j) row[t.index[j]] = saved[j];
      }
    }
  });
}

template <typename T, bool kCap>
void kl_topk_backward_impl(T* x, int64_t n, int64_t V, const int64_t* index,
                           const double* logprob, const double* tail, int64_t k,
                           const double* lse, const double* lse_tail, const double* grad_scale,
                           double temperature, const ZMap<Acc<T>>& zm) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    TopkScratch<T> scratch(k);
    double *zk = scratch.zk.get(), *dk = scratch.dk.get();
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const TopkRow t{index + i * k, logprob + i * k, tail[i], k};
      gather_z<T, kCap>(row, t, zm, zk, dk);
      topk_row_grad<T, kCap>(row, V, t, zk, dk, lse[i], lse_tail[i],
                             grad_scale[i] / temperature, zm);
    }
  });
}

// ---- bindings --------------------------------------------------------------------------------

template <typename Fn>
void dispatch(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    case at::kDouble: return fn(double{});
    default: TORCH_CHECK_VALUE(false, "x must be float32, bfloat16, float16 or float64, got ", dtype);
  }
}

// Calls fn(cap, cap_ref) with std::bool_constant flavours of the softcap flags (the reference
// is only ever capped along with the student).
template <typename Fn>
void with_caps(bool cap, bool cap_ref, Fn&& fn) {
  if (!cap) return fn(std::false_type{}, std::false_type{});
  if (cap_ref) return fn(std::true_type{}, std::true_type{});
  fn(std::true_type{}, std::false_type{});
}

// Calls fn(div) with the std::integral_constant of β's divergence.
template <typename Fn>
void with_divergence(double beta, Fn&& fn) {
  if (beta == 0.0) return fn(std::integral_constant<int, kForward>{});
  if (beta == 1.0) return fn(std::integral_constant<int, kReverse>{});
  fn(std::integral_constant<int, kJsd>{});
}

// The logit maps of KLRowMath for the student (and the reference) in the math type of T.
template <typename T>
ZMap<Acc<T>> make_zmap(double temperature, std::optional<double> softcap) {
  using A = Acc<T>;
  return {static_cast<A>(1.0 / temperature), softcap ? static_cast<A>(*softcap) : A(0),
          softcap ? static_cast<A>(1.0 / *softcap) : A(0)};
}

void check_x(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), fn, ": ", name,
                    " must be a contiguous CPU tensor [n, V], got ", t.sizes(), " on ",
                    t.device());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), fn, ": ",
                    name, " must match x: ", like.scalar_type(), " ", like.sizes(), ", got ",
                    t.scalar_type(), " ", t.sizes());
}

const double* rows_f64(const char* fn, const char* name, const at::Tensor& t, int64_t n,
                       int64_t cols = -1) {
  const bool shape_ok = cols < 0 ? (t.dim() == 1 && t.size(0) == n)
                                 : (t.dim() == 2 && t.size(0) == n && t.size(1) == cols);
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous() &&
                        shape_ok,
                    fn, ": ", name, " must be a contiguous CPU float64 tensor with ", n,
                    " rows, got ", t.scalar_type(), " ", t.sizes());
  return t.data_ptr<double>();
}

const int64_t* checked_index(const char* fn, const at::Tensor& index, int64_t n, int64_t V) {
  TORCH_CHECK_VALUE(index.device().is_cpu() && index.scalar_type() == at::kLong &&
                        index.dim() == 2 && index.size(0) == n && index.is_contiguous(),
                    fn, ": index must be a contiguous CPU int64 tensor [", n, ", k], got ",
                    index.scalar_type(), " ", index.sizes());
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t j = 0; j < index.numel(); ++j) {
    TORCH_CHECK_VALUE(p[j] >= 0 && p[j] < V, fn, ": index entry ", p[j], " is outside [0, ", V,
                      ")");
  }
  return p;
}

void check_math(const char* fn, double temperature, std::optional<double> softcap, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, fn,
                    ": temperature must be positive and finite, got ", temperature);
  TORCH_CHECK_VALUE(!softcap || (std::isfinite(*softcap) && *softcap > 0.0), fn,
                    ": softcap must be a positive finite number or None, got ", *softcap);
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, fn, ": beta must lie in [0, 1], got ", beta);
}

at::Tensor acc_empty(const at::Tensor& x, int64_t n) {
  return at::empty({n}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble
                                                                           : at::kFloat));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_forward(
    at::Tensor x, const at::Tensor& x_ref, const std::optional<at::Tensor>& grad_scale,
    double temperature, std::optional<double> softcap, bool softcap_ref, double beta) {
  constexpr const char* fn = "kl_forward";
  check_x(fn, "x", x, x);
  check_x(fn, "x_ref", x_ref, x);
  check_math(fn, temperature, softcap, beta);
  const int64_t n = x.size(0), V = x.size(1);
  const double* scale = grad_scale ? rows_f64(fn, "grad_scale", *grad_scale, n) : nullptr;
  at::Tensor kl = acc_empty(x, n);
  at::Tensor lse = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor lse_ref = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor centre = at::empty({n}, x.options().dtype(at::kDouble));
  if (n == 0) return {kl, lse, lse_ref, centre};
  TORCH_CHECK_VALUE(V > 0, fn, ": x must have V >= 1 columns");
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto zm = make_zmap<T>(temperature, softcap);
    const auto zr_map = make_zmap<T>(temperature, softcap_ref ? softcap : std::nullopt);
    const KlOut<Acc<T>> out{kl.data_ptr<Acc<T>>(), lse.data_ptr<double>(),
                            lse_ref.data_ptr<double>(), centre.data_ptr<double>()};
    with_caps(softcap.has_value(), softcap_ref, [&](auto cap, auto cap_ref) {
      with_divergence(beta, [&](auto div) {
        kl_forward_impl<T, decltype(cap)::value, decltype(cap_ref)::value, decltype(div)::value>(
            x.data_ptr<T>(), x_ref.data_ptr<T>(), n, V, scale, temperature, zm, zr_map, beta, out);
      });
    });
  });
  if (scale != nullptr) mark_written(x);
  return {kl, lse, lse_ref, centre};
}

void kl_backward(at::Tensor x, const at::Tensor& x_ref, const at::Tensor& lse,
                 const at::Tensor& lse_ref, const at::Tensor& centre,
                 const at::Tensor& grad_scale, double temperature, std::optional<double> softcap,
                 bool softcap_ref, double beta) {
  constexpr const char* fn = "kl_backward";
  check_x(fn, "x", x, x);
  check_x(fn, "x_ref", x_ref, x);
  check_math(fn, temperature, softcap, beta);
  const int64_t n = x.size(0), V = x.size(1);
  const double* l = rows_f64(fn, "lse", lse, n);
  const double* lr = rows_f64(fn, "lse_ref", lse_ref, n);
  const double* k = rows_f64(fn, "centre", centre, n);
  const double* s = rows_f64(fn, "grad_scale", grad_scale, n);
  if (n == 0) return;
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto zm = make_zmap<T>(temperature, softcap);
    const auto zr_map = make_zmap<T>(temperature, softcap_ref ? softcap : std::nullopt);
    with_caps(softcap.has_value(), softcap_ref, [&](auto cap, auto cap_ref) {
      with_divergence(beta, [&](auto div) {
        kl_backward_impl<T, decltype(cap)::value, decltype(cap_ref)::value, decltype(div)::value>(
            x.data_ptr<T>(), x_ref.data_ptr<T>(), n, V, l, lr, k, s, temperature, zm, zr_map,
            beta);
      });
    });
  });
  mark_written(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_topk_forward(
    at::Tensor x, const at::Tensor& index, const at::Tensor& logprob,
    const at::Tensor& tail_logprob, const std::optional<at::Tensor>& grad_scale,
    double temperature, std::optional<double> softcap) {
  constexpr const char* fn = "kl_topk_forward";
  check_x(fn, "x", x, x);
  check_math(fn, temperature, softcap, 0.0);
  const int64_t n = x.size(0), V = x.size(1), k = index.dim() == 2 ? index.size(1) : 0;
  const int64_t* idx = checked_index(fn, index, n, V);
  const double* lp = rows_f64(fn, "logprob", logprob, n, k);
  const double* lt = rows_f64(fn, "tail_logprob", tail_logprob, n);
  const double* scale = grad_scale ? rows_f64(fn, "grad_scale", *grad_scale, n) : nullptr;
  at::Tensor kl = acc_empty(x, n);
  at::Tensor lse = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor lse_tail = at::empty({n}, x.options().dtype(at::kDouble));
  if (n == 0) return {kl, lse, lse_tail};
  TORCH_CHECK_VALUE(k >= 1 && k <= V, fn, ": need 1 <= k <= V, got k=", k, ", V=", V);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto zm = make_zmap<T>(temperature, softcap);
    with_caps(softcap.has_value(), false, [&](auto cap, auto) {
      kl_topk_forward_impl<T, decltype(cap)::value>(x.data_ptr<T>(), n, V, idx, lp, lt, k, scale,
                                                    temperature, zm, kl.data_ptr<Acc<T>>(),
                                                    lse.data_ptr<double>(),
                                                    lse_tail.data_ptr<double>());
    });
  });
  mark_written(x);  // the top-k entries are masked and restored even without a gradient
  return {kl, lse, lse_tail};
}

void kl_topk_backward(at::Tensor x, const at::Tensor& index, const at::Tensor& logprob,
                      const at::Tensor& tail_logprob, const at::Tensor& lse,
                      const at::Tensor& lse_tail, const at::Tensor& grad_scale,
                      double temperature, std::optional<double> softcap) {
  constexpr const char* fn = "kl_topk_backward";
  check_x(fn, "x", x, x);
  check_math(fn, temperature, softcap, 0.0);
  const int64_t n = x.size(0), V = x.size(1), k = index.dim() == 2 ? index.size(1) : 0;
  const int64_t* idx = checked_index(fn, index, n, V);
  const double* lp = rows_f64(fn, "logprob", logprob, n, k);
  const double* lt = rows_f64(fn, "tail_logprob", tail_logprob, n);
  const double* l = rows_f64(fn, "lse", lse, n);
  const double* ltl = rows_f64(fn, "lse_tail", lse_tail, n);
  const double* s = rows_f64(fn, "grad_scale", grad_scale, n);
  if (n == 0) return;
  TORCH_CHECK_VALUE(k >= 1 && k <= V, fn, ": need 1 <= k <= V, got k=", k, ", V=", V);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto zm = make_zmap<T>(temperature, softcap);
    with_caps(softcap.has_value(), false, [&](auto cap, auto) {
      kl_topk_backward_impl<T, decltype(cap)::value>(x.data_ptr<T>(), n, V, idx, lp, lt, k, l,
                                                     ltl, s, temperature, zm);
    });
  });
  mark_written(x);
}

}  // namespace unlearn_kernels::CPU_CAPABILITY
