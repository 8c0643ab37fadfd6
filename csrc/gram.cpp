// indivgrad_cuda::linear_gram and embedding_gram. linear_gram: K[n, m] = sum_{t,s} (xa[n,t]·xb[m,s] +
// bias)(ga[n,t]·gb[m,s]), the inner products between sample n of one set's and sample m of another's per-sample
// gradients of a Linear layer (bias = 1 adds the bias's, whose gradient is sum_t g_t), from
// the factors alone. ATen implementation for any device, registered for
// CompositeExplicitAutograd; gram_cuda.cu overrides the 2-D case with a fused kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "blocks.h"
#include "checks.h"
#include "gram.h"
#include "layer_ops.h"

namespace indivgrad {

namespace {

void check_side(const at::Tensor& x, const at::Tensor& g, const char* xn, const char* gn, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, xn, ": expected [N, D_in] or [N, T, D_in], got shape ", x.sizes());
  TORCH_CHECK_VALUE(g.dim() == x.dim() && g.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1), gn,
                    ": expected leading dims ", x.sizes().slice(0, x.dim() - 1), " (", xn,
                    "'s) and a width, got shape ", g.sizes());
  for (const auto& [t, name] : {std::pair{&x, xn}, std::pair{&g, gn}}) {
    check_float_dtype(*t, name);
    TORCH_CHECK_TYPE(t->scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
                     " (xa's), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == ref.device(), name, ": expected device ", ref.device(), " (xa's), got ",
                      t->device());
  }
}

at::Tensor as_seq(const at::Tensor& t) { return t.dim() == 2 ? t.unsqueeze(1) : t; }

}  // namespace

GramFactors check_gram_factors(const at::Tensor& xa, const at::Tensor& ga, const at::Tensor& xb, const at::Tensor& gb,
                               double bias) {
  check_side(xa, ga, "xa", "ga", xa);
  check_side(xb, gb, "xb", "gb", xa);
  TORCH_CHECK_VALUE(xb.size(-1) == xa.size(-1) && gb.size(-1) == ga.size(-1),
                    "xb, gb: expected widths D_in=", xa.size(-1), " and D_out=", ga.size(-1), " (xa's and ga's), got ",
                    xb.size(-1), " and ", gb.size(-1));
  TORCH_CHECK_VALUE(bias == 0.0 || bias == 1.0,
                    "bias: expected 0 (the weight's inner products) or 1 (weight and bias), got ", bias);
  return {as_seq(xa), as_seq(ga), as_seq(xb), as_seq(gb)};
}

bool linear_gram_uses_ghost(int64_t t_a, int64_t t_b, int64_t n_a, int64_t n_b, int64_t d_in, int64_t d_out,
                            c10::string_view method) {
  if (const auto forced = forced_ghost(method)) return *forced;
  if (t_a == 1 && t_b == 1) return true;  // one position: the Grams are the gradients' factors
  // Work in multiply-adds for the n_a x n_b pairs, each element written and read back
  // counting kElementCost (layer_ops.h).
  const double c = kElementCost, dd = static_cast<double>(d_in) * d_out;
  const double pairs = static_cast<double>(n_a) * n_b;
  const double ghost = pairs * t_a * t_b * (d_in + d_out + 2 * c);
  const double direct = pairs * dd + (n_a * (t_a + c) + n_b * (t_b + c)) * dd;
  return ghost <= direct;
}

at::Tensor linear_gram_aten(const at::Tensor& xa_in, const at::Tensor& ga_in, const at::Tensor& xb_in,
                            const at::Tensor& gb_in, double bias, c10::string_view method) {
  const auto [xa, ga, xb, gb] = check_gram_factors(xa_in, ga_in, xb_in, gb_in, bias);
  const int64_t na = xa.size(0), nb = xb.size(0), ta = xa.size(1), tb = xb.size(1);
  const int64_t d_in = xa.size(2), d_out = ga.size(2);
  const auto acc = acc_type(xa.scalar_type());
  const int64_t elem = c10::elementSize(acc);
  at::Tensor out = at::zeros({na, nb}, xa.options().dtype(acc));
  if (na == 0 || nb == 0) return out;
  if (linear_gram_uses_ghost(ta, tb, na, nb, d_in, d_out, method)) {
    // Blocks of b's samples, then of a's: two [na·ta, nb·tb] Grams per pair of blocks.
    const int64_t bb = block_size(nb, 2 * ta * tb, elem);
    for_blocks(nb, bb, [&](int64_t m0, int64_t mb) {
      const at::Tensor xr = xb.narrow(0, m0, mb).reshape({mb * tb, d_in}).to(acc);
      const at::Tensor gr = gb.narrow(0, m0, mb).reshape({mb * tb, d_out}).to(acc);
      for_blocks(na, block_size(na, 2 * ta * tb * mb, elem), [&](int64_t n0, int64_t nblk) {
        const at::Tensor xx = at::mm(xa.narrow(0, n0, nblk).reshape({nblk * ta, d_in}).to(acc), xr.t());
        const at::Tensor gg = at::mm(ga.narrow(0, n0, nblk).reshape({nblk * ta, d_out}).to(acc), gr.t());
        if (bias != 0.0) xx.add_(bias);
        const at::Tensor k = xx.mul_(gg);
        out.narrow(0, n0, nblk).narrow(1, m0, mb).copy_(ta * tb == 1 ? k : k.view({nblk, ta, mb, tb}).sum({1, 3}));
      });
    });
    return out;
  }
  // Direct: the per-sample gradients [D_out, D_in] (and sum_t g_t) of a block of each side.
  auto grads = [&](const at::Tensor& x, const at::Tensor& g, int64_t n0, int64_t n) {
    const at::Tensor gs = g.narrow(0, n0, n).to(acc);
    at::Tensor w = at::bmm(gs.transpose(1, 2), x.narrow(0, n0, n).to(acc)).reshape({n, d_out * d_in});
    return bias != 0.0 ? at::cat({w, gs.sum(1)}, 1) : w;
  };
  const int64_t width = d_out * d_in + (bias != 0.0 ? d_out : 0);
  const int64_t blk = block_size(std::max(na, nb), width, elem);
  for_blocks(nb, blk, [&](int64_t m0, int64_t mb) {
    const at::Tensor wb = grads(xb, gb, m0, mb);
    for_blocks(na, blk, [&](int64_t n0, int64_t nblk) {
      at::Tensor dst = out.narrow(0, n0, nblk).narrow(1, m0, mb);
      at::mm_out(dst, grads(xa, ga, n0, nblk), wb.t());
    });
  });
  return out;
}

namespace {

// ids [N, T] int64/int32 and g [N, T, D] of one side, like the other side's.
void check_embedding_side(const at::Tensor& ids, const at::Tensor& g, const char* in, const char* gn,
                          const at::Tensor& ref_g) {
  TORCH_CHECK_VALUE(ids.dim() == 2, in, ": expected a 2-D tensor [N, T], got shape ", ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, in,
                   ": expected dtype int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(g.dim() == 3 && g.size(0) == ids.size(0) && g.size(1) == ids.size(1) && g.size(2) == ref_g.size(2),
                    gn, ": expected [", ids.size(0), ", ", ids.size(1), ", ", ref_g.size(2), "] (", in,
                    "'s [N, T] and the embedding width), got shape ", g.sizes());
  check_float_dtype(g, gn);
  TORCH_CHECK_TYPE(g.scalar_type() == ref_g.scalar_type(), gn, ": expected dtype ", ref_g.scalar_type(),
                   " (ga's), got ", g.scalar_type());
  TORCH_CHECK_VALUE(g.device() == ref_g.device() && ids.device() == ref_g.device(), in, ", ", gn, ": expected device ",
                    ref_g.device(), " (ga's), got ", ids.device(), " and ", g.device());
}

// K[n, m] = sum over token pairs (t, s) with ids_a[n,t] == ids_b[m,s] != padding_idx of
// ga[n,t]·gb[m,s]: inner products of two sets' per-sample Embedding gradients, from
// [na·ta, nb·tb] Grams of blocks of samples.
at::Tensor embedding_gram(const at::Tensor& ids_a, const at::Tensor& ga, const at::Tensor& ids_b, const at::Tensor& gb,
                          std::optional<int64_t> padding_idx) {
  TORCH_CHECK_VALUE(ga.dim() == 3, "ga: expected a 3-D tensor [N, T, D], got shape ", ga.sizes());
  check_embedding_side(ids_a, ga, "ids_a", "ga", ga);
  check_embedding_side(ids_b, gb, "ids_b", "gb", ga);
  const int64_t na = ids_a.size(0), nb = ids_b.size(0), ta = ids_a.size(1), tb = ids_b.size(1), d = ga.size(2);
  const auto acc = acc_type(ga.scalar_type());
  const int64_t elem = c10::elementSize(acc);
  at::Tensor out = at::zeros({na, nb}, ga.options().dtype(acc));
  if (na == 0 || nb == 0 || ta == 0 || tb == 0) return out;
  // Padding tokens get an id no token has, so they pair with nothing (NaN or not).
  auto ids_of = [&](const at::Tensor& ids) {
    const at::Tensor i = ids.to(at::kLong);
    return padding_idx ? at::where(i.eq(*padding_idx), at::full({}, -1, i.options()), i) : i;
  };
  const at::Tensor ia = ids_of(ids_a), ib = ids_of(ids_b);
  const at::Tensor padding_b = ib.eq(-1);
  for_blocks(nb, block_size(nb, 2 * ta * tb, elem), [&](int64_t m0, int64_t mb) {
    const at::Tensor gr = gb.narrow(0, m0, mb).reshape({mb * tb, d}).to(acc);
    const at::Tensor ir = ib.narrow(0, m0, mb).reshape({1, mb * tb});
    const at::Tensor pr = padding_b.narrow(0, m0, mb).reshape({1, mb * tb});
    for_blocks(na, block_size(na, 2 * ta * tb * mb, elem), [&](int64_t n0, int64_t nblk) {
      const at::Tensor gg = at::mm(ga.narrow(0, n0, nblk).reshape({nblk * ta, d}).to(acc), gr.t());
      const at::Tensor same = ia.narrow(0, n0, nblk).reshape({nblk * ta, 1}).eq(ir).logical_and_(pr.logical_not());
      const at::Tensor k = at::where(same, gg, at::zeros({}, gg.options()));
      out.narrow(0, n0, nblk).narrow(1, m0, mb).copy_(k.view({nblk, ta, mb, tb}).sum({1, 3}));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(indivgrad_cuda, CompositeExplicitAutograd, m) {
  m.impl("linear_gram", &linear_gram_aten);
  m.impl("embedding_gram", &embedding_gram);
}

}  // namespace indivgrad
