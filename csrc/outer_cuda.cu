// CUDA implementation: one kernel computes G = upstream * act'(pre) (or takes g as is),
// writes grad_bias, and writes every element of the per-sample outer products exactly
// once, with 16-byte stores. The output is the whole cost, so the kernel is shaped
// around writing it: each block owns a tile of one sample's [R, C] matrix, stages the
// tile's R- and C-vectors in shared memory (in the compute type), then streams the tile.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "activation.h"
#include "activation_backward.cuh"
#include "checks.h"
#include "functional.h"

namespace indivgrad {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxTileRows = 2048;   // shared memory: rows + cols values in the compute type
constexpr int64_t kMaxTileCols = 2048;   // <= 32 KiB in float64
constexpr int64_t kTileElems = 32768;    // output elements per block when rows are short

// out is [N, R, C]. In layout out_in the rows index D_out (G) and the columns D_in (x);
// in layout in_out the reverse.
struct Tiling {
  int64_t N, R, C;
  int64_t tile_rows, tile_cols, row_tiles, col_tiles;
  bool g_on_rows;
};

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) VecStore {
  T val[kVec];
};

// dst[e] = rows[e / width] * cols[e % width] for e in [0, len): a contiguous run of the
// output (a whole-width row tile, or one row's column tile). Scalar stores up to the
// first 16-byte boundary and after the last; 16-byte vector stores in between.
template <typename T, typename acc_t>
__device__ void write_run(T* dst, int len, int width, const acc_t* rows, const acc_t* cols) {
  constexpr int kVec = 16 / sizeof(T);
  const int misalign = static_cast<int>((reinterpret_cast<uintptr_t>(dst) % 16) / sizeof(T));
  const int head = min(len, (kVec - misalign) % kVec);
  for (int e = threadIdx.x; e < head; e += blockDim.x) dst[e] = static_cast<T>(rows[e / width] * cols[e % width]);
  const int nvec = (len - head) / kVec;
  auto* vdst = reinterpret_cast<VecStore<T, kVec>*>(dst + head);
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int e = head + v * kVec;
    int r = e / width, c = e % width;
    VecStore<T, kVec> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      out.val[k] = static_cast<T>(rows[r] * cols[c]);
      if (++c == width) c = 0, ++r;
    }
    vdst[v] = out;
  }
  for (int e = head + nvec * kVec + threadIdx.x; e < len; e += blockDim.x)
    dst[e] = static_cast<T>(rows[e / width] * cols[e % width]);
}

// pre == nullptr: G is `up` itself (the outer op). bias_out == nullptr: no grad_bias.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    act_outer_kernel(const T* __restrict__ x, const T* __restrict__ up, const T* __restrict__ pre,
                     T* __restrict__ out, T* __restrict__ bias_out, Tiling t, ActParams act) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* row_vals = reinterpret_cast<acc_t*>(smem);
  acc_t* col_vals = row_vals + t.tile_rows;

  int64_t block = blockIdx.x;
  const int64_t ct = block % t.col_tiles;
  block /= t.col_tiles;
  const int64_t rt = block % t.row_tiles;
  const int64_t n = block / t.row_tiles;
  const int64_t r0 = rt * t.tile_rows, c0 = ct * t.tile_cols;
  const int nr = static_cast<int>(min(t.tile_rows, t.R - r0));
  const int nc = static_cast<int>(min(t.tile_cols, t.C - c0));
  const int64_t d_out = t.g_on_rows ? t.R : t.C, d_in = t.g_on_rows ? t.C : t.R;

  // Stage G for this tile; the tiles at the first position along x's axis also write
  // grad_bias, so each of its elements is written once.
  auto stage_g = [&](acc_t* dst, int64_t start, int count, bool write_bias) {
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const int64_t idx = n * d_out + start + i;
      const acc_t u = static_cast<acc_t>(up[idx]);
      const acc_t g = pre ? activation_backward<acc_t>(act, u, static_cast<acc_t>(pre[idx])) : u;
      dst[i] = g;
      if (write_bias) bias_out[idx] = static_cast<T>(g);
    }
  };
  auto stage_x = [&](acc_t* dst, int64_t start, int count) {
    for (int i = threadIdx.x; i < count; i += blockDim.x) dst[i] = static_cast<acc_t>(x[n * d_in + start + i]);
  };
  if (t.g_on_rows) {
    stage_g(row_vals, r0, nr, bias_out != nullptr && ct == 0);
    stage_x(col_vals, c0, nc);
  } else {
    stage_x(row_vals, r0, nr);
    stage_g(col_vals, c0, nc, bias_out != nullptr && rt == 0);
  }
  __syncthreads();

  T* tile = out + (n * t.R + r0) * t.C + c0;
  if (nc == t.C) {
    write_run(tile, nr * nc, nc, row_vals, col_vals);  // whole-width rows are one contiguous run
  } else {
    for (int r = 0; r < nr; ++r) write_run(tile + r * t.C, nc, nc, row_vals + r, col_vals);
  }
}

Tiling make_tiling(int64_t N, int64_t R, int64_t C, bool g_on_rows) {
  Tiling t{N, R, C, 0, 0, 0, 0, g_on_rows};
  t.tile_cols = std::max<int64_t>(1, std::min(C, kMaxTileCols));
  t.tile_rows = std::max<int64_t>(1, std::min({R, kMaxTileRows, std::max<int64_t>(1, kTileElems / t.tile_cols)}));
  t.col_tiles = std::max<int64_t>(1, (C + t.tile_cols - 1) / t.tile_cols);
  t.row_tiles = std::max<int64_t>(1, (R + t.tile_rows - 1) / t.tile_rows);
  return t;
}

// g is G itself (pre undefined) or the upstream gradient (pre defined, then act applies).
void launch(const at::Tensor& x, const at::Tensor& g, const at::Tensor& pre, const ActParams& act, Layout layout,
            const at::Tensor& out, const at::Tensor& bias_out) {
  const int64_t N = x.size(0), d_in = x.size(1), d_out = g.size(1);
  if (N == 0) return;
  const bool g_on_rows = layout == Layout::OutIn;
  const Tiling t = g_on_rows ? make_tiling(N, d_out, d_in, true) : make_tiling(N, d_in, d_out, false);
  const int64_t blocks = N * t.row_tiles * t.col_tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "indivgrad_cuda: batch too large for one launch (",
              blocks, " blocks); split it into chunks");

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), gc = g.contiguous();
  const at::Tensor pc = pre.defined() ? pre.contiguous() : pre;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "indivgrad_act_outer", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = (t.tile_rows + t.tile_cols) * sizeof(acc_t);
    act_outer_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), pc.defined() ? pc.data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), bias_out.defined() ? bias_out.data_ptr<scalar_t>() : nullptr, t, act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void outer_out_cuda(const at::Tensor& x, const at::Tensor& g, c10::string_view layout, const at::Tensor& out) {
  const Layout lay = check_outer_out(x, g, layout, out);
  launch(x, g, at::Tensor(), ActParams{Activation::Identity, 0, 0, 0, 0}, lay, out, at::Tensor());
}

void act_outer_out_cuda(const at::Tensor& x, const at::Tensor& upstream, const at::Tensor& pre,
                        c10::string_view activation, c10::string_view layout, double negative_slope, double alpha,
                        double beta, double threshold, const at::Tensor& out, const at::Tensor& bias_out) {
  const ActOuterConfig cfg = check_act_outer_out(x, upstream, pre, activation, layout, negative_slope, alpha, beta,
                                                 threshold, out, bias_out);
  launch(x, upstream, pre, cfg.act, cfg.layout, out, bias_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(indivgrad_cuda, CUDA, m) {
  m.impl("outer", &outer_functional<outer_out_cuda>);
  m.impl("outer_out", &outer_out_cuda);
  m.impl("act_outer", &act_outer_functional<act_outer_out_cuda>);
  m.impl("act_outer_out", &act_outer_out_cuda);
}

}  // namespace indivgrad
