#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace indivgrad {

Layout parse_layout(c10::string_view layout) {
  if (layout == "in_out") return Layout::InOut;
  if (layout == "out_in") return Layout::OutIn;
  TORCH_CHECK_VALUE(false, "layout: expected \"in_out\" ([N, D_in, D_out]) or \"out_in\" ([N, D_out, D_in]), got \"",
                    std::string(layout), "\"");
}

ActParams parse_activation(c10::string_view name, double negative_slope, double alpha, double beta, double threshold) {
  static const std::pair<const char*, Activation> kNames[] = {
      {"identity", Activation::Identity}, {"relu", Activation::Relu},          {"leaky_relu", Activation::LeakyRelu},
      {"elu", Activation::Elu},           {"tanh", Activation::Tanh},          {"sigmoid", Activation::Sigmoid},
      {"gelu", Activation::Gelu},         {"gelu_tanh", Activation::GeluTanh}, {"silu", Activation::Silu},
      {"softplus", Activation::Softplus}};
  std::string valid;
  for (const auto& entry : kNames) {
    if (name == entry.first) return ActParams{entry.second, negative_slope, alpha, beta, threshold};
    valid += valid.empty() ? entry.first : std::string(", ") + entry.first;
  }
  TORCH_CHECK_VALUE(false, "activation: expected one of ", valid, "; got \"", std::string(name), "\"");
}

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
                   ": expected dtype float32, float64, float16 or bfloat16, got ", s);
}

void check_inputs(const at::Tensor& x, std::initializer_list<NamedTensor> others) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [N, D_in], got shape ", x.sizes());
  check_float_dtype(x, "x");
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(t->dim() == 2, name, ": expected a 2-D tensor [N, D_out], got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->size(0) == x.size(0), name, ": expected ", x.size(0), " rows (N, from x), got shape ",
                      t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
                     " (x's dtype), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), name, ": expected device ", x.device(), " (x's device), got ",
                      t->device());
  }
  const at::Tensor& first = *others.begin()->second;
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(t->sizes() == first.sizes(), name, ": expected shape ", first.sizes(), " (",
                      others.begin()->first, "'s shape), got ", t->sizes());
  }
}

std::vector<int64_t> outer_shape(const at::Tensor& x, const at::Tensor& g, Layout layout) {
  return layout == Layout::InOut ? std::vector<int64_t>{x.size(0), x.size(1), g.size(1)}
                                 : std::vector<int64_t>{x.size(0), g.size(1), x.size(1)};
}

void check_output(const at::Tensor& buf, const char* name, at::IntArrayRef shape, const at::Tensor& x,
                  std::initializer_list<NamedTensor> inputs) {
  TORCH_CHECK_VALUE(buf.sizes() == shape, name, ": expected shape ", shape, ", got ", buf.sizes());
  TORCH_CHECK_TYPE(buf.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
                   " (x's dtype), got ", buf.scalar_type());
  TORCH_CHECK_VALUE(buf.device() == x.device(), name, ": expected device ", x.device(), " (x's device), got ",
                    buf.device());
  TORCH_CHECK_VALUE(buf.is_contiguous(), name, ": expected a contiguous tensor, got strides ", buf.strides());
  for (const auto& [input_name, t] : inputs) {
    // get_overlap_status answers TooHard for strided tensors before looking at storages.
    const bool disjoint =
        !buf.storage().is_alias_of(t->storage()) || at::get_overlap_status(buf, *t) == at::MemOverlapStatus::No;
    TORCH_CHECK_VALUE(disjoint, name, ": must not share memory with ", input_name, ", which is read while ", name,
                      " is written");
  }
}

void check_norms_out(const at::Tensor& out, int64_t rows, int64_t n, at::ScalarType acc, const at::Tensor& x,
                     const char* what, std::initializer_list<NamedTensor> inputs) {
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == rows && out.size(1) == n, "out: expected shape [", rows, ", ", n,
                    "] (a row of N per-sample squared norms for each True of ", what, "), got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == acc, "out: expected dtype ", acc, " (the accumulation dtype of ",
                   x.scalar_type(), " inputs), got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == x.device(), "out: expected device ", x.device(), " (x's device), got ",
                    out.device());
  TORCH_CHECK_VALUE(n <= 1 || out.stride(1) == 1, "out: expected contiguous rows (stride 1 along N), got strides ",
                    out.strides());
  for (const auto& [input_name, t] : inputs) {
    const bool disjoint =
        !out.storage().is_alias_of(t->storage()) || at::get_overlap_status(out, *t) == at::MemOverlapStatus::No;
    TORCH_CHECK_VALUE(disjoint, "out: must not share memory with ", input_name, ", which is read while out is written");
  }
}

Layout check_outer_out(const at::Tensor& x, const at::Tensor& g, c10::string_view layout, const at::Tensor& out) {
  check_inputs(x, {{"g", &g}});
  const Layout lay = parse_layout(layout);
  check_output(out, "out", outer_shape(x, g, lay), x, {{"x", &x}, {"g", &g}});
  return lay;
}

ActOuterConfig check_act_outer_out(const at::Tensor& x, const at::Tensor& upstream, const at::Tensor& pre,
                                   c10::string_view activation, c10::string_view layout, double negative_slope,
                                   double alpha, double beta, double threshold, const at::Tensor& out,
                                   const at::Tensor& bias_out) {
  check_inputs(x, {{"upstream", &upstream}, {"pre", &pre}});
  const Layout lay = parse_layout(layout);
  const ActParams act = parse_activation(activation, negative_slope, alpha, beta, threshold);
  check_output(out, "out", outer_shape(x, upstream, lay), x, {{"x", &x}, {"upstream", &upstream}, {"pre", &pre}});
  check_output(bias_out, "bias_out", upstream.sizes(), x,
               {{"x", &x}, {"upstream", &upstream}, {"pre", &pre}, {"out", &out}});
  return {lay, act};
}

}  // namespace indivgrad
