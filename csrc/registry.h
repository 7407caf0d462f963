// Each kernel file registers its own Python bindings, so adding a kernel never edits a
// shared binding table: `static RegisterBindings reg([](pybind11::module_& m) { m.def(...); });`
#pragma once

#include <torch/extension.h>

#include <functional>
#include <vector>

namespace unlearn_kernels {

using Binder = std::function<void(pybind11::module_&)>;

std::vector<Binder>& binders();

struct RegisterBindings {
  explicit RegisterBindings(Binder binder) { binders().push_back(std::move(binder)); }
};

}  // namespace unlearn_kernels
