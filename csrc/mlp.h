// Whole-MLP passes: one call runs the forward (keeping what the backward needs), one call
// runs the backward of every layer. Device-generic: GEMMs and elementwise ops through
// ATen, the per-sample outer products through the indivgrad_cuda ops (fused on CUDA).
#pragma once

#include <torch/extension.h>

namespace indivgrad {

void bind_mlp(pybind11::module& m);

}  // namespace indivgrad
