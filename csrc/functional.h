// The allocating ops (outer, act_outer) of a backend: validate, allocate, call the
// backend's out= implementation. Shared so CPU and CUDA allocate identically.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "checks.h"

namespace indivgrad {

using OuterOut = void (*)(const at::Tensor&, const at::Tensor&, c10::string_view, const at::Tensor&);
using ActOuterOut = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                             c10::string_view, double, double, double, double, const at::Tensor&, const at::Tensor&);

template <OuterOut impl>
at::Tensor outer_functional(const at::Tensor& x, const at::Tensor& g, c10::string_view layout) {
  check_inputs(x, {{"g", &g}});
  at::Tensor out = at::empty(outer_shape(x, g, parse_layout(layout)), x.options());
  impl(x, g, layout, out);
  return out;
}

template <ActOuterOut impl>
std::tuple<at::Tensor, at::Tensor> act_outer_functional(const at::Tensor& x, const at::Tensor& upstream,
                                                        const at::Tensor& pre, c10::string_view activation,
                                                        c10::string_view layout, double negative_slope, double alpha,
                                                        double beta, double threshold) {
  check_inputs(x, {{"upstream", &upstream}, {"pre", &pre}});
  at::Tensor out = at::empty(outer_shape(x, upstream, parse_layout(layout)), x.options());
  at::Tensor bias_out = at::empty(upstream.sizes(), x.options());
  impl(x, upstream, pre, activation, layout, negative_slope, alpha, beta, threshold, out, bias_out);
  return {out, bias_out};
}

}  // namespace indivgrad
