// CUDA implementation of indivgrad_cuda::linear_gram: 2-D factors (one position per
// sample) run the fused kernel (gram_kernel.cuh); sequences take the ATen path (gram.cpp).
// And the ghost squared norms of a Linear layer over sequences (linear_ghost_sq_norms_cuda,
// called by layer_ops.cpp): the per-sample form of the same kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <limits>

#include "blocks.h"
#include "gram.h"
#include "gram_kernel.cuh"

namespace indivgrad {
namespace {

at::Tensor linear_gram_cuda(const at::Tensor& xa_in, const at::Tensor& ga_in, const at::Tensor& xb_in,
                            const at::Tensor& gb_in, double bias, c10::string_view method) {
  const GramFactors f = check_gram_factors(xa_in, ga_in, xb_in, gb_in, bias);
  if (f.xa.size(1) != 1 || f.xb.size(1) != 1 || !linear_gram_uses_ghost(1, 1, 0, 0, 0, 0, method))
    return linear_gram_aten(xa_in, ga_in, xb_in, gb_in, bias, method);
  const at::Tensor xa = f.xa.select(1, 0).contiguous(), ga = f.ga.select(1, 0).contiguous();
  const at::Tensor xb = f.xb.select(1, 0).contiguous(), gb = f.gb.select(1, 0).contiguous();
  const int64_t na = xa.size(0), nb = xb.size(0);
  at::Tensor out = at::zeros({na, nb}, xa.options().dtype(acc_type(xa.scalar_type())));
  if (na == 0 || nb == 0) return out;
  const GramPlan p = make_gram_plan(na, nb, xa.size(1), ga.size(1), nb);
  TORCH_CHECK(p.blocks <= std::numeric_limits<int32_t>::max(), "linear_gram: ", na, " x ", nb,
              " outputs are too many for one launch; split the sets into blocks");
  const c10::cuda::CUDAGuard guard(xa.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xa.scalar_type(), "indivgrad_gram", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = static_cast<size_t>(gram_smem_bytes(sizeof(acc_t)));
    gram_kernel<scalar_t, acc_t><<<static_cast<unsigned>(p.blocks), kGramThreads, smem, stream>>>(
        xa.data_ptr<scalar_t>(), ga.data_ptr<scalar_t>(), xb.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(),
        out.data_ptr<acc_t>(), p, static_cast<acc_t>(bias));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

void linear_ghost_sq_norms_cuda(const at::Tensor& x_in, const at::Tensor& g_in, const at::Tensor& dst) {
  const int64_t n = x_in.size(0), t = x_in.size(1);
  if (n == 0) return;
  if (t == 0) {
    dst.zero_();
    return;
  }
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous();
  const GhostPlan p = make_ghost_plan(n, t, x.size(2), g.size(2));
  TORCH_CHECK(p.blocks <= std::numeric_limits<int32_t>::max(), "linear_sq_norms: ", n, " samples of ", t,
              " positions are too many for one launch; split the batch");
  at::Tensor partial = at::empty({n, p.pairs}, dst.options());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "indivgrad_ghost_sq_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = static_cast<size_t>(gram_smem_bytes(sizeof(acc_t)));
    ghost_sq_norm_kernel<scalar_t, acc_t><<<static_cast<unsigned>(p.blocks), kGramThreads, smem, stream>>>(
        x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (p.pairs == 1) {
    dst.copy_(partial.view({n}));
  } else {
    at::Tensor d = dst;
    at::sum_out(d, partial, {1});
  }
}

TORCH_LIBRARY_IMPL(indivgrad_cuda, CUDA, m) { m.impl("linear_gram", &linear_gram_cuda); }

}  // namespace indivgrad
