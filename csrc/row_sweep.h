// Helpers shared by the row-wise CPU epilogues (cross_entropy.cpp, kl.cpp). Include after
// vec_math.h, which must be the first ATen-touching header of a translation unit.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace unlearn_kernels::CPU_CAPABILITY {

// Rows per parallel task: enough elements that a task is worth a thread wake-up.
inline int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
}

// Writes through data_ptr bypass autograd's version counter; bump it as x.copy_ would.
inline void mark_written(at::Tensor& x) {
  if (!x.is_inference()) x.unsafeGetTensorImpl()->bump_version();
}

}  // namespace unlearn_kernels::CPU_CAPABILITY
