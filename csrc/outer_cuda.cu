// CUDA implementation: validation and launch of the outer-product kernel
// (outer_kernel.cuh, where the kernel and its launch shape are explained).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <mutex>

#include "activation.h"
#include "activation_aten.h"
#include "checks.h"
#include "functional.h"
#include "outer_kernel.cuh"

namespace indivgrad {
namespace {

struct DeviceFacts {
  int num_sms;
  int64_t l2_bytes;
};

// Read once per device: attribute queries cost microseconds, a launch should not.
DeviceFacts device_facts(int device) {
  constexpr int kMaxDevices = 64;
  static std::array<DeviceFacts, kMaxDevices> facts{};
  static std::array<std::once_flag, kMaxDevices> once;
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "indivgrad_cuda: device index ", device, " out of range");
  std::call_once(once[device], [&] {
    int sms = 0, l2 = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    facts[device] = {sms, l2};
  });
  return facts[device];
}

template <typename T, int kStoreBytes, bool kStream>
void launch_kernel(const OuterPlan& p, size_t smem, cudaStream_t stream, const at::Tensor& x, const at::Tensor& g,
                   const at::Tensor& pre, const at::Tensor& out, const at::Tensor& bias_out, const ActParams& act) {
  using acc_t = at::opmath_type<T>;
  outer_kernel<T, acc_t, kStoreBytes, kStream><<<static_cast<unsigned>(p.blocks()), kOuterThreads, smem, stream>>>(
      x.data_ptr<T>(), g.data_ptr<T>(), pre.defined() ? pre.data_ptr<T>() : nullptr, out.data_ptr<T>(),
      bias_out.defined() ? bias_out.data_ptr<T>() : nullptr, p, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fast path (kStoreBytes 16 or 8) with plain or streaming stores; the run path (0).
template <typename T, int kStoreBytes>
void launch_path(const OuterPlan& p, size_t smem, cudaStream_t stream, const at::Tensor& x, const at::Tensor& g,
                 const at::Tensor& pre, const at::Tensor& out, const at::Tensor& bias_out, const ActParams& act) {
  if constexpr (kStoreBytes > 0) {
    if (p.streaming) return launch_kernel<T, kStoreBytes, true>(p, smem, stream, x, g, pre, out, bias_out, act);
  }
  launch_kernel<T, kStoreBytes, false>(p, smem, stream, x, g, pre, out, bias_out, act);
}

// g is G itself (pre undefined) or the upstream gradient (pre defined, then act applies).
void launch(const at::Tensor& x, const at::Tensor& g, const at::Tensor& pre, const ActParams& act, Layout layout,
            const at::Tensor& out, const at::Tensor& bias_out) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (out.numel() == 0) {  // D_in == 0 or D_out == 0 or N == 0: at most grad_bias to write
    if (bias_out.defined() && bias_out.numel() > 0)
      at::Tensor(bias_out).copy_(pre.defined() ? activation_backward(act, compute_dtype(g), compute_dtype(pre)) : g);
    return;
  }
  const int64_t N = x.size(0), d_in = x.size(1), d_out = g.size(1);
  // The kernel indexes within a row and a sample's rows in 32-bit arithmetic.
  TORCH_CHECK(d_in <= std::numeric_limits<int32_t>::max() && d_out <= std::numeric_limits<int32_t>::max(),
              "indivgrad_cuda: D_in and D_out must be below 2^31 on CUDA; got D_in=", d_in, ", D_out=", d_out);
  const bool g_on_rows = layout == Layout::OutIn;
  const at::Tensor xc = x.contiguous(), gc = g.contiguous();
  const at::Tensor pc = pre.defined() ? pre.contiguous() : pre;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DeviceFacts dev = device_facts(x.get_device());
  const auto out_address = reinterpret_cast<uintptr_t>(out.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "indivgrad_outer", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const OuterPlan p = make_outer_plan(N, g_on_rows ? d_out : d_in, g_on_rows ? d_in : d_out, g_on_rows,
                                        sizeof(scalar_t), sizeof(acc_t), out_address, dev.num_sms, dev.l2_bytes);
    TORCH_CHECK(p.blocks() <= std::numeric_limits<int32_t>::max(), "indivgrad_cuda: output too large for one launch (",
                p.blocks(), " blocks); split the batch into chunks");
    const size_t smem = static_cast<size_t>(outer_smem_bytes(p, sizeof(acc_t)));
    if (p.store_bytes == 16) {
      launch_path<scalar_t, 16>(p, smem, stream, xc, gc, pc, out, bias_out, act);
    } else if (p.store_bytes == 8) {
      if constexpr (sizeof(scalar_t) == 2)  // the plan picks 8-byte stores for 2-byte types only
        launch_path<scalar_t, 8>(p, smem, stream, xc, gc, pc, out, bias_out, act);
    } else {
      launch_path<scalar_t, 0>(p, smem, stream, xc, gc, pc, out, bias_out, act);
    }
  });
}

void outer_out_cuda(const at::Tensor& x, const at::Tensor& g, c10::string_view layout, const at::Tensor& out) {
  const Layout lay = check_outer_out(x, g, layout, out);
  launch(x, g, at::Tensor(), ActParams{Activation::Identity, 0, 0, 0, 0}, lay, out, at::Tensor());
}

void act_outer_out_cuda(const at::Tensor& x, const at::Tensor& upstream, const at::Tensor& pre,
                        c10::string_view activation, c10::string_view layout, double negative_slope, double alpha,
                        double beta, double threshold, const at::Tensor& out, const at::Tensor& bias_out) {
  const ActOuterConfig cfg =
      check_act_outer_out(x, upstream, pre, activation, layout, negative_slope, alpha, beta, threshold, out, bias_out);
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
