// Inner products between two sets of samples' per-sample gradients of a Linear layer, from
// the layers' factors (gram.cpp; the 2-D case fused on CUDA in gram_kernel.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace indivgrad {

// Whether linear_gram forms sum_{t,s} (x_t·x'_s + bias)(g_t·g'_s) from T_a x T_b Grams
// ("ghost", T_a·T_b·(D_in + D_out + 2c) multiply-adds per pair of samples) rather than from
// the per-sample gradients of both sides ("direct": D_in·D_out per pair, plus forming them,
// (T_a + c)·D_in·D_out per sample of a and (T_b + c) per sample of b, shared by the pairs), c =
// kElementCost. method: "auto", "ghost" or "direct".
bool linear_gram_uses_ghost(int64_t t_a, int64_t t_b, int64_t n_a, int64_t n_b, int64_t d_in, int64_t d_out,
                            c10::string_view method);

// The ATen implementation of indivgrad_cuda::linear_gram (any device); CUDA calls its fused
// kernel for 2-D factors and this for sequences.
at::Tensor linear_gram_aten(const at::Tensor& xa, const at::Tensor& ga, const at::Tensor& xb, const at::Tensor& gb,
                            double bias, c10::string_view method);

// Validates the factors of both sides; returns them as [N, T, D] (2-D as T = 1).
struct GramFactors {
  at::Tensor xa, ga, xb, gb;
};
GramFactors check_gram_factors(const at::Tensor& xa, const at::Tensor& ga, const at::Tensor& xb, const at::Tensor& gb,
                               double bias);

#ifdef INDIVGRAD_WITH_CUDA
// CUDA: dst[n] = ||G_nᵀ X_n||² = sum_{t,s} (x_t·x_s)(g_t·g_s) for x [N, T, D_in] and g [N, T,
// D_out] (validated; any strides), dst [N] of the accumulation dtype (contiguous; it may be a
// row of a bigger buffer), by ghost_sq_norm_kernel (gram_kernel.cuh): no T x T Gram written.
void linear_ghost_sq_norms_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& dst);
#endif

}  // namespace indivgrad
