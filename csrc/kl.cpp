// Forward-KL epilogues of the CPU backend (fused_linear_kl, fused_linear_kl_topk). Contract and
// readable reference: unlearn_kernels/backends/torch_backend.py (kl_forward, kl_backward,
// kl_topk_forward, kl_topk_backward).
//
// Chunk x [n, V] of student logits (fp32, bf16, fp16, or fp64 for gradcheck; contiguous), z = x/τ,
// q = softmax(z). Math in fp32 (fp64 for fp64 x), per-row scalars in fp64.
//
// Exact: x_ref [n, V] (x's dtype), p = softmax(x_ref/τ). Pass 1 (online, per-lane running
//   maxima): lse = log Σ e^z, lse_r = log Σ e^{z_r} and Σ_v p_v (z_r − z)_v; KL = that
//   − (lse_r − lse) (both parts small when p ≈ q). Pass 2 (gradient, usually from L2/L3):
//   x ← s/τ · (e^{z−lse} − e^{z_r−lse_r}).
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

#include "vec_math.h"  // first: selects ATen's AVX2 vectors

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "registry.h"
#include "row_sweep.h"

namespace unlearn_kernels {
namespace {

using vec_math::exp_vec;
using vec_math::Io;
using vec_math::kAllLanes;
using vec_math::kLanes;
using vec_math::kStep;
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

// ---- row primitives ------------------------------------------------------------------------

// log Σ_v e^{z_v}, z = x·inv_tau (−inf for an all −inf row): one pass.
template <typename T>
double row_lse(const T* row, int64_t V, Acc<T> inv_tau) {
  if constexpr (kScalar<T>) {
    double m = -kInf, s = 0.0;
    for (int64_t v = 0; v < V; ++v) m = std::isnan(row[v]) ? row[v] : std::max(m, row[v] * inv_tau);
    if (m == -kInf) return -kInf;
    for (int64_t v = 0; v < V; ++v) s += std::exp(row[v] * inv_tau - m);
    return m + std::log(s);
  } else {
    const Vec scale(inv_tau);
    OnlineLanes acc;
    auto fold = [&](Vec a, Vec b) {
      acc.raise(at::vec::maximum(a, b));
      acc.part = acc.part + (exp_vec(a - acc.m) + exp_vec(b - acc.m));
    };
    Vec a, b;
    int64_t j = 0;
    for (int64_t step = 1; j + kStep <= V; j += kStep, ++step) {
      Io<T>::load(row + j, a, b);
      fold(a * scale, b * scale);
      if (step % kFlush == 0) acc.flush();
    }
    if (j < V) {
      Io<T>::load(row + j, V - j, a, b);
      a = a * scale;
      b = b * scale;
      mask_tail(a, b, V - j);
      fold(a, b);
    }
    double lse, unused;
    acc.finish(lse, unused);
    return lse;
  }
}

// One pass over both rows of the exact KL: lse = log Σ e^z, lse_r = log Σ e^{z_r} and
// mean_d = Σ_v p_v (z_r,v − z_v) (p = 0 terms are 0).
template <typename T>
void row_kl_stats(const T* x, const T* xr, int64_t V, Acc<T> inv_tau, double& lse,
                  double& lse_r, double& mean_d) {
  if constexpr (kScalar<T>) {
    lse = row_lse(x, V, inv_tau);
    lse_r = row_lse(xr, V, inv_tau);
    mean_d = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      const double z = x[v] * inv_tau, zr = xr[v] * inv_tau, p = std::exp(zr - lse_r);
      if (p != 0.0) mean_d += p * (zr - z);
    }
  } else {
    const Vec scale(inv_tau);
    OnlineLanes student, ref;
    auto fold = [&](Vec z0, Vec z1, Vec zr0, Vec zr1) {
      student.raise(at::vec::maximum(z0, z1));
      ref.raise(at::vec::maximum(zr0, zr1));
      student.part = student.part + (exp_vec(z0 - student.m) + exp_vec(z1 - student.m));
      const Vec e0 = exp_vec(zr0 - ref.m), e1 = exp_vec(zr1 - ref.m);
      ref.part = ref.part + (e0 + e1);
      ref.part_d = ref.part_d + (weighted(e0, zr0 - z0) + weighted(e1, zr1 - z1));
    };
    Vec a, b, ar, br;
    int64_t j = 0;
    for (int64_t step = 1; j + kStep <= V; j += kStep, ++step) {
      Io<T>::load(x + j, a, b);
      Io<T>::load(xr + j, ar, br);
      fold(a * scale, b * scale, ar * scale, br * scale);
      if (step % kFlush == 0) {
        student.flush();
        ref.flush();
      }
    }
    if (j < V) {
      Io<T>::load(x + j, V - j, a, b);
      Io<T>::load(xr + j, V - j, ar, br);
      a = a * scale;
      b = b * scale;
      ar = ar * scale;
      br = br * scale;
      mask_tail(a, b, V - j);
      mask_tail(ar, br, V - j);
      fold(a, b, ar, br);
    }
    double unused;
    student.finish(lse, unused);
    ref.finish(lse_r, mean_d);
  }
}

// x_v ← f·e^{z_v − s}, z = x·inv_tau: the top-k tail gradient with one exp.
template <typename T>
void row_scaled_exp(T* x, int64_t V, Acc<T> inv_tau, Acc<T> f, const Shift<Acc<T>>& s) {
  if constexpr (kScalar<T>) {
    for (int64_t v = 0; v < V; ++v) x[v] = f * std::exp((x[v] * inv_tau - s.hi) - s.lo);
  } else {
    const Vec scale(inv_tau), k(f), hi(s.hi), lo(s.lo);
    Vec a, b;
    int64_t j = 0;
    for (; j + kStep <= V; j += kStep) {
      Io<T>::load(x + j, a, b);
      Io<T>::store(x + j, k * exp_vec((a * scale - hi) - lo), k * exp_vec((b * scale - hi) - lo));
    }
    if (j < V) {
      Io<T>::load(x + j, V - j, a, b);
      Io<T>::store(x + j, V - j, k * exp_vec((a * scale - hi) - lo),
                   k * exp_vec((b * scale - hi) - lo));
    }
  }
}

// Gradient pass: x_v ← c1·e^{z_v − s1} − c2·e^{w_v − s2}, z = x·inv_tau, w = x_ref·inv_tau when
// kRef, else w = z.
template <typename T, bool kRef>
void row_grad(T* x, const T* xr, int64_t V, Acc<T> inv_tau, Acc<T> c1, const Shift<Acc<T>>& s1,
              Acc<T> c2, const Shift<Acc<T>>& s2) {
  if constexpr (kScalar<T>) {
    for (int64_t v = 0; v < V; ++v) {
      const double z = x[v] * inv_tau, w = kRef ? xr[v] * inv_tau : z;
      x[v] = c1 * std::exp((z - s1.hi) - s1.lo) - c2 * std::exp((w - s2.hi) - s2.lo);
    }
  } else {
    const Vec scale(inv_tau), k1(c1), k2(c2), h1(s1.hi), l1(s1.lo), h2(s2.hi), l2(s2.lo);
    auto grad = [&](const Vec& z, const Vec& w) {
      return k1 * exp_vec((z - h1) - l1) - k2 * exp_vec((w - h2) - l2);
    };
    Vec a, b, ar, br;
    int64_t j = 0;
    for (; j + kStep <= V; j += kStep) {
      Io<T>::load(x + j, a, b);
      a = a * scale;
      b = b * scale;
      if constexpr (kRef) {
        Io<T>::load(xr + j, ar, br);
        Io<T>::store(x + j, grad(a, ar * scale), grad(b, br * scale));
      } else {
        Io<T>::store(x + j, grad(a, a), grad(b, b));
      }
    }
    if (j < V) {
      const int64_t rest = V - j;
      Io<T>::load(x + j, rest, a, b);
      a = a * scale;
      b = b * scale;
      if constexpr (kRef) {
        Io<T>::load(xr + j, rest, ar, br);
        Io<T>::store(x + j, rest, grad(a, ar * scale), grad(b, br * scale));
      } else {
        Io<T>::store(x + j, rest, grad(a, a), grad(b, b));
      }
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

// ---- exact KL --------------------------------------------------------------------------------

template <typename T>
void kl_forward_impl(T* x, const T* xr, int64_t n, int64_t V, const double* grad_scale,
                     double temperature, Acc<T>* kl, double* lse, double* lse_ref) {
  using A = Acc<T>;
  const A inv_tau = static_cast<A>(1.0 / temperature);
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const T* ref = xr + i * V;
      double mean_d;
      row_kl_stats(row, ref, V, inv_tau, lse[i], lse_ref[i], mean_d);
      if (!std::isfinite(lse_ref[i])) {
        kl[i] = static_cast<A>(kNaN);
        if (grad_scale != nullptr) fill_nan(row, V);
        continue;
      }
      kl[i] = static_cast<A>(mean_d - (lse_ref[i] - lse[i]));
      if (grad_scale != nullptr) {
        const A c = static_cast<A>(grad_scale[i] / temperature);
        row_grad<T, true>(row, ref, V, inv_tau, c, Shift<A>(lse[i]), c, Shift<A>(lse_ref[i]));
      }
    }
  });
}

template <typename T>
void kl_backward_impl(T* x, const T* xr, int64_t n, int64_t V, const double* lse,
                      const double* lse_ref, const double* grad_scale, double temperature) {
  using A = Acc<T>;
  const A inv_tau = static_cast<A>(1.0 / temperature);
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!std::isfinite(lse_ref[i])) {
        fill_nan(x + i * V, V);
        continue;
      }
      const A c = static_cast<A>(grad_scale[i] / temperature);
      row_grad<T, true>(x + i * V, xr + i * V, V, inv_tau, c, Shift<A>(lse[i]), c,
                        Shift<A>(lse_ref[i]));
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

// z_k = x_k·inv_tau, rounded as the row passes round it, then widened to fp64.
template <typename T>
void gather_z(const T* row, const TopkRow& t, Acc<T> inv_tau, double* zk) {
  for (int64_t j = 0; j < t.k; ++j) {
    zk[j] = static_cast<Acc<T>>(static_cast<Acc<T>>(row[t.index[j]]) * inv_tau);
  }
}

// Gradient of a row, given the top-k's z_k (already read): the tail formula over the whole
// row, then the top-k entries over it.
template <typename T>
void topk_row_grad(T* row, int64_t V, const TopkRow& t, const double* zk, double lse,
                   double lse_tail, double coef, Acc<T> inv_tau) {
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
    row_scaled_exp<T>(row, V, inv_tau, static_cast<A>(factor), Shift<A>(lse));
  } else {
    row_grad<T, false>(row, nullptr, V, inv_tau, static_cast<A>(coef * P), Shift<A>(lse),
                       static_cast<A>(coef), Shift<A>(tail_shift));
  }
  for (int64_t j = 0; j < t.k; ++j) {
    row[t.index[j]] = static_cast<T>(static_cast<A>(coef * (P * std::exp(zk[j] - lse) -
                                                            std::exp(t.logprob[j]))));
  }
}

template <typename T>
void kl_topk_forward_impl(T* x, int64_t n, int64_t V, const int64_t* index,
                          const double* logprob, const double* tail, int64_t k,
                          const double* grad_scale, double temperature, Acc<T>* kl, double* lse,
                          double* lse_tail) {
  using A = Acc<T>;
  const A inv_tau = static_cast<A>(1.0 / temperature);
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<double> zk(k);
    std::vector<T> saved(k);
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const TopkRow t{index + i * k, logprob + i * k, tail[i], k};
      gather_z(row, t, inv_tau, zk.data());
      for (int64_t j = 0; j < k; ++j) saved[j] = row[t.index[j]];
      for (int64_t j = 0; j < k; ++j) row[t.index[j]] = static_cast<T>(-kInf);
      // Tail, from the row with the top-k masked out.
      const double lt = row_lse(row, V, inv_tau);
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
        topk_row_grad(row, V, t, zk.data(), l, lt, grad_scale[i] / temperature, inv_tau);
      } else {
        for (int64_t j = 0; j < k; ++j) row[t.index[j]] = saved[j];
      }
    }
  });
}

template <typename T>
void kl_topk_backward_impl(T* x, int64_t n, int64_t V, const int64_t* index,
                           const double* logprob, const double* tail, int64_t k,
                           const double* lse, const double* lse_tail, const double* grad_scale,
                           double temperature) {
  const Acc<T> inv_tau = static_cast<Acc<T>>(1.0 / temperature);
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<double> zk(k);
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const TopkRow t{index + i * k, logprob + i * k, tail[i], k};
      gather_z(row, t, inv_tau, zk.data());
      topk_row_grad(row, V, t, zk.data(), lse[i], lse_tail[i], grad_scale[i] / temperature,
                    inv_tau);
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

void check_temperature(const char* fn, double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, fn,
                    ": temperature must be positive and finite, got ", temperature);
}

at::Tensor acc_empty(const at::Tensor& x, int64_t n) {
  return at::empty({n}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble
                                                                           : at::kFloat));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_forward(
    at::Tensor x, const at::Tensor& x_ref, const std::optional<at::Tensor>& grad_scale,
    double temperature) {
  constexpr const char* fn = "kl_forward";
  check_x(fn, "x", x, x);
  check_x(fn, "x_ref", x_ref, x);
  check_temperature(fn, temperature);
  const int64_t n = x.size(0), V = x.size(1);
  const double* scale = grad_scale ? rows_f64(fn, "grad_scale", *grad_scale, n) : nullptr;
  at::Tensor kl = acc_empty(x, n);
  at::Tensor lse = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor lse_ref = at::empty({n}, x.options().dtype(at::kDouble));
  if (n == 0) return {kl, lse, lse_ref};
  TORCH_CHECK_VALUE(V > 0, fn, ": x must have V >= 1 columns");
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    kl_forward_impl<T>(x.data_ptr<T>(), x_ref.data_ptr<T>(), n, V, scale, temperature,
                       kl.data_ptr<Acc<T>>(), lse.data_ptr<double>(), lse_ref.data_ptr<double>());
  });
  if (scale != nullptr) mark_written(x);
  return {kl, lse, lse_ref};
}

void kl_backward(at::Tensor x, const at::Tensor& x_ref, const at::Tensor& lse,
                 const at::Tensor& lse_ref, const at::Tensor& grad_scale, double temperature) {
  constexpr const char* fn = "kl_backward";
  check_x(fn, "x", x, x);
  check_x(fn, "x_ref", x_ref, x);
  check_temperature(fn, temperature);
  const int64_t n = x.size(0), V = x.size(1);
  const double* l = rows_f64(fn, "lse", lse, n);
  const double* lr = rows_f64(fn, "lse_ref", lse_ref, n);
  const double* s = rows_f64(fn, "grad_scale", grad_scale, n);
  if (n == 0) return;
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    kl_backward_impl<T>(x.data_ptr<T>(), x_ref.data_ptr<T>(), n, V, l, lr, s, temperature);
  });
  mark_written(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_topk_forward(
    at::Tensor x, const at::Tensor& index, const at::Tensor& logprob,
    const at::Tensor& tail_logprob, const std::optional<at::Tensor>& grad_scale,
    double temperature) {
  constexpr const char* fn = "kl_topk_forward";
  check_x(fn, "x", x, x);
  check_temperature(fn, temperature);
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
    kl_topk_forward_impl<T>(x.data_ptr<T>(), n, V, idx, lp, lt, k, scale, temperature,
                            kl.data_ptr<Acc<T>>(), lse.data_ptr<double>(),
                            lse_tail.data_ptr<double>());
  });
  mark_written(x);  // the top-k entries are masked and restored even without a gradient
  return {kl, lse, lse_tail};
}

void kl_topk_backward(at::Tensor x, const at::Tensor& index, const at::Tensor& logprob,
                      const at::Tensor& tail_logprob, const at::Tensor& lse,
                      const at::Tensor& lse_tail, const at::Tensor& grad_scale,
                      double temperature) {
  constexpr const char* fn = "kl_topk_backward";
  check_x(fn, "x", x, x);
  check_temperature(fn, temperature);
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
    kl_topk_backward_impl<T>(x.data_ptr<T>(), n, V, idx, lp, lt, k, l, ltl, s, temperature);
  });
  mark_written(x);
}

namespace py = pybind11;

RegisterBindings reg([](py::module_& m) {
  m.def("kl_forward", &kl_forward, py::arg("x"), py::arg("x_ref"), py::arg("grad_scale"),
        py::arg("temperature"), py::call_guard<py::gil_scoped_release>(),
        "Per-row KL(softmax(x_ref/t) || softmax(x/t)) -> (kl, lse, lse_ref); with grad_scale s "
        "(float64), x is overwritten by s (q - p) / t.");
  m.def("kl_backward", &kl_backward, py::arg("x"), py::arg("x_ref"), py::arg("lse"),
        py::arg("lse_ref"), py::arg("grad_scale"), py::arg("temperature"),
        py::call_guard<py::gil_scoped_release>(),
        "Overwrite x with s (q - p) / t from the saved float64 log-normalisers.");
  m.def("kl_topk_forward", &kl_topk_forward, py::arg("x"), py::arg("index"), py::arg("logprob"),
        py::arg("tail_logprob"), py::arg("grad_scale"), py::arg("temperature"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-row top-k KL from reference top-k log-probs and tail log-mass -> (kl, lse, "
        "lse_tail); with grad_scale s, x is overwritten by the gradient times s / t.");
  m.def("kl_topk_backward", &kl_topk_backward, py::arg("x"), py::arg("index"),
        py::arg("logprob"), py::arg("tail_logprob"), py::arg("lse"), py::arg("lse_tail"),
        py::arg("grad_scale"), py::arg("temperature"), py::call_guard<py::gil_scoped_release>(),
        "Overwrite x with the top-k KL gradient times s / t from the saved lse and lse_tail.");
});

}  // namespace
}  // namespace unlearn_kernels
