// Device-side activation backward: upstream * act'(pre), written as torch's own backward
// formulas (aten/src/ATen/native) so conventions and NaN behaviour match autograd:
// relu passes the gradient where !(pre <= 0), elu takes the alpha branch at pre == 0,
// softplus is linear where beta * pre > threshold.
#pragma once

#include <c10/macros/Macros.h>

#include "activation.h"

namespace indivgrad {

template <typename T>
C10_HOST_DEVICE inline T activation_backward(const ActParams& p, T up, T x) {
  switch (p.act) {
    case Activation::Identity: return up;
    case Activation::Relu: return x <= T(0) ? T(0) : up;
    case Activation::LeakyRelu: return x > T(0) ? up : up * T(p.negative_slope);
    case Activation::Elu: return x <= T(0) ? up * T(p.alpha) * exp(x) : up;
    case Activation::Tanh: {
      const T t = tanh(x);
      return up * (T(1) - t * t);
    }
    case Activation::Sigmoid: {
      const T s = T(1) / (T(1) + exp(-x));
      return up * ((T(1) - s) * s);
    }
    case Activation::Gelu: {
      const T kAlpha = T(M_SQRT1_2), kBeta = T(M_2_SQRTPI * M_SQRT1_2 * 0.5);
      const T cdf = T(0.5) * (T(1) + erf(x * kAlpha));
      const T pdf = kBeta * exp(T(-0.5) * x * x);
      return up * (cdf + x * pdf);
    }
    case Activation::GeluTanh: {
      const T kBeta = T(M_SQRT2 * M_2_SQRTPI * 0.5), kKappa = T(0.044715);
      const T x_sq = x * x;
      const T inner = kBeta * (x + kKappa * x_sq * x);
      const T t = tanh(inner);
      const T left = T(0.5) * x, right = T(1) + t;
      const T left_d = T(0.5) * right;
      const T right_d = left * (T(1) - t * t) * kBeta * (T(1) + T(3) * kKappa * x_sq);
      return up * (left_d + right_d);
    }
    case Activation::Silu: {
      const T s = T(1) / (T(1) + exp(-x));
      return up * s * (T(1) + x * (T(1) - s));
    }
    case Activation::Softplus: {
      const T bx = x * T(p.beta);
      const T z = exp(bx);
      return bx > T(p.threshold) ? up : up * z / (z + T(1));
    }
  }
  return up;
}

}  // namespace indivgrad
