// NGDiff combine on CPU (DESIGN.md §2 "NGDiff combine"): two sweeps over lists of gradient
// segments F_j, R_j (contiguous tensors; the Python layer coalesces tensors that are
// consecutive views of one flat buffer into a single segment).
//
//   ngdiff_sums:  [‖F‖², ‖R‖², ⟨F,R⟩]  (float64 tensor [3])
//   ngdiff_write: out_j = a·R_j + b·F_j  with (a, b) = coef; a zero coefficient drops its term
//                 entirely (its tensor is not read), so a non-finite gradient whose coefficient
//                 was set to zero cannot leak into out.
//
// Tiny gradients: squares below fp32's range would read as 0, so a piece whose max |f| (or
// max |r|) lies in (0, 2^-40) is summed again scaled by an exact power of two, 2^-e with
// e = frexp exponent of the max (at most 2^126), and unscaled in float64 (the torch backend's
// rule): a nonzero gradient never gets norm 0. The fast path is unchanged: the max is read
// only when a piece's plain sum of squares is below 2^-60.
//
// Work: the segments, laid end to end, are cut into items of kItem elements (an item may span
// several small segments), so threads get equal work however the gradients are shaped. Each
// item is reduced by one thread in a fixed order (fp32 vector accumulators per segment piece,
// a fixed-order horizontal sum, pieces added in float64), and the item partials are added in
// item order in float64: the result does not depend on the number of threads or on
// scheduling, so it is bit-reproducible.

#include "vec_math.h"  // first: selects ATen's vectors for CPU_CAPABILITY

#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace unlearn_kernels::CPU_CAPABILITY {
namespace {

using vec_math::Io;
using vec_math::kStep;
using vec_math::Vec;

constexpr int64_t kItem = int64_t{1} << 14;  // elements per work item (fixed partitioning)

inline float lane_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int64_t k = 0; k < Vec::size(); ++k) s += lanes[k];
  return s;
}

struct Segment {
  const void* f;
  const void* r;
  void* out;
  at::ScalarType dtype;
};

// The segments' elements laid end to end, cut into items of kItem elements.
class Layout {
 public:
  explicit Layout(const std::vector<at::Tensor>& tensors) : start_{0} {
    for (const auto& t : tensors) start_.push_back(start_.back() + t.numel());
  }
  int64_t items() const { return (start_.back() + kItem - 1) / kItem; }
  // fn(segment, begin, end) for each piece of a segment inside item k, in order.
  template <typename Fn>
  void for_pieces(int64_t k, Fn&& fn) const {
    int64_t lo = k * kItem;
    const int64_t hi = std::min(lo + kItem, start_.back());
    auto s = std::upper_bound(start_.begin(), start_.end(), lo) - start_.begin() - 1;
    for (; lo < hi; ++s) {
      const int64_t end = std::min(hi, start_[s + 1]);
      if (end > lo) fn(s, lo - start_[s], end - start_[s]);
      lo = end;
    }
  }

 private:
  std::vector<int64_t> start_;
};

// A piece's fp32 [Σ(sf·f)², Σ(sr·r)², Σ(sf·f)(sr·r)]; kScaled = false is the fast path (sf = sr
// = 1, no multiplies).
template <bool kScaled, typename T>
std::array<float, 3> item_sums(const T* f, const T* r, int64_t n, float sf = 1.f,
                               float sr = 1.f) {
  const Vec vsf(sf), vsr(sr);
  Vec ff0(0.f), ff1(0.f), rr0(0.f), rr1(0.f), fr0(0.f), fr1(0.f);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec f0, f1, r0, r1;
    Io<T>::load(f + i, f0, f1);
    Io<T>::load(r + i, r0, r1);
    if constexpr (kScaled) {
      f0 = f0 * vsf;
      f1 = f1 * vsf;
      r0 = r0 * vsr;
      r1 = r1 * vsr;
    }
    ff0 = at::vec::fmadd(f0, f0, ff0);
    ff1 = at::vec::fmadd(f1, f1, ff1);
    rr0 = at::vec::fmadd(r0, r0, rr0);
    rr1 = at::vec::fmadd(r1, r1, rr1);
    fr0 = at::vec::fmadd(f0, r0, fr0);
    fr1 = at::vec::fmadd(f1, r1, fr1);
  }
  float ff = lane_sum(ff0 + ff1), rr = lane_sum(rr0 + rr1), fr = lane_sum(fr0 + fr1);
  for (; i < n; ++i) {
    const float fv = static_cast<float>(f[i]) * sf, rv = static_cast<float>(r[i]) * sr;
    ff += fv * fv;
    rr += rv * rv;
    fr += fv * rv;
  }
  return {ff, rr, fr};
}

// max |x| over n elements (a NaN may be skipped: the max only decides the rescaling, and the
// sums stay NaN).
template <typename T>
float piece_max(const T* x, int64_t n) {
  Vec m(0.f);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec x0, x1;
    Io<T>::load(x + i, x0, x1);
    m = at::vec::maximum(m, at::vec::maximum(x0.abs(), x1.abs()));
  }
  alignas(64) float lanes[Vec::size()];
  m.store(lanes);
  float out = 0.f;
  for (int64_t k = 0; k < Vec::size(); ++k) out = std::max(out, lanes[k]);
  for (; i < n; ++i) out = std::max(out, std::abs(static_cast<float>(x[i])));
  return out;
}

// 2^-e (at most 2^126) bringing max into [0.5, 1) when 0 < max < 2^-40, else 1.
float tiny_scale(float max) {
  if (!(max > 0.f) || !(max < std::ldexp(1.f, -40))) return 1.f;
  int e = 0;
  std::frexp(max, &e);
  return std::ldexp(1.f, std::min(-e, 126));
}

// [Σf², Σr², Σf·r] of a piece in float64. A side with max |x| < 2^-40 has Σx² < 2^-60 (a piece
// holds at most 2^14 elements); only then is its max read, and the piece summed again scaled.
template <typename T>
std::array<double, 3> piece_sums(const T* f, const T* r, int64_t n) {
  const float kSuspect = std::ldexp(1.f, -60);
  const auto plain = item_sums<false>(f, r, n);
  const float sf = plain[0] < kSuspect ? tiny_scale(piece_max(f, n)) : 1.f;
  const float sr = plain[1] < kSuspect ? tiny_scale(piece_max(r, n)) : 1.f;
  if (sf == 1.f && sr == 1.f) return {plain[0], plain[1], plain[2]};
  const auto scaled = item_sums<true>(f, r, n, sf, sr);
  const double df = sf, dr = sr;
  return {scaled[0] / (df * df), scaled[1] / (dr * dr), scaled[2] / (df * dr)};
}

// out = a·r + b·f over n elements; USE_F / USE_R say which terms are present.
template <typename T, bool USE_F, bool USE_R>
void item_write(const T* f, const T* r, T* out, int64_t n, float a, float b) {
  const Vec va(a), vb(b), zero(0.f);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec f0 = zero, f1 = zero, r0 = zero, r1 = zero;
    if constexpr (USE_F) Io<T>::load(f + i, f0, f1);
    if constexpr (USE_R) Io<T>::load(r + i, r0, r1);
    Vec o0 = zero, o1 = zero;
    if constexpr (USE_F && USE_R) {
      o0 = at::vec::fmadd(vb, f0, va * r0);
      o1 = at::vec::fmadd(vb, f1, va * r1);
    } else if constexpr (USE_F) {
      o0 = vb * f0;
      o1 = vb * f1;
    } else if constexpr (USE_R) {
      o0 = va * r0;
      o1 = va * r1;
    }
    Io<T>::store(out + i, o0, o1);
  }
  for (; i < n; ++i) {
    float o = 0.f;
    if constexpr (USE_R) o = a * static_cast<float>(r[i]);
    if constexpr (USE_F) o += b * static_cast<float>(f[i]);
    out[i] = static_cast<T>(o);
  }
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kBFloat16:
      fn(at::BFloat16{});
      break;
    case at::kHalf:
      fn(at::Half{});
      break;
    default:
      TORCH_CHECK_VALUE(false, "ngdiff: gradients must be float32, bfloat16 or float16, got ", dtype);
  }
}

void check_segment(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "ngdiff: ", name, " must be on CPU");
  TORCH_CHECK_VALUE(t.is_contiguous(), "ngdiff: ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type() && t.numel() == like.numel(), "ngdiff: ",
              name, " must match the forget segment's dtype and size");
}

std::vector<Segment> segments(const std::vector<at::Tensor>& forget,
                              const std::vector<at::Tensor>& retain,
                              const std::vector<at::Tensor>* out) {
  TORCH_CHECK_VALUE(forget.size() == retain.size(), "ngdiff: forget and retain segment counts differ");
  TORCH_CHECK_VALUE(out == nullptr || out->size() == forget.size(),
              "ngdiff: out and forget segment counts differ");
  std::vector<Segment> segs;
  segs.reserve(forget.size());
  for (size_t j = 0; j < forget.size(); ++j) {
    check_segment(forget[j], forget[j], "forget segment");
    check_segment(retain[j], forget[j], "retain segment");
    void* o = nullptr;
    if (out != nullptr) {
      check_segment((*out)[j], forget[j], "out segment");
      o = (*out)[j].data_ptr();
    }
    segs.push_back({forget[j].data_ptr(), retain[j].data_ptr(), o, forget[j].scalar_type()});
  }
  return segs;
}

}  // namespace

at::Tensor ngdiff_sums(const std::vector<at::Tensor>& forget,
                       const std::vector<at::Tensor>& retain) {
  const auto segs = segments(forget, retain, nullptr);
  const Layout layout(forget);
  std::vector<std::array<double, 3>> partial(layout.items(), {0.0, 0.0, 0.0});
  at::parallel_for(0, layout.items(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      layout.for_pieces(k, [&](int64_t seg, int64_t begin, int64_t end) {
        const Segment& s = segs[seg];
        dispatch_dtype(s.dtype, [&](auto tag) {
          using T = decltype(tag);
          const auto piece = piece_sums(static_cast<const T*>(s.f) + begin,
                                        static_cast<const T*>(s.r) + begin, end - begin);
          for (int c = 0; c < 3; ++c) partial[k][c] += piece[c];
        });
      });
    }
  });
  auto sums = at::zeros({3}, at::kDouble);
  double* acc = sums.data_ptr<double>();
  for (const auto& p : partial) {
    for (int c = 0; c < 3; ++c) acc[c] += p[c];
  }
  return sums;
}

void ngdiff_write(const std::vector<at::Tensor>& forget, const std::vector<at::Tensor>& retain,
                  const std::vector<at::Tensor>& out, const at::Tensor& coef) {
  TORCH_CHECK_VALUE(coef.numel() == 2 && coef.scalar_type() == at::kFloat && coef.device().is_cpu(),
              "ngdiff: coef must be a float32 CPU tensor [a, b]");
  const auto segs = segments(forget, retain, &out);
  const Layout layout(forget);
  const float a = coef.data_ptr<float>()[0], b = coef.data_ptr<float>()[1];
  const bool use_f = b != 0.f, use_r = a != 0.f;
  at::parallel_for(0, layout.items(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      layout.for_pieces(k, [&](int64_t seg, int64_t begin, int64_t end) {
        const Segment& s = segs[seg];
        dispatch_dtype(s.dtype, [&](auto tag) {
          using T = decltype(tag);
          const T* f = static_cast<const T*>(s.f) + begin;
          const T* r = static_cast<const T*>(s.r) + begin;
          T* o = static_cast<T*>(s.out) + begin;
          const int64_t n = end - begin;
          if (use_f && use_r) {
            item_write<T, true, true>(f, r, o, n, a, b);
          } else if (use_f) {
            item_write<T, true, false>(f, r, o, n, a, b);
          } else if (use_r) {
            item_write<T, false, true>(f, r, o, n, a, b);
          } else {
            item_write<T, false, false>(f, r, o, n, a, b);
          }
        });
      });
    }
  });
}

}  // namespace unlearn_kernels::CPU_CAPABILITY
