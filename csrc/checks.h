// Argument validation shared by the CPU and CUDA implementations. Every error names the
// argument, what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <initializer_list>
#include <utility>
#include <vector>

#include "activation.h"

namespace indivgrad {

// in_out: out[n] is [D_in, D_out] (W of C = X W); out_in: [D_out, D_in] (nn.Linear.weight).
enum class Layout { InOut, OutIn };

Layout parse_layout(c10::string_view layout);

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// `name` has one of the dtypes the ops compute in: float32, float64, float16, bfloat16.
void check_float_dtype(const at::Tensor& t, const char* name);

// x is [N, D_in]; each of `others` is [N, D_out] with x's dtype and device.
void check_inputs(const at::Tensor& x, std::initializer_list<NamedTensor> others);

// Shape of the per-sample gradient buffer for x [N, D_in] and g [N, D_out].
std::vector<int64_t> outer_shape(const at::Tensor& x, const at::Tensor& g, Layout layout);

// A caller-provided output: exact shape, x's dtype and device, contiguous, and no memory
// shared with any of `inputs` (which the kernel reads while it writes).
void check_output(const at::Tensor& buf, const char* name, at::IntArrayRef shape, const at::Tensor& x,
                  std::initializer_list<NamedTensor> inputs);

// The out of the per-layer norm ops: [rows, n] (one row per norm asked for, `what` names them
// in order), dtype `acc` (the accumulation dtype of x's), x's device, each row contiguous (it
// may be rows of a bigger buffer), no memory shared with any of `inputs`.
void check_norms_out(const at::Tensor& out, int64_t rows, int64_t n, at::ScalarType acc, const at::Tensor& x,
                     const char* what, std::initializer_list<NamedTensor> inputs);

// Full validation of the out= ops; returns the parsed layout (and activation).
Layout check_outer_out(const at::Tensor& x, const at::Tensor& g, c10::string_view layout, const at::Tensor& out);

struct ActOuterConfig {
  Layout layout;
  ActParams act;
};
ActOuterConfig check_act_outer_out(const at::Tensor& x, const at::Tensor& upstream, const at::Tensor& pre,
                                   c10::string_view activation, c10::string_view layout, double negative_slope,
                                   double alpha, double beta, double threshold, const at::Tensor& out,
                                   const at::Tensor& bias_out);

}  // namespace indivgrad
