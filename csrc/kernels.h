// The entry points of the CPU epilogues. Each kernel file is compiled once per instruction set
// (vec_math.h), defining these functions in namespace unlearn_kernels::<ISA> with ISA one of
// DEFAULT, AVX2, AVX512; bindings.cpp exposes each under its own name and calls the copy of the
// ISA chosen at run time (isa.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace unlearn_kernels {

// Cross-entropy (cross_entropy.cpp).
using CeForward = std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>,
                             std::optional<at::Tensor>>(
    at::Tensor x, const at::Tensor& target, const std::optional<at::Tensor>& grad_scale,
    std::optional<double> softcap, const std::optional<at::Tensor>& class_weight,
    double label_smoothing, double class_weight_sum, double lse_square_scale, bool token_scaling,
    bool argmax, bool z_loss);
using CeBackward = void(at::Tensor x, const at::Tensor& target, const at::Tensor& lse,
                        const at::Tensor& grad_scale, std::optional<double> softcap,
                        const std::optional<at::Tensor>& class_weight, double label_smoothing,
                        double class_weight_sum, double lse_square_scale, bool token_scaling);

// Divergences (kl.cpp).
using KlForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    at::Tensor x, const at::Tensor& x_ref, const std::optional<at::Tensor>& grad_scale,
    double temperature, std::optional<double> softcap, bool softcap_ref, double beta);
using KlBackward = void(at::Tensor x, const at::Tensor& x_ref, const at::Tensor& lse,
                        const at::Tensor& lse_ref, const at::Tensor& centre,
                        const at::Tensor& grad_scale, double temperature,
                        std::optional<double> softcap, bool softcap_ref, double beta);
using KlTopkForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    at::Tensor x, const at::Tensor& index, const at::Tensor& logprob,
    const at::Tensor& tail_logprob, const std::optional<at::Tensor>& grad_scale,
    double temperature, std::optional<double> softcap);
using KlTopkBackward = void(at::Tensor x, const at::Tensor& index, const at::Tensor& logprob,
                            const at::Tensor& tail_logprob, const at::Tensor& lse,
                            const at::Tensor& lse_tail, const at::Tensor& grad_scale,
                            double temperature, std::optional<double> softcap);

// NGDiff combine (ngdiff.cpp).
using NgdiffSums = at::Tensor(const std::vector<at::Tensor>& forget,
                              const std::vector<at::Tensor>& retain);
using NgdiffWrite = void(const std::vector<at::Tensor>& forget,
                         const std::vector<at::Tensor>& retain,
                         const std::vector<at::Tensor>& out, const at::Tensor& coef);

#define UK_DECLARE_KERNELS(isa)       \
  namespace isa {                     \
  CeForward ce_forward;               \
  CeBackward ce_backward;             \
  KlForward kl_forward;               \
  KlBackward kl_backward;             \
  KlTopkForward kl_topk_forward;      \
  KlTopkBackward kl_topk_backward;    \
  NgdiffSums ngdiff_sums;             \
  NgdiffWrite ngdiff_write;           \
  }

UK_DECLARE_KERNELS(DEFAULT)
UK_DECLARE_KERNELS(AVX2)
UK_DECLARE_KERNELS(AVX512)

#undef UK_DECLARE_KERNELS

}  // namespace unlearn_kernels
