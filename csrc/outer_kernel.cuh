// The per-sample outer-product kernel: out[n] = rows[n] ⊗ cols[n] for every sample n,
// with G = upstream * act'(pre) formed on the fly, grad_bias written, and every output
// element written exactly once. Plain CUDA C++ with no ATen: outer_cuda.cu launches it on
// the GPU, and tests/harness compiles this same file for the host and runs it there,
// thread by thread, under AddressSanitizer (so every CI run checks its indexing).
//
// The output [N, R, C] is seen as N*R rows of C elements. A block owns a range of rows
// (possibly spanning several samples) and one column tile. It first stages, in shared
// memory, the row values of its rows and the column values of every sample it touches
// (applying act' where that side is G: each value computed once per block), then streams
// the products out with 16-byte stores:
//   fast path   every row starts on a 16-byte boundary (or, for 2-byte types, an 8-byte
//               one: C * sizeof(T) a multiple of the store width, out aligned to it):
//               thread t walks (row, column-vector) pairs of the block's region, one
//               16- (or 8-) byte store each, with incremental indices (no division in the loop);
//   run path    any pitch or alignment: the region is written as contiguous runs (whole
//               rows when the tile spans C, else one run per row), scalar head and tail,
//               16-byte stores in between.
// bench/NOTES.md has the instruction counts and the bandwidth model behind these choices.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "activation.h"
#include "activation_backward.cuh"

// Dynamic shared memory; the host harness defines its own before including this file.
#ifndef INDIVGRAD_DYNAMIC_SMEM
#define INDIVGRAD_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace indivgrad {

constexpr int kOuterThreads = 256;
constexpr int kOuterMaxTileVecs = kOuterThreads;  // column tile: at most one 16-byte vector per thread
constexpr int64_t kOuterMaxBlockRows = 1024;
constexpr int64_t kOuterSmemBudget = 32 * 1024;  // below the 48 KiB default: no opt-in needed
constexpr int kOuterBlocksPerSm = 8;             // 2048 threads per SM / 256

// The launch shape, decided on the host (make_outer_plan) and passed by value.
struct OuterPlan {
  int64_t R, C;       // out is [N, R, C]; R * N rows in all
  int64_t rows;       // N * R
  int64_t tile_cols;  // columns per column tile (a multiple of the store's vector on the fast path)
  int64_t col_tiles;
  int64_t block_rows;  // rows per block (the last block of a column may have fewer)
  int64_t row_blocks;
  int64_t max_samples;  // most samples one block's rows can touch (column staging)
  bool g_on_rows;       // out_in: rows index D_out (G), columns D_in (x); in_out: the reverse
  int store_bytes;      // fast path: every row of out starts on a boundary of this many bytes
                        // (16, or 8 for 2-byte types); 0: the run path
  bool streaming;       // out is far larger than L2: evict-first stores
  int64_t blocks() const { return col_tiles * row_blocks; }
};

C10_HOST_DEVICE inline int64_t outer_div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Most samples that `block_rows` consecutive rows can touch when each sample has R rows.
C10_HOST_DEVICE inline int64_t outer_samples_spanned(int64_t block_rows, int64_t R) {
  return block_rows >= 1 ? (block_rows + R - 2) / R + 1 : 0;
}

// Shared memory per block: row values, each row's sample (relative to the block's first),
// and the column values of each sample touched.
inline int64_t outer_smem_bytes(const OuterPlan& p, int acc_size) {
  const int64_t rows = p.block_rows * (acc_size + 4);
  return outer_div_up(rows, 16) * 16 + p.max_samples * p.tile_cols * acc_size;
}

// The fast path's store width in bytes for rows of C elements of elem_size bytes starting at
// an address out_address: 16, else 8 for 2-byte types, else 0 (the run path). The SASS counts
// (bench/NOTES.md) decide: per 16 bytes written, 8-byte stores cost half and bfloat16 70
// instructions against the run path's 108, but float32 62 against 56.
inline int outer_store_bytes(int64_t C, int elem_size, uintptr_t out_address) {
  if (out_address % 16 == 0 && C * elem_size % 16 == 0) return 16;
  if (elem_size == 2 && out_address % 8 == 0 && C * elem_size % 8 == 0) return 8;
  return 0;
}

// elem_size: bytes of the output dtype; acc_size: of its compute type. out_address: where the
// output starts (only its alignment matters). num_sms / l2_bytes: of the device.
inline OuterPlan make_outer_plan(int64_t N, int64_t R, int64_t C, bool g_on_rows, int elem_size, int acc_size,
                                 uintptr_t out_address, int num_sms, int64_t l2_bytes) {
  OuterPlan p{};
  p.R = R;
  p.C = C;
  p.rows = N * R;
  p.g_on_rows = g_on_rows;
  p.store_bytes = outer_store_bytes(C, elem_size, out_address);
  const int64_t vec = (p.store_bytes ? p.store_bytes : 16) / elem_size;  // tiles hold whole vectors
  // Balanced column tiles of at most kOuterMaxTileVecs vectors.
  const int64_t vecs = outer_div_up(C, vec);
  p.col_tiles = vecs > 0 ? outer_div_up(vecs, kOuterMaxTileVecs) : 1;  // C == 0: one empty tile, no division by 0
  p.tile_cols = outer_div_up(vecs, p.col_tiles) * vec;
  if (p.tile_cols > C) p.tile_cols = C;
  p.col_tiles = C > 0 ? outer_div_up(C, p.tile_cols) : 1;  // no empty last tile
  // Rows per block: enough blocks to fill every SM several times over, each block at
  // most kOuterMaxBlockRows rows and within the shared-memory budget.
  const int64_t wanted_blocks = static_cast<int64_t>(num_sms) * kOuterBlocksPerSm;
  int64_t rows_per_block = outer_div_up(p.rows * p.col_tiles, wanted_blocks);
  if (rows_per_block > kOuterMaxBlockRows) rows_per_block = kOuterMaxBlockRows;
  if (rows_per_block < 1) rows_per_block = 1;
  p.block_rows = rows_per_block;
  p.max_samples = outer_samples_spanned(p.block_rows, R);
  while (p.block_rows > 1 && outer_smem_bytes(p, acc_size) > kOuterSmemBudget) {
    p.block_rows = p.block_rows / 2;
    p.max_samples = outer_samples_spanned(p.block_rows, R);
  }
  p.row_blocks = p.rows > 0 ? outer_div_up(p.rows, p.block_rows) : 0;
  p.streaming = p.rows * C * elem_size > 4 * l2_bytes;
  return p;
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) OuterVec {
  T val[kVec];
};

// One 16- or 8-byte store; evict-first (st.global.cs) when the output is far larger than L2,
// so it does not push the inputs out of the cache.
template <bool kStream, typename V>
__device__ __forceinline__ void outer_store(V* dst, const V& v) {
  static_assert(sizeof(V) == 16 || sizeof(V) == 8, "16- or 8-byte stores");
  if constexpr (kStream && sizeof(V) == 16) {
    __stcs(reinterpret_cast<uint4*>(dst), *reinterpret_cast<const uint4*>(&v));
  } else if constexpr (kStream) {
    __stcs(reinterpret_cast<uint2*>(dst), *reinterpret_cast<const uint2*>(&v));
  } else {
    *dst = v;
  }
}

// The block's share of the work, and where its staged values live.
template <typename acc_t>
struct OuterBlock {
  int64_t q0;             // first row (of N * R)
  int nrows;              // rows in this block
  int64_t c0;             // first column of the tile
  int ncols;              // columns in the tile
  int64_t n0;             // the sample of row q0
  const acc_t* row_vals;  // [nrows]
  const int* row_sample;  // [nrows]: sample of each row, minus n0
  const acc_t* col_vals;  // [samples][tile_cols]
};

// dst[e] for e in [0, len): element e is at local row first_row + e / width, column
// e % width of the tile. Scalar stores up to the first 16-byte boundary and after the
// last; 16-byte stores in between. Indices advance incrementally (one division per thread).
template <typename T, typename acc_t>
__device__ void outer_write_run(T* dst, int len, int width, int first_row, const OuterBlock<acc_t>& b,
                                int64_t tile_cols) {
  constexpr int kVec = 16 / sizeof(T);
  auto value = [&](int r, int c) {
    return static_cast<T>(b.row_vals[r] * b.col_vals[b.row_sample[r] * tile_cols + c]);
  };
  const int misalign = static_cast<int>((reinterpret_cast<uintptr_t>(dst) % 16) / sizeof(T));
  const int head = min(len, (kVec - misalign) % kVec);
  const int nvec = (len - head) / kVec;
  const int tail = head + nvec * kVec;
  for (int e = threadIdx.x; e < head; e += blockDim.x) dst[e] = value(first_row + e / width, e % width);
  for (int e = tail + threadIdx.x; e < len; e += blockDim.x) dst[e] = value(first_row + e / width, e % width);

  auto* vdst = reinterpret_cast<OuterVec<T, kVec>*>(dst + head);
  const int step = blockDim.x * kVec;
  const int step_rows = step / width, step_cols = step % width;
  int v = threadIdx.x;
  const int e0 = head + v * kVec;
  int r = first_row + e0 / width, c = e0 % width;
  for (; v < nvec; v += blockDim.x) {
    OuterVec<T, kVec> out;
    int rr = r, cc = c;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      out.val[k] = value(rr, cc);
      if (++cc == width) cc = 0, ++rr;
    }
    vdst[v] = out;
    r += step_rows;
    c += step_cols;
    if (c >= width) c -= width, ++r;
  }
}

// Resident blocks per SM the compiler must allow (registers <= 65536 / (256 * blocks)),
// the most that compile without spills (nvcc 13.0, sm_90): full occupancy (32 registers)
// for the fast path computing in float32; fewer for the run path and float64.
constexpr int outer_min_blocks(size_t acc_size, bool fast) {
  return acc_size == 4 ? (fast ? kOuterBlocksPerSm : 6) : (fast ? 6 : 5);
}

// pre == nullptr: G is `up` as given (the outer op). bias_out == nullptr: no grad_bias.
// x is [N, D_in], up/pre/bias_out [N, D_out], all contiguous; out is [N, R, C].
// kStoreBytes: the fast path's store width (p.store_bytes), 0 for the run path.
template <typename T, typename acc_t, int kStoreBytes, bool kStream>
__global__ void __launch_bounds__(kOuterThreads, outer_min_blocks(sizeof(acc_t), kStoreBytes > 0))
    outer_kernel(const T* __restrict__ x, const T* __restrict__ up, const T* __restrict__ pre, T* __restrict__ out,
                 T* __restrict__ bias_out, OuterPlan p, ActParams act) {
  INDIVGRAD_DYNAMIC_SMEM(smem);
  const int64_t ct = blockIdx.x % p.col_tiles;
  const int64_t rb = blockIdx.x / p.col_tiles;

  OuterBlock<acc_t> b;
  b.q0 = rb * p.block_rows;
  b.nrows = static_cast<int>(min(p.block_rows, p.rows - b.q0));
  b.c0 = ct * p.tile_cols;
  b.ncols = static_cast<int>(min(p.tile_cols, p.C - b.c0));
  b.n0 = b.q0 / p.R;
  const int samples = static_cast<int>((b.q0 + b.nrows - 1) / p.R - b.n0 + 1);
  acc_t* row_vals = reinterpret_cast<acc_t*>(smem);
  int* row_sample = reinterpret_cast<int*>(row_vals + b.nrows);
  acc_t* col_vals = reinterpret_cast<acc_t*>(smem + outer_div_up(p.block_rows * (sizeof(acc_t) + 4), 16) * 16);
  b.row_vals = row_vals;
  b.row_sample = row_sample;
  b.col_vals = col_vals;

  // G at flat index i of [N, D_out]; written to grad_bias when this block owns that element.
  auto g_at = [&](int64_t i, bool write_bias) {
    const acc_t u = static_cast<acc_t>(up[i]);
    const acc_t g = pre ? activation_backward<acc_t>(act, u, static_cast<acc_t>(pre[i])) : u;
    if (write_bias) bias_out[i] = static_cast<T>(g);
    return g;
  };
  // Rows: flat index q of [N, R] is both x's and G's index (R is D_in or D_out).
  // R < 2^31 (checked on the host), so row offsets within the block fit 32-bit unsigned math.
  const uint32_t r_first = static_cast<uint32_t>(b.q0 - b.n0 * p.R), R32 = static_cast<uint32_t>(p.R);
  for (int i = threadIdx.x; i < b.nrows; i += blockDim.x) {
    const int64_t q = b.q0 + i;
    row_vals[i] = p.g_on_rows ? g_at(q, bias_out != nullptr && ct == 0) : static_cast<acc_t>(x[q]);
    row_sample[i] = static_cast<int>((r_first + static_cast<uint32_t>(i)) / R32);
  }
  // Columns of each sample touched; the block holding a sample's row 0 writes its grad_bias.
  for (int s = 0; s < samples; ++s) {
    const int64_t n = b.n0 + s;
    const int64_t base = n * p.C + b.c0;
    // Sample n's row 0 is in this block iff it is not before q0 (n starts before the block ends).
    const bool owns_bias = bias_out != nullptr && n * p.R >= b.q0;
    for (int j = threadIdx.x; j < b.ncols; j += blockDim.x)
      col_vals[s * p.tile_cols + j] = p.g_on_rows ? static_cast<acc_t>(x[base + j]) : g_at(base + j, owns_bias);
  }
  __syncthreads();

  T* region = out + b.q0 * p.C + b.c0;
  if constexpr (kStoreBytes > 0) {
    // Pairs (row, vector) of the region, thread t taking pairs t, t + 256, ...
    constexpr int kVec = kStoreBytes / sizeof(T);
    constexpr int kAccVec = static_cast<int>(16 / sizeof(acc_t)) < kVec ? static_cast<int>(16 / sizeof(acc_t)) : kVec;
    using Vec = OuterVec<T, kVec>;
    using AccVec = OuterVec<acc_t, kAccVec>;
    const int vecs = b.ncols / kVec;  // ncols is a multiple of kVec here
    const int step_rows = blockDim.x / vecs, step_vecs = blockDim.x % vecs;
    int r = threadIdx.x / vecs, v = threadIdx.x % vecs;
    T* row_ptr = region + r * p.C;
    const int64_t row_step = step_rows * p.C;
    for (; r < b.nrows; r += step_rows) {
      const acc_t rv = row_vals[r];
      // Shared loads of up to 16 bytes, consecutive between threads: conflict-free for one load
      // per store; two (2-byte types, 16-byte stores) are 32 bytes apart, a 2-way conflict
      // that ncu measured on the H200 (bench/NOTES.md has the candidate fixes).
      const auto* cv = reinterpret_cast<const AccVec*>(col_vals + row_sample[r] * p.tile_cols + v * kVec);
      AccVec cols[kVec / kAccVec];
#pragma unroll
      for (int j = 0; j < kVec / kAccVec; ++j) cols[j] = cv[j];
      Vec o;
#pragma unroll
      for (int k = 0; k < kVec; ++k) o.val[k] = static_cast<T>(rv * cols[k / kAccVec].val[k % kAccVec]);
      outer_store<kStream>(reinterpret_cast<Vec*>(row_ptr + v * kVec), o);
      row_ptr += row_step;
      v += step_vecs;
      if (v >= vecs) v -= vecs, ++r, row_ptr += p.C;
    }
  } else if (b.ncols == p.C) {
    outer_write_run<T, acc_t>(region, b.nrows * b.ncols, b.ncols, 0, b, p.tile_cols);  // whole rows: one run
  } else {
    for (int r = 0; r < b.nrows; ++r) outer_write_run<T, acc_t>(region + r * p.C, b.ncols, b.ncols, r, b, p.tile_cols);
  }
}

}  // namespace indivgrad
