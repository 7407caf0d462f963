// The Python module unlearn_kernels._C: every entry point of kernels.h, dispatched at each call
// to the copy compiled for the instruction set chosen at import (the widest one both compiled
// and supported by this CPU: AVX512, AVX2, DEFAULT), or forced by UNLEARN_KERNELS_CPU_ISA.
//
// Compiled for the baseline target only (setup.py), so importing the module never executes an
// instruction the CPU lacks; which ISAs were compiled comes from setup.py's UK_HAVE_<ISA>.

#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"

namespace unlearn_kernels {
namespace {

namespace py = pybind11;

enum Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kIsaCount = 3 };
constexpr std::array<const char*, kIsaCount> kIsaNames = {"default", "avx2", "avx512"};

#if defined(UK_HAVE_AVX2)
constexpr bool kCompiledAvx2 = true;
#else
constexpr bool kCompiledAvx2 = false;
#endif
#if defined(UK_HAVE_AVX512)
constexpr bool kCompiledAvx512 = true;
#else
constexpr bool kCompiledAvx512 = false;
#endif

bool compiled(int isa) {
  return isa == kDefault || (isa == kAvx2 && kCompiledAvx2) || (isa == kAvx512 && kCompiledAvx512);
}

// What each copy was compiled for (setup.py's flags for it).
bool cpu_runs(int isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  switch (isa) {
    case kAvx2: return avx2;
    case kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    default: return true;
  }
#else
  return isa == kDefault;
#endif
}

std::atomic<int> active{kDefault};

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (int isa = 0; isa < kIsaCount; ++isa) {
    if (compiled(isa)) names.emplace_back(kIsaNames[isa]);
  }
  return names;
}

std::string active_isa() { return kIsaNames[active.load()]; }

void set_isa(const std::string& requested) {
  std::string name(requested);
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  const auto it = std::find(kIsaNames.begin(), kIsaNames.end(), name);
  TORCH_CHECK_VALUE(it != kIsaNames.end(), "isa must be one of default, avx2, avx512, got '",
                    requested, "'");
  const int isa = static_cast<int>(it - kIsaNames.begin());
  TORCH_CHECK_VALUE(compiled(isa), "isa '", name, "' was not compiled into unlearn_kernels._C ",
                    "(setup.py builds it on x86-64 only)");
  TORCH_CHECK_VALUE(cpu_runs(isa), "isa '", name, "' is not supported by this CPU");
  active.store(isa);
}

// The widest compiled ISA this CPU runs, unless UNLEARN_KERNELS_CPU_ISA names one.
void select_isa() {
  if (const char* forced = std::getenv("UNLEARN_KERNELS_CPU_ISA"); forced && *forced) {
    try {
      set_isa(forced);
    } catch (const c10::ValueError& err) {
      TORCH_CHECK_VALUE(false, "UNLEARN_KERNELS_CPU_ISA: ", err.what_without_backtrace());
    }
    return;
  }
  for (int isa = kIsaCount - 1; isa > kDefault; --isa) {
    if (compiled(isa) && cpu_runs(isa)) {
      active.store(isa);
      return;
    }
  }
  active.store(kDefault);
}

// A callable with fn's signature that calls table[active] (nullptr entries are never active).
template <typename R, typename... Args>
auto by_isa(R (*dflt)(Args...), std::type_identity_t<R (*)(Args...)> avx2,
           std::type_identity_t<R (*)(Args...)> avx512) {
  const std::array<R (*)(Args...), kIsaCount> table = {dflt, avx2, avx512};
  return [table](Args... args) -> R { return table[active.load()](std::forward<Args>(args)...); };
}

#if defined(UK_HAVE_AVX2)
#define UK_AVX2(name) &AVX2::name
#else
#define UK_AVX2(name) nullptr
#endif
#if defined(UK_HAVE_AVX512)
#define UK_AVX512(name) &AVX512::name
#else
#define UK_AVX512(name) nullptr
#endif
#define UK_BY_ISA(name) by_isa(&DEFAULT::name, UK_AVX2(name), UK_AVX512(name))

}  // namespace
}  // namespace unlearn_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace unlearn_kernels;
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "unlearn_kernels C++/OpenMP CPU epilogues";
  select_isa();

  m.def("compiled_isas", &compiled_isas,
        "The instruction sets the epilogues were compiled for (default is the baseline target).");
  m.def("active_isa", &active_isa, "The instruction set whose epilogues run.");
  m.def("set_isa", &set_isa, arg("isa"),
        "Run the epilogues compiled for isa (default, avx2 or avx512); ValueError if it was not "
        "compiled or this CPU lacks it. At import: UNLEARN_KERNELS_CPU_ISA, else the widest.");

  m.def("ce_forward", UK_BY_ISA(ce_forward), arg("x"), arg("target"), arg("grad_scale"),
        arg("softcap"), arg("class_weight"), arg("label_smoothing"), arg("class_weight_sum"),
        arg("lse_square_scale"), arg("token_scaling"), arg("argmax"), arg("z_loss"), nogil,
        "Cross-entropy over rows of x [n, V] with the options of CERowMath -> (loss [n] fp32 "
        "(fp64 for fp64 x), lse [n] fp64, z-loss part or None, argmax int64 or None). With "
        "grad_scale a, x is overwritten by the gradient of a_i loss_i.");
  m.def("ce_backward", UK_BY_ISA(ce_backward), arg("x"), arg("target"), arg("lse"),
        arg("grad_scale"), arg("softcap"), arg("class_weight"), arg("label_smoothing"),
        arg("class_weight_sum"), arg("lse_square_scale"), arg("token_scaling"), nogil,
        "Overwrite x [n, V] with the gradient of a_i loss_i from the saved fp64 log-sum-exp.");

  m.def("kl_forward", UK_BY_ISA(kl_forward), arg("x"), arg("x_ref"), arg("grad_scale"),
        arg("temperature"), arg("softcap"), arg("softcap_ref"), arg("beta"), nogil,
        "Per-row divergence of KLRowMath (beta 0 forward KL, 1 reverse KL, else JSD) between "
        "softmax(cap(x)/t) and softmax(x_ref/t) -> (kl, lse, lse_ref, centre); with grad_scale "
        "s (float64), x is overwritten by s d(kl)/dx.");
  m.def("kl_backward", UK_BY_ISA(kl_backward), arg("x"), arg("x_ref"), arg("lse"),
        arg("lse_ref"), arg("centre"), arg("grad_scale"), arg("temperature"), arg("softcap"),
        arg("softcap_ref"), arg("beta"), nogil,
        "Overwrite x with s d(kl)/dx from the saved float64 log-normalisers and centre.");
  m.def("kl_topk_forward", UK_BY_ISA(kl_topk_forward), arg("x"), arg("index"), arg("logprob"),
        arg("tail_logprob"), arg("grad_scale"), arg("temperature"), arg("softcap"), nogil,
        "Per-row top-k KL from reference top-k log-probs and tail log-mass -> (kl, lse, "
        "lse_tail); with grad_scale s, x is overwritten by the gradient times s / t.");
  m.def("kl_topk_backward", UK_BY_ISA(kl_topk_backward), arg("x"), arg("index"),
        arg("logprob"), arg("tail_logprob"), arg("lse"), arg("lse_tail"), arg("grad_scale"),
        arg("temperature"), arg("softcap"), nogil,
        "Overwrite x with the top-k KL gradient times s / t from the saved lse and lse_tail.");

  m.def("ngdiff_sums", UK_BY_ISA(ngdiff_sums), arg("forget"), arg("retain"), nogil,
        "[‖F‖², ‖R‖², ⟨F,R⟩] over contiguous segments (fp32 pieces, float64 total)");
  m.def("ngdiff_write", UK_BY_ISA(ngdiff_write), arg("forget"), arg("retain"), arg("out"),
        arg("coef"), nogil, "out_j = coef[0]·R_j + coef[1]·F_j; a zero coefficient drops its term");
}
