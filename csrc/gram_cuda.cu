// CUDA implementation of indivgrad_cuda::linear_gram: 2-D factors (one position per
// sample) run the fused kernel (gram_kernel.cuh); sequences take the ATen path (gram.cpp).
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

TORCH_LIBRARY_IMPL(indivgrad_cuda, CUDA, m) { m.impl("linear_gram", &linear_gram_cuda); }

}  // namespace indivgrad
