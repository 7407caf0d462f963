// Cross-entropy epilogue of the CPU backend. The contract (and readable reference) is
// unlearn_kernels/backends/torch_backend.py: ce_forward / ce_backward.
//
// For a chunk of logits x [n, V] (contiguous; fp32, bf16 or fp16 with all math in fp32; fp64,
// for gradcheck, in a plain double loop):
//   z = c·tanh(x/c) with softcap c (z = x without),   lse_i = log Σ_v exp(z_iv) (returned fp64),
//   loss_i = lse_i − z_{i,y_i},
//   gradient (only when grad_scale s is given), written over x in x's dtype:
//     x_iv ← s_i · (exp(z_iv − lse_i) − [v = y_i]) · ∂z/∂x,   ∂z/∂x = 1 − (z/c)² (or 1).
//
// One parallel sweep over rows (at::parallel_for). Per row, pass 1 reads the row once for an
// online max + sum of exp (per-lane running max, the sum rescaled only when the max moves,
// Kahan-compensated); pass 2 (gradient only) reads it again (usually from L2: one fp32 row of
// a 128k vocabulary is 0.5 MB), recomputes exp and stores the gradient in place. exp is only
// ever taken of a shifted logit (z − max, or z − fp32(lse)), with the shift exact near the
// maximum, so logits of order ±1e4 keep full fp32 accuracy.

#include "vec_math.h"  // first: selects ATen's AVX2 vectors

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "registry.h"
#include "row_sweep.h"

namespace unlearn_kernels {
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

// Pass 1 over one row: row max and Σ exp(z − max).
template <typename T, bool kCap>
inline void row_lse(const T* row, int64_t V, const Cap& c, float& row_max, double& row_sum) {
  OnlineLse acc;
  Vec x0, x1, x2, x3;
  int64_t j = 0;
  for (; j + kTile <= V; j += kTile) {
    Io<T>::load(row + j, x0, x1);
    Io<T>::load(row + j + kStep, x2, x3);
    acc.add(to_z<kCap>(x0, c), to_z<kCap>(x1, c), to_z<kCap>(x2, c), to_z<kCap>(x3, c));
  }
  const int64_t rest = V - j;
  if (rest > 0) {
    const Vec low(kLowest);
    const int64_t n0 = std::min(rest, kStep);
    const int64_t n1 = rest - n0;
    Io<T>::load(row + j, n0, x0, x1);
    Vec z0 = Vec::set(low, to_z<kCap>(x0, c), std::min(n0, kLanes));
    Vec z1 = Vec::set(low, to_z<kCap>(x1, c), std::max<int64_t>(n0 - kLanes, 0));
    Vec z2 = low, z3 = low;
    if (n1 > 0) {
      Io<T>::load(row + j + kStep, n1, x2, x3);
      z2 = Vec::set(low, to_z<kCap>(x2, c), std::min(n1, kLanes));
      z3 = Vec::set(low, to_z<kCap>(x3, c), std::max<int64_t>(n1 - kLanes, 0));
    }
    acc.add(z0, z1, z2, z3);
  }
  acc.finish(row_max, row_sum);
}

// Gradient of kLanes logits: k·exp(z − shift)·∂z/∂x.
template <bool kCap>
UK_INLINE Vec grad_vec(const Vec& x, const Vec& shift, const Vec& k, const Cap& c) {
  if constexpr (kCap) {
    Vec d;
    const Vec z = Vec(c.cap) * tanh_vec<true>(x * Vec(c.inv_cap), &d);
    return exp_vec(z - shift) * k * d;
  } else {
    return exp_vec(x - shift) * k;
  }
}

// Pass 2 over one row: x_v ← k·exp(z_v − shift)·∂z/∂x for every v (the target is fixed after).
template <typename T, bool kCap>
inline void row_grad(T* row, int64_t V, float shift_f, float k_f, const Cap& c) {
  const Vec shift(shift_f), k(k_f);
  Vec x0, x1;
  int64_t j = 0;
  for (; j + kStep <= V; j += kStep) {
    Io<T>::load(row + j, x0, x1);
    Io<T>::store(row + j, grad_vec<kCap>(x0, shift, k, c), grad_vec<kCap>(x1, shift, k, c));
  }
  const int64_t rest = V - j;
  if (rest > 0) {
    Io<T>::load(row + j, rest, x0, x1);
    Io<T>::store(row + j, rest, grad_vec<kCap>(x0, shift, k, c), grad_vec<kCap>(x1, shift, k, c));
  }
}

inline Cap make_cap(std::optional<double> softcap) {
  return softcap ? Cap{static_cast<float>(*softcap), static_cast<float>(1.0 / *softcap)} : Cap{};
}

template <typename T, bool kCap>
void ce_forward_impl(T* x, int64_t n, int64_t V, const int64_t* target, const float* grad_scale,
                     const Cap& c, float* loss, double* lse) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const int64_t y = target[i];
      float z_y, dz_y;
      target_z<kCap>(static_cast<float>(row[y]), c, z_y, dz_y);
      float row_max;
      double row_sum;
      row_lse<T, kCap>(row, V, c, row_max, row_sum);
      const double log_sum = std::log(row_sum);
      loss[i] = static_cast<float>((static_cast<double>(row_max) - z_y) + log_sum);
      lse[i] = row_max + log_sum;
      if (grad_scale != nullptr) {
        const double s = grad_scale[i];
        // exp(z − lse) = exp(z − max) / S: the shift z − max is exact in fp32 even for huge
        // logits, where z − fp32(lse) would carry lse's rounding (ulp(1e4) ≈ 1e-3).
        row_grad<T, kCap>(row, V, row_max, static_cast<float>(s / row_sum), c);
        const double p_y = std::exp(static_cast<double>(z_y) - row_max) / row_sum;
        row[y] = static_cast<T>(static_cast<float>(s * (p_y - 1.0) * dz_y));
      }
    }
  });
}

template <typename T, bool kCap>
void ce_backward_impl(T* x, int64_t n, int64_t V, const int64_t* target, const double* lse,
                      const float* grad_scale, const Cap& c) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * V;
      const int64_t y = target[i];
      float z_y, dz_y;
      target_z<kCap>(static_cast<float>(row[y]), c, z_y, dz_y);
      // lse = hi + lo with hi in fp32: z − hi is exact near the maximum, and exp(−lo) is folded
      // into the row's factor, so the saved fp64 lse rebuilds the softmax to fp32 accuracy.
      const float hi = static_cast<float>(lse[i]);
      const double s = grad_scale[i];
      row_grad<T, kCap>(row, V, hi, static_cast<float>(s * std::exp(hi - lse[i])), c);
      const double p_y = std::exp(static_cast<double>(z_y) - lse[i]);
      row[y] = static_cast<T>(static_cast<float>(s * (p_y - 1.0) * dz_y));
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

void ce_f64(double* x, int64_t n, int64_t V, const int64_t* target, const double* lse_in,
            const double* grad_scale, std::optional<double> softcap, double* loss,
            double* lse_out) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double* row = x + i * V;
      double z, dz, z_y, dz_y;
      z_f64(row[target[i]], softcap, z_y, dz_y);
      double lse;
      if (lse_in != nullptr) {
        lse = lse_in[i];
      } else {
        double m = std::numeric_limits<double>::lowest(), sum = 0.0;
        for (int64_t v = 0; v < V; ++v) {
          z_f64(row[v], softcap, z, dz);
          if (z > m) {
            sum = sum * std::exp(m - z) + 1.0;
            m = z;
          } else {
            sum += std::exp(z - m);  // 0 for z = −inf; NaN propagates
          }
        }
        lse = m + std::log(sum);
        loss[i] = (m - z_y) + std::log(sum);
        lse_out[i] = lse;
      }
      if (grad_scale != nullptr) {
        const double s = grad_scale[i];
        for (int64_t v = 0; v < V; ++v) {
          z_f64(row[v], softcap, z, dz);
          row[v] = s * std::exp(z - lse) * dz;
        }
        row[target[i]] = s * (std::exp(z_y - lse) - 1.0) * dz_y;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points.

// Calls fn.template operator()<T, kCap>() for x's (reduced or single precision) dtype and
// whether softcap is set.
template <typename Fn>
void dispatch(at::ScalarType dtype, bool capped, Fn&& fn) {
  auto with_cap = [&](auto tag) {
    using T = decltype(tag);
    if (capped) {
      fn.template operator()<T, true>();
    } else {
      fn.template operator()<T, false>();
    }
  };
  switch (dtype) {
    case at::kFloat: return with_cap(float{});
    case at::kBFloat16: return with_cap(c10::BFloat16{});
    case at::kHalf: return with_cap(c10::Half{});
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", dtype);
  }
}

// Shape/dtype/device checks shared by both entry points; targets are range-checked so the
// kernel never reads outside a row.
void check_common(const char* fn, const at::Tensor& x, const at::Tensor& target,
                  std::optional<double> softcap) {
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

std::tuple<at::Tensor, at::Tensor> ce_forward(at::Tensor x, const at::Tensor& target_in,
                                              const std::optional<at::Tensor>& grad_scale_in,
                                              std::optional<double> softcap) {
  constexpr const char* fn = "ce_forward";
  check_common(fn, x, target_in, softcap);
  const int64_t n = x.size(0), V = x.size(1);
  const at::Tensor target = target_in.contiguous();
  check_targets(fn, target, V);
  const at::ScalarType acc = acc_dtype(x);
  at::Tensor grad_scale;
  if (grad_scale_in) grad_scale = row_vector(fn, "grad_scale", *grad_scale_in, n, acc);
  at::Tensor loss = at::empty({n}, x.options().dtype(acc));
  at::Tensor lse = at::empty({n}, x.options().dtype(at::kDouble));
  if (n == 0) return {loss, lse};
  if (acc == at::kDouble) {
    ce_f64(x.data_ptr<double>(), n, V, target.data_ptr<int64_t>(), nullptr,
           grad_scale.defined() ? grad_scale.data_ptr<double>() : nullptr, softcap,
           loss.data_ptr<double>(), lse.data_ptr<double>());
  } else {
    dispatch(x.scalar_type(), softcap.has_value(), [&]<typename T, bool kCap>() {
      ce_forward_impl<T, kCap>(x.data_ptr<T>(), n, V, target.data_ptr<int64_t>(),
                               grad_scale.defined() ? grad_scale.data_ptr<float>() : nullptr,
                               make_cap(softcap), loss.data_ptr<float>(), lse.data_ptr<double>());
    });
  }
  if (grad_scale.defined()) mark_written(x);
  return {loss, lse};
}

void ce_backward(at::Tensor x, const at::Tensor& target_in, const at::Tensor& lse_in,
                 const at::Tensor& grad_scale_in, std::optional<double> softcap) {
  constexpr const char* fn = "ce_backward";
  check_common(fn, x, target_in, softcap);
  const int64_t n = x.size(0), V = x.size(1);
  const at::Tensor target = target_in.contiguous();
  check_targets(fn, target, V);
  const at::ScalarType acc = acc_dtype(x);
  const at::Tensor lse = row_vector(fn, "lse", lse_in, n, at::kDouble);
  const at::Tensor grad_scale = row_vector(fn, "grad_scale", grad_scale_in, n, acc);
  if (n == 0) return;
  if (acc == at::kDouble) {
    ce_f64(x.data_ptr<double>(), n, V, target.data_ptr<int64_t>(), lse.data_ptr<double>(),
           grad_scale.data_ptr<double>(), softcap, nullptr, nullptr);
  } else {
    dispatch(x.scalar_type(), softcap.has_value(), [&]<typename T, bool kCap>() {
      ce_backward_impl<T, kCap>(x.data_ptr<T>(), n, V, target.data_ptr<int64_t>(),
                                lse.data_ptr<double>(), grad_scale.data_ptr<float>(),
                                make_cap(softcap));
    });
  }
  mark_written(x);
}

namespace py = pybind11;

RegisterBindings reg([](py::module_& m) {
  m.def("ce_forward", &ce_forward, py::arg("x"), py::arg("target"), py::arg("grad_scale"),
        py::arg("softcap"), py::call_guard<py::gil_scoped_release>(),
        "Cross-entropy over rows of x [n, V] -> (loss [n] fp32 (fp64 for fp64 x), lse [n] fp64). "
        "With grad_scale s, x is overwritten by s_i (softmax(z_i) - onehot(target_i)) dz/dx.");
  m.def("ce_backward", &ce_backward, py::arg("x"), py::arg("target"), py::arg("lse"),
        py::arg("grad_scale"), py::arg("softcap"), py::call_guard<py::gil_scoped_release>(),
        "Overwrite x [n, V] with s_i (exp(z_i - lse_i) - onehot(target_i)) dz/dx, lse the saved "
        "fp64 log-sum-exp.");
});

}  // namespace
}  // namespace unlearn_kernels
