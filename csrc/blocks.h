// Blocks of samples for the layer ops' temporaries (layer_ops.cpp, gram.cpp): each sample's
// result is computed the same way in any block, so results do not depend on the block size.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace indivgrad {

constexpr int64_t kBlockBytes = int64_t{64} << 20;  // temporaries per block of samples

// float16/bfloat16 accumulate in float32.
inline at::ScalarType acc_type(at::ScalarType t) { return at::isReducedFloatingType(t) ? at::kFloat : t; }

// Samples per block so that `per_sample` elements of `elem_size` bytes each fit kBlockBytes.
inline int64_t block_size(int64_t n, int64_t per_sample, int64_t elem_size) {
  return std::max<int64_t>(1, std::min<int64_t>(n, kBlockBytes / std::max<int64_t>(1, per_sample * elem_size)));
}

// f(n0, nb) for consecutive blocks of at most `block` of n samples.
template <typename F>
void for_blocks(int64_t n, int64_t block, F f) {
  for (int64_t n0 = 0; n0 < n; n0 += block) f(n0, std::min(block, n - n0));
}

}  // namespace indivgrad
