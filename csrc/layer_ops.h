// The layer-rule ops (layer_ops.cpp): what native C++ callers need of them, and the cost
// rules that choose between the two exact ways of forming a squared norm.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace indivgrad {

// Embedding norms take the ghost form (T² pairs of tokens) up to this many tokens per
// sample, the sort-based direct form beyond.
constexpr int64_t kEmbeddingGhostMaxTokens = 16;

// Whether a Linear layer's squared per-sample norm over T positions is formed as the ghost
// norm <X Xᵀ, G Gᵀ> (~T²(D_in + D_out + 1) multiply-adds) rather than directly from the
// [D_out, D_in] gradient (~T·D_in·D_out + D_in·D_out). method: "auto", "ghost" or "direct".
bool linear_norm_uses_ghost(int64_t t, int64_t d_in, int64_t d_out, c10::string_view method);
bool embedding_norm_uses_ghost(int64_t t, c10::string_view method);

// indivgrad_cuda::linear_sq_norms(x, g, "auto") through the dispatcher.
at::Tensor call_linear_sq_norms(const at::Tensor& x, const at::Tensor& g);

}  // namespace indivgrad
