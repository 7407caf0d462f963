#include "registry.h"

namespace unlearn_kernels {

std::vector<Binder>& binders() {
  static std::vector<Binder> registered;
  return registered;
}

}  // namespace unlearn_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unlearn_kernels C++/OpenMP CPU epilogues";
  for (const auto& bind : unlearn_kernels::binders()) bind(m);
}
