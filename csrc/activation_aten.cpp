#include "activation_aten.h"

#include <ATen/ATen.h>

namespace indivgrad {

at::Tensor activation_forward(const ActParams& p, const at::Tensor& pre) {
  switch (p.act) {
    case Activation::Identity: return pre;
    case Activation::Relu: return at::relu(pre);
    case Activation::LeakyRelu: return at::leaky_relu(pre, p.negative_slope);
    case Activation::Elu: return at::elu(pre, p.alpha);
    case Activation::Tanh: return at::tanh(pre);
    case Activation::Sigmoid: return at::sigmoid(pre);
    case Activation::Gelu: return at::gelu(pre, "none");
    case Activation::GeluTanh: return at::gelu(pre, "tanh");
    case Activation::Silu: return at::silu(pre);
    case Activation::Softplus: return at::softplus(pre, p.beta, p.threshold);
  }
  TORCH_CHECK(false, "unreachable activation");
}

at::Tensor activation_backward(const ActParams& p, const at::Tensor& up, const at::Tensor& pre) {
  switch (p.act) {
    case Activation::Identity: return up;
    case Activation::Relu: return at::threshold_backward(up, pre, 0);
    case Activation::LeakyRelu: return at::leaky_relu_backward(up, pre, p.negative_slope, false);
    case Activation::Elu: return at::elu_backward(up, p.alpha, 1, 1, false, pre);
    case Activation::Tanh: return at::tanh_backward(up, at::tanh(pre));
    case Activation::Sigmoid: return at::sigmoid_backward(up, at::sigmoid(pre));
    case Activation::Gelu: return at::gelu_backward(up, pre, "none");
    case Activation::GeluTanh: return at::gelu_backward(up, pre, "tanh");
    case Activation::Silu: return at::silu_backward(up, pre);
    case Activation::Softplus: return at::softplus_backward(up, pre, p.beta, p.threshold);
  }
  TORCH_CHECK(false, "unreachable activation");
}

at::Tensor compute_dtype(const at::Tensor& t) {
  return at::isReducedFloatingType(t.scalar_type()) ? t.to(at::kFloat) : t;
}

}  // namespace indivgrad
