// The fused 2-D Linear Gram kernel: out[n, m] += (xa[n]·xb[m] + bias) * (ga[n]·gb[m]) for
// every n < na, m < nb: the inner products of per-sample gradients xa[n] ⊗ ga[n] and
// xb[m] ⊗ gb[m] (plus the bias's, ga[n]·gb[m], when bias = 1), with both dot products of a
// pair formed in registers and multiplied there: no [na, nb] Gram is ever written per factor.
// Plain CUDA C++ with no ATen: gram_cuda.cu launches it, tests/harness/gram_harness.cpp runs
// this same file on the host, thread by thread, under AddressSanitizer.
//
// A block owns a kGramTile x kGramTile tile of out; its 16 x 16 threads own 4 x 4 outputs
// each (rows ty + 16i, columns tx + 16j). The reduction dim is staged kGramDepth elements at
// a time, both sides' rows in shared memory (padded rows: conflict-free column reads), first
// over D_in (x), then over D_out (g).
//
// ghost_sq_norm_kernel is the batched per-sample form with both sets one sample's T
// positions: sample n's squared gradient norm ||G_nᵀ X_n||² = sum_{t,s} (x_t·x_s)(g_t·g_s).
// The T x T products are symmetric, so a block owns one tile pair (i <= j) of one sample,
// forms its 64 x 64 products in registers like gram_kernel, sums them within the block and
// writes that sum (twice it off the diagonal) to partial[n, pair]; the host adds each
// sample's partials (a fixed order: deterministic). No T x T Gram is ever written.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#ifndef INDIVGRAD_DYNAMIC_SMEM
#define INDIVGRAD_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace indivgrad {

constexpr int kGramTile = 64;   // outputs per block side
constexpr int kGramDepth = 16;  // reduction elements staged per step
constexpr int kGramPad = kGramDepth + 1;
constexpr int kGramThreads = 256;  // 16 x 16
constexpr int kGramSide = 16;
constexpr int kGramPer = kGramTile / kGramSide;  // outputs per thread per side

struct GramPlan {
  int64_t na, nb;    // out is [na, nb] with row stride ld_out
  int64_t d_x, d_g;  // widths of x (D_in) and g (D_out)
  int64_t ld_out;
  int64_t tiles_b;  // column tiles; blocks = tiles_a * tiles_b
  int64_t blocks;
};

inline GramPlan make_gram_plan(int64_t na, int64_t nb, int64_t d_x, int64_t d_g, int64_t ld_out) {
  const int64_t tiles_a = (na + kGramTile - 1) / kGramTile, tiles_b = (nb + kGramTile - 1) / kGramTile;
  return {na, nb, d_x, d_g, ld_out, tiles_b, tiles_a * tiles_b};
}

// Shared memory per block: one staged slab per side.
inline int64_t gram_smem_bytes(int acc_size) { return 2 * int64_t{kGramTile} * kGramPad * acc_size; }

// acc[i][j] += u[n0 + ty + 16i] · v[m0 + tx + 16j] over the d-wide rows of u [na, d] and v [nb, d].
template <typename T, typename acc_t>
__device__ __forceinline__ void gram_accumulate(const T* u, const T* v, int64_t d, int64_t n0, int64_t m0,
                                                const GramPlan& p, acc_t* su, acc_t* sv,
                                                acc_t (&acc)[kGramPer][kGramPer]) {
  const int tx = threadIdx.x % kGramSide, ty = threadIdx.x / kGramSide;
  for (int64_t k0 = 0; k0 < d; k0 += kGramDepth) {
    for (int e = threadIdx.x; e < kGramTile * kGramDepth; e += kGramThreads) {
      const int r = e / kGramDepth, k = e % kGramDepth;  // consecutive threads read consecutive elements of a row
      const bool in_k = k0 + k < d;
      su[r * kGramPad + k] = (in_k && n0 + r < p.na) ? static_cast<acc_t>(u[(n0 + r) * d + k0 + k]) : acc_t(0);
      sv[r * kGramPad + k] = (in_k && m0 + r < p.nb) ? static_cast<acc_t>(v[(m0 + r) * d + k0 + k]) : acc_t(0);
    }
    __syncthreads();
    for (int k = 0; k < kGramDepth; ++k) {
      acc_t a[kGramPer], b[kGramPer];
      for (int i = 0; i < kGramPer; ++i) a[i] = su[(ty + kGramSide * i) * kGramPad + k];
      for (int j = 0; j < kGramPer; ++j) b[j] = sv[(tx + kGramSide * j) * kGramPad + k];
      for (int i = 0; i < kGramPer; ++i)
        for (int j = 0; j < kGramPer; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();  // the slab is overwritten next step
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kGramThreads)
    gram_kernel(const T* xa, const T* ga, const T* xb, const T* gb, acc_t* out, GramPlan p, acc_t bias) {
  INDIVGRAD_DYNAMIC_SMEM(smem);
  acc_t* su = reinterpret_cast<acc_t*>(smem);
  acc_t* sv = su + kGramTile * kGramPad;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) / p.tiles_b * kGramTile;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) % p.tiles_b * kGramTile;
  acc_t kx[kGramPer][kGramPer] = {}, kg[kGramPer][kGramPer] = {};
  gram_accumulate(xa, xb, p.d_x, n0, m0, p, su, sv, kx);
  gram_accumulate(ga, gb, p.d_g, n0, m0, p, su, sv, kg);
  const int tx = threadIdx.x % kGramSide, ty = threadIdx.x / kGramSide;
  for (int i = 0; i < kGramPer; ++i) {
    const int64_t n = n0 + ty + kGramSide * i;
    if (n >= p.na) continue;
    for (int j = 0; j < kGramPer; ++j) {
      const int64_t m = m0 + tx + kGramSide * j;  // consecutive threads: consecutive columns
      if (m < p.nb) out[n * p.ld_out + m] += (kx[i][j] + bias) * kg[i][j];
    }
  }
}

// One sample's T positions as both sets: partial[blockIdx.x] for sample blockIdx.x / pairs and
// the pair'th tile pair (i <= j, row by row) of its T x T products.
struct GhostPlan {
  int64_t n, t;      // samples, positions per sample; x is [n, t, d_x], g [n, t, d_g], contiguous
  int64_t d_x, d_g;  // widths of x (D_in) and g (D_out)
  int64_t tiles;     // tiles per side of the T x T products
  int64_t pairs;     // tile pairs i <= j per sample: tiles·(tiles + 1)/2
  int64_t blocks;    // n · pairs
};

inline GhostPlan make_ghost_plan(int64_t n, int64_t t, int64_t d_x, int64_t d_g) {
  const int64_t tiles = (t + kGramTile - 1) / kGramTile, pairs = tiles * (tiles + 1) / 2;
  return {n, t, d_x, d_g, tiles, pairs, n * pairs};
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kGramThreads)
    ghost_sq_norm_kernel(const T* x, const T* g, acc_t* partial, GhostPlan p) {
  INDIVGRAD_DYNAMIC_SMEM(smem);
  acc_t* su = reinterpret_cast<acc_t*>(smem);
  acc_t* sv = su + kGramTile * kGramPad;
  const int64_t sample = static_cast<int64_t>(blockIdx.x) / p.pairs;
  int64_t rest = static_cast<int64_t>(blockIdx.x) % p.pairs, i = 0;
  while (rest >= p.tiles - i) {  // row i of the upper triangle holds tiles - i pairs
    rest -= p.tiles - i;
    ++i;
  }
  const int64_t j = i + rest;
  const GramPlan gp{p.t, p.t, p.d_x, p.d_g, 0, 0, 0};  // bounds for the staging: t rows per side
  const T* xs = x + sample * p.t * p.d_x;
  const T* gs = g + sample * p.t * p.d_g;
  acc_t kx[kGramPer][kGramPer] = {}, kg[kGramPer][kGramPer] = {};
  gram_accumulate(xs, xs, p.d_x, i * kGramTile, j * kGramTile, gp, su, sv, kx);
  gram_accumulate(gs, gs, p.d_g, i * kGramTile, j * kGramTile, gp, su, sv, kg);
  acc_t sum = 0;  // positions beyond t were staged as zeros: their products add exactly 0
  for (int a = 0; a < kGramPer; ++a)
    for (int b = 0; b < kGramPer; ++b) sum += kx[a][b] * kg[a][b];
  acc_t* red = su;  // kGramTile·kGramPad >= kGramThreads; the last slab step ended with a barrier
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kGramThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) red[threadIdx.x] += red[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = (i == j ? acc_t(1) : acc_t(2)) * red[0];
}

}  // namespace indivgrad
