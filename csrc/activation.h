// Activations whose derivative act_outer fuses, and their parameters.
#pragma once

#include <c10/util/string_view.h>

namespace indivgrad {

enum class Activation { Identity, Relu, LeakyRelu, Elu, Tanh, Sigmoid, Gelu, GeluTanh, Silu, Softplus };

// Passed by value to CUDA kernels, so plain data only.
struct ActParams {
  Activation act;
  double negative_slope;  // leaky_relu
  double alpha;           // elu
  double beta;            // softplus
  double threshold;       // softplus: linear above beta * x > threshold
};

// Parses an activation name ("relu", "gelu_tanh", ...); the error lists the valid names.
ActParams parse_activation(c10::string_view name, double negative_slope, double alpha, double beta, double threshold);

}  // namespace indivgrad
