// CPU implementation: ATen ops writing straight into the output buffer. The activation
// derivative uses torch's own backward functions (activation_aten.cpp), so its
// conventions are torch's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "activation.h"
#include "activation_aten.h"
#include "checks.h"
#include "functional.h"

namespace indivgrad {
namespace {

// A broadcast multiply writes each element once; it measured 2-3x faster than
// torch.bmm([N, D_in, 1], [N, 1, D_out]) on CPU (bench/kernels.py).
void write_outer(const at::Tensor& x, const at::Tensor& g, Layout layout, const at::Tensor& out) {
  at::Tensor dst = out;
  if (layout == Layout::InOut) {
    at::mul_out(dst, x.unsqueeze(2), g.unsqueeze(1));
  } else {
    at::mul_out(dst, g.unsqueeze(2), x.unsqueeze(1));
  }
}

// write_outer from float32 x and g into a float16/bfloat16 `out`. ATen's mixed-dtype
// multiply is 5-10x slower than a float32 multiply plus a conversion copy (bench/kernels.py),
// so the products go through a float32 scratch of about 256 KiB, block by block: several
// whole samples at a time, or row blocks of one sample when a sample is larger.
void write_outer_rounded(const at::Tensor& x, const at::Tensor& g, Layout layout, const at::Tensor& out) {
  const int64_t n = out.size(0), rows = out.size(1), cols = out.size(2);
  if (out.numel() == 0) return;
  constexpr int64_t kScratchElems = 1 << 16;
  const int64_t samples = std::max<int64_t>(1, kScratchElems / (rows * cols));
  const int64_t row_block = samples > 1 ? rows : std::max<int64_t>(1, kScratchElems / cols);
  at::Tensor scratch = at::empty({samples, row_block, cols}, x.options());
  for (int64_t n0 = 0; n0 < n; n0 += samples) {
    const int64_t ns = std::min(samples, n - n0);
    for (int64_t r0 = 0; r0 < rows; r0 += row_block) {
      const int64_t nr = std::min(row_block, rows - r0);
      const at::Tensor xs = x.narrow(0, n0, ns), gs = g.narrow(0, n0, ns);
      // rows index x in layout in_out, g in out_in
      const at::Tensor xr = layout == Layout::InOut ? xs.narrow(1, r0, nr) : xs;
      const at::Tensor gr = layout == Layout::OutIn ? gs.narrow(1, r0, nr) : gs;
      at::Tensor block = scratch.narrow(0, 0, ns).narrow(1, 0, nr);
      write_outer(xr, gr, layout, block);
      out.narrow(0, n0, ns).narrow(1, r0, nr).copy_(block);
    }
  }
}

void outer_out_cpu(const at::Tensor& x, const at::Tensor& g, c10::string_view layout, const at::Tensor& out) {
  write_outer(x, g, check_outer_out(x, g, layout, out), out);
}

void act_outer_out_cpu(const at::Tensor& x, const at::Tensor& upstream, const at::Tensor& pre,
                       c10::string_view activation, c10::string_view layout, double negative_slope, double alpha,
                       double beta, double threshold, const at::Tensor& out, const at::Tensor& bias_out) {
  const ActOuterConfig cfg =
      check_act_outer_out(x, upstream, pre, activation, layout, negative_slope, alpha, beta, threshold, out, bias_out);
  const at::Tensor g = activation_backward(cfg.act, compute_dtype(upstream), compute_dtype(pre));
  at::Tensor(bias_out).copy_(g);
  if (g.scalar_type() == out.scalar_type()) {
    write_outer(x, g, cfg.layout, out);
  } else {
    write_outer_rounded(compute_dtype(x), g, cfg.layout, out);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(indivgrad_cuda, CPU, m) {
  m.impl("outer", &outer_functional<outer_out_cpu>);
  m.impl("outer_out", &outer_out_cpu);
  m.impl("act_outer", &act_outer_functional<act_outer_out_cpu>);
  m.impl("act_outer_out", &act_outer_out_cpu);
}

}  // namespace indivgrad
