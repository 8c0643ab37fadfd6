// Activations through ATen's own forward and backward functions, on any device. Used by
// the CPU kernels and by the MLP passes wherever no outer product is fused.
#pragma once

#include <ATen/core/Tensor.h>

#include "activation.h"

namespace indivgrad {

at::Tensor activation_forward(const ActParams& p, const at::Tensor& pre);

// upstream * act'(pre), by torch's backward formulas (its conventions at 0, NaN handling).
at::Tensor activation_backward(const ActParams& p, const at::Tensor& upstream, const at::Tensor& pre);

// float16/bfloat16 compute in float32 and round once, when written: t in its compute dtype.
at::Tensor compute_dtype(const at::Tensor& t);

}  // namespace indivgrad
