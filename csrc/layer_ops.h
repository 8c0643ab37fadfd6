// The layer-rule ops (layer_ops.cpp): what native C++ callers need of them, and the cost
// rules that choose between the two exact ways of forming a squared norm.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace indivgrad {

// Embedding norms take the ghost form (T² pairs of tokens) up to this many tokens per
// sample, the sort-based direct form beyond.
constexpr int64_t kEmbeddingGhostMaxTokens = 64;  // the crossover lies between 64 and 256 (bench/norms.py)

// What writing one element of a temporary and reading it back costs, in multiply-adds: about
// 140 on the 2-core development CPU (bench/norms.py), 40-120 on an H100/H200 by its
// bandwidth and FMA rate.
constexpr int64_t kElementCost = 128;

// The same for an element of a temporary that stays in cache (the fused Linear norms' tiles
// and slabs): fitted on the 2-core development CPU (bench/norms.py, bench/NOTES.md "Fused
// sequence-Linear norms (issue 28)").
constexpr int64_t kFusedElementCost = 16;

// Whether a Linear layer's squared per-sample norm over T positions is formed as the ghost
// norm <X Xᵀ, G Gᵀ> (tiles of the symmetric T x T Grams, the pairs i <= j: T²(D_in + D_out)/2
// multiply-adds, run at about half the rate of the direct form's larger GEMMs) rather than
// directly from the [D_out, D_in] gradient (T·D_in·D_out multiply-adds, slabs squared and
// summed in cache): the ghost norm when T²(D_in + D_out + 2c) <= (T + c)·D_in·D_out, c =
// kFusedElementCost. method: "auto", "ghost" or "direct".
bool linear_norm_uses_ghost(int64_t t, int64_t d_in, int64_t d_out, c10::string_view method);
bool embedding_norm_uses_ghost(int64_t t, c10::string_view method);

// The method a caller forced (true: ghost), or none for "auto"; anything else is refused.
std::optional<bool> forced_ghost(c10::string_view method);

// [N, ..., D] -> [N, ...]: squared norms over the last dim; float16/bfloat16 accumulate in float32.
at::Tensor squared_rows(const at::Tensor& t);

// indivgrad_cuda::linear_sq_norms(x, g, "auto") through the dispatcher.
at::Tensor call_linear_sq_norms(const at::Tensor& x, const at::Tensor& g);

}  // namespace indivgrad
