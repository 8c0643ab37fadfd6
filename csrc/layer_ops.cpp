// The per-layer numeric work of the layer rules for sequences, Embedding and LayerNorm:
// per-sample gradients and their squared norms from a layer's factors (its input and the
// gradient at its output). Device-generic ATen calls, registered once for
// CompositeExplicitAutograd (CPU and CUDA alike); fake implementations in
// indivgrad_cuda/_fake.py. Temporaries are bounded by processing blocks of samples; each
// sample's result is computed the same way in any block, so results do not depend on it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "blocks.h"
#include "checks.h"
#include "gram.h"
#include "layer_ops.h"

namespace indivgrad {
namespace {

using at::Tensor;

// x [N, T, D_in] and g [N, T, D_out] (a 2-D pair [N, D] counts as T = 1): same N, T,
// dtype and device. Returns the 3-D views.
std::pair<Tensor, Tensor> check_factors(const Tensor& x, const Tensor& g) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "x: expected [N, D_in] or [N, T, D_in], got shape ", x.sizes());
  TORCH_CHECK_VALUE(g.dim() == x.dim(), "g: expected ", x.dim(), " dims like x (",
                    (x.dim() == 2 ? "[N, D_out]" : "[N, T, D_out]"), "), got shape ", g.sizes());
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(g.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1), "g: expected leading dims ",
                    x.sizes().slice(0, x.dim() - 1), " (x's), got shape ", g.sizes());
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), "g: expected dtype ", x.scalar_type(), " (x's dtype), got ",
                   g.scalar_type());
  TORCH_CHECK_VALUE(g.device() == x.device(), "g: expected device ", x.device(), " (x's device), got ", g.device());
  if (x.dim() == 2) return {x.unsqueeze(1), g.unsqueeze(1)};
  return {x, g};
}

void outer_out_op(const Tensor& x, const Tensor& g, c10::string_view layout, const Tensor& out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("indivgrad_cuda::outer_out", "")
                       .typed<void(const Tensor&, const Tensor&, c10::string_view, const Tensor&)>();
  op.call(x, g, layout, out);
}

std::vector<int64_t> seq_outer_shape(const Tensor& x, const Tensor& g, Layout layout) {
  return layout == Layout::InOut ? std::vector<int64_t>{x.size(0), x.size(2), g.size(2)}
                                 : std::vector<int64_t>{x.size(0), g.size(2), x.size(2)};
}

void check_seq(const Tensor& x, const Tensor& g) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x: expected a 3-D tensor [N, T, D_in], got shape ", x.sizes());
  check_factors(x, g);
}

void seq_outer_out(const Tensor& x, const Tensor& g, c10::string_view layout, const Tensor& out) {
  check_seq(x, g);
  const Layout lay = parse_layout(layout);
  check_output(out, "out", seq_outer_shape(x, g, lay), x, {{"x", &x}, {"g", &g}});
  if (x.size(1) == 1) return outer_out_op(x.select(1, 0), g.select(1, 0), layout, out);  // the fused kernel
  Tensor dst = out;
  if (x.size(1) == 0) {
    dst.zero_();
  } else if (lay == Layout::InOut) {
    at::bmm_out(dst, x.transpose(1, 2), g);
  } else {
    at::bmm_out(dst, g.transpose(1, 2), x);
  }
}

Tensor seq_outer(const Tensor& x, const Tensor& g, c10::string_view layout) {
  check_seq(x, g);
  Tensor out = at::empty(seq_outer_shape(x, g, parse_layout(layout)), x.options());
  seq_outer_out(x, g, layout, out);
  return out;
}

// ---------------------------------------------------------------- Linear squared norms
// Each writes sample n's squared norm to dst[n] (dst: [N] of the accumulation dtype,
// contiguous, possibly a row of a bigger buffer); x [N, T, D_in], g [N, T, D_out] validated.

// Temporaries per step of the fused norms: on CPU the tiles of one step stay in a core's L2
// cache (1 MiB on the development machine), so no T x T Gram or [D_out, D_in] gradient of a
// sample ever goes to memory; on a GPU, blocks of kBlockBytes.
constexpr int64_t kCacheBytes = int64_t{512} << 10;

int64_t step_bytes(const Tensor& x) { return x.is_cpu() ? kCacheBytes : kBlockBytes; }

// Ghost: ||G_nᵀ X_n||² = <X_n X_nᵀ, G_n G_nᵀ> from b x b tiles of the symmetric T x T products,
// the tile pairs i <= j only (twice those off the diagonal): T²(D_in + D_out)/2 multiply-adds
// per sample, two [nb, b, b] tiles reused for every step (b = T while two T x T tiles fit).
void ghost_sq_norms_into(const Tensor& x, const Tensor& g, at::ScalarType acc, const Tensor& dst) {
  const int64_t n = x.size(0), t = x.size(1), elem = c10::elementSize(acc), budget = step_bytes(x);
  int64_t b = t;
  while (b > 16 && 2 * b * b * elem > budget) b = (b + 1) / 2;
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(n, budget / (2 * b * b * elem)));
  const int64_t tiles = (t + b - 1) / b;
  const Tensor kx = at::empty({nb * b * b}, x.options().dtype(acc)), kg = at::empty_like(kx);
  for_blocks(n, nb, [&](int64_t n0, int64_t m) {
    const Tensor xs = x.narrow(0, n0, m).to(acc), gs = g.narrow(0, n0, m).to(acc);
    Tensor out = dst.narrow(0, n0, m);
    if (tiles > 1) out.zero_();
    for (int64_t i0 = 0; i0 < t; i0 += b) {
      const int64_t bi = std::min(b, t - i0);
      const Tensor xi = xs.narrow(1, i0, bi), gi = gs.narrow(1, i0, bi);
      for (int64_t j0 = i0; j0 < t; j0 += b) {
        const int64_t bj = std::min(b, t - j0);
        Tensor px = kx.narrow(0, 0, m * bi * bj).view({m, bi, bj}), pg = kg.narrow(0, 0, m * bi * bj).view({m, bi, bj});
        at::bmm_out(px, xi, xs.narrow(1, j0, bj).transpose(1, 2));
        at::bmm_out(pg, gi, gs.narrow(1, j0, bj).transpose(1, 2));
        px.mul_(pg);  // in cache; sum is pairwise, so float32 stays accurate
        if (tiles == 1) {
          at::sum_out(out, px, {1, 2});
        } else {
          out.add_(px.sum({1, 2}), i0 == j0 ? 1 : 2);
        }
      }
    }
  });
}

// Direct: ||G_nᵀ X_n||² from slabs of rows of the [D_out, D_in] gradients of a block of
// samples, squared and summed while in cache: T·D_in·D_out multiply-adds per sample.
// From kLongT positions the GEMMs' shape matters more than their output's trip to memory
// (T multiply-adds per element written): steps of whole gradients of kLongStepBytes.
constexpr int64_t kLongT = 128;
constexpr int64_t kLongStepBytes = int64_t{8} << 20;

void direct_sq_norms_into(const Tensor& x, const Tensor& g, at::ScalarType acc, const Tensor& dst) {
  const int64_t n = x.size(0), d_in = x.size(2), d_out = g.size(2), elem = c10::elementSize(acc);
  const int64_t budget = x.is_cpu() && x.size(1) >= kLongT ? kLongStepBytes : step_bytes(x);
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(d_out, budget / (d_in * elem)));
  const int64_t nb = rows < d_out ? 1 : std::max<int64_t>(1, std::min<int64_t>(n, budget / (d_out * d_in * elem)));
  const Tensor w = at::empty({nb * rows * d_in}, x.options().dtype(acc));
  for_blocks(n, nb, [&](int64_t n0, int64_t m) {
    const Tensor xs = x.narrow(0, n0, m).to(acc), gt = g.narrow(0, n0, m).to(acc).transpose(1, 2);
    Tensor out = dst.narrow(0, n0, m);
    if (rows < d_out) out.zero_();
    for (int64_t r0 = 0; r0 < d_out; r0 += rows) {
      const int64_t r = std::min(rows, d_out - r0);
      Tensor slab = w.narrow(0, 0, m * r * d_in).view({m, r, d_in});
      at::bmm_out(slab, gt.narrow(1, r0, r), xs);
      slab.mul_(slab);
      if (rows == d_out) {
        at::sum_out(out, slab, {1, 2});
      } else {
        out.add_(slab.sum({1, 2}));
      }
    }
  });
}

// Work below which a call runs as plain loops on the CPU (about 10 µs): ATen's fixed cost
// per op (1-3 µs each, a dozen ops) would dominate it.
constexpr int64_t kSmallWork = int64_t{1} << 15;

template <typename scalar_t>
void small_linear_norms(const Tensor& x, const Tensor& g, bool ghost, const Tensor* w_dst, const Tensor* b_dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), t = x.size(1), d_in = x.size(2), d_out = g.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  acc_t* wp = w_dst ? w_dst->mutable_data_ptr<acc_t>() : nullptr;
  acc_t* bp = b_dst ? b_dst->mutable_data_ptr<acc_t>() : nullptr;
  std::vector<acc_t> row(wp && !ghost ? d_in : 0);
  auto dot = [](const scalar_t* a, const scalar_t* b, int64_t d) {
    acc_t s = 0;
    for (int64_t k = 0; k < d; ++k) s += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
    return s;
  };
  for (int64_t s = 0; s < n; ++s) {
    const scalar_t* xs = xp + s * t * d_in;
    const scalar_t* gs = gp + s * t * d_out;
    if (wp && ghost) {
      acc_t sum = 0;
      for (int64_t a = 0; a < t; ++a) {
        acc_t row = 0;
        for (int64_t c = 0; c < a; ++c)
          row += dot(xs + a * d_in, xs + c * d_in, d_in) * dot(gs + a * d_out, gs + c * d_out, d_out);
        sum += 2 * row + dot(xs + a * d_in, xs + a * d_in, d_in) * dot(gs + a * d_out, gs + a * d_out, d_out);
      }
      wp[s] = sum;
    } else if (wp) {  // row o of the gradient, sum_t g[t, o] x_t, then its squares
      acc_t sum = 0;
      for (int64_t o = 0; o < d_out; ++o) {
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t a = 0; a < t; ++a) {
          const acc_t c = static_cast<acc_t>(gs[a * d_out + o]);
          const scalar_t* xa = xs + a * d_in;
          for (int64_t i = 0; i < d_in; ++i) row[i] += c * static_cast<acc_t>(xa[i]);
        }
        for (int64_t i = 0; i < d_in; ++i) sum += row[i] * row[i];
      }
      wp[s] = sum;
    }
    if (bp) {
      acc_t sum = 0;
      for (int64_t o = 0; o < d_out; ++o) {
        acc_t v = 0;
        for (int64_t a = 0; a < t; ++a) v += static_cast<acc_t>(gs[a * d_out + o]);
        sum += v * v;
      }
      bp[s] = sum;
    }
  }
}

// The squared per-sample norms of a Linear layer's weight gradient (sum_t g_t ⊗ x_t) into
// *w_dst and of its bias gradient (sum_t g_t) into *b_dst (either may be null).
void linear_norms_into(const Tensor& x, const Tensor& g, bool ghost, const Tensor* w_dst, const Tensor* b_dst) {
  const int64_t n = x.size(0), t = x.size(1), d_in = x.size(2), d_out = g.size(2);
  if (n == 0 || (!w_dst && !b_dst)) return;
  const auto acc = acc_type(x.scalar_type());
  const int64_t work =
      n * ((w_dst ? (ghost ? t * (t + 1) / 2 * (d_in + d_out) : t * d_in * d_out) : 0) + (b_dst ? t * d_out : 0));
  if (x.is_cpu() && work <= kSmallWork) {
    const Tensor xc = x.contiguous(), gc = g.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "indivgrad_small_linear_norms",
                                    [&] { small_linear_norms<scalar_t>(xc, gc, ghost, w_dst, b_dst); });
    return;
  }
  if (b_dst) {
    Tensor dst = *b_dst;
    const Tensor s = t == 1 ? g.select(1, 0).to(acc) : at::sum(g, {1}, false, acc);
    at::sum_out(dst, s.square(), {1});
  }
  if (!w_dst) return;
  Tensor dst = *w_dst;
  if (t == 0 || d_in == 0 || d_out == 0) {
    dst.zero_();
  } else if (t == 1) {  // ||x ⊗ g|| = ||x|| ||g||
    at::mul_out(dst, squared_rows(x.select(1, 0)), squared_rows(g.select(1, 0)));
  } else if (ghost) {
#ifdef INDIVGRAD_WITH_CUDA
    if (x.is_cuda()) return linear_ghost_sq_norms_cuda(x, g, dst);
#endif
    ghost_sq_norms_into(x, g, acc, dst);
  } else {
    direct_sq_norms_into(x, g, acc, dst);
  }
}

Tensor linear_sq_norms(const Tensor& x_in, const Tensor& g_in, c10::string_view method) {
  const auto [x, g] = check_factors(x_in, g_in);
  const bool ghost = linear_norm_uses_ghost(x.size(1), x.size(2), g.size(2), method);
  Tensor out = at::empty({x.size(0)}, x.options().dtype(acc_type(x.scalar_type())));
  linear_norms_into(x, g, ghost, &out, nullptr);
  return out;
}

// out [weight + bias, N]: the rows asked for, in the order weight, bias.
void linear_layer_sq_norms(const Tensor& x_in, const Tensor& g_in, c10::string_view method, bool weight, bool bias,
                           const Tensor& out) {
  const auto [x, g] = check_factors(x_in, g_in);
  const bool ghost = linear_norm_uses_ghost(x.size(1), x.size(2), g.size(2), method);
  check_norms_out(out, weight + bias, x.size(0), acc_type(x.scalar_type()), x, "weight, bias",
                  {{"x", &x_in}, {"g", &g_in}});
  const Tensor w = weight ? out.select(0, 0) : Tensor(), b = bias ? out.select(0, weight ? 1 : 0) : Tensor();
  linear_norms_into(x, g, ghost, weight ? &w : nullptr, bias ? &b : nullptr);
}

// ids [N, T] (integer), g [N, T, D] floating, same N, T and device.
void check_embedding_factors(const Tensor& ids, const Tensor& g) {
  TORCH_CHECK_VALUE(ids.dim() == 2, "ids: expected a 2-D tensor [N, T], got shape ", ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "ids: expected dtype int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(g.dim() == 3 && g.size(0) == ids.size(0) && g.size(1) == ids.size(1), "g: expected [", ids.size(0),
                    ", ", ids.size(1), ", D] (ids' [N, T] and the embedding width), got shape ", g.sizes());
  check_float_dtype(g, "g");
  TORCH_CHECK_VALUE(g.device() == ids.device(), "g: expected device ", ids.device(), " (ids' device), got ",
                    g.device());
}

// g with the rows of padding tokens set to exactly 0 (torch gives padding_idx no gradient,
// NaN or not).
Tensor drop_padding(const Tensor& ids, const Tensor& g, std::optional<int64_t> padding_idx) {
  if (!padding_idx) return g;
  return at::where(ids.ne(*padding_idx).unsqueeze(-1), g, at::zeros({}, g.options()));
}

void embedding_grads_out(const Tensor& ids, const Tensor& g, std::optional<int64_t> padding_idx, const Tensor& out) {
  check_embedding_factors(ids, g);
  TORCH_CHECK_VALUE(out.dim() == 3, "out: expected a 3-D tensor [N, num_embeddings, D], got shape ", out.sizes());
  const int64_t n = ids.size(0), t = ids.size(1), v = out.size(1), d = g.size(2);
  check_output(out, "out", {n, v, d}, g, {{"g", &g}});
  const auto acc = acc_type(g.scalar_type());
  const bool scratch = acc != g.scalar_type();  // half types add up in float32, rounded once
  const Tensor rows = drop_padding(ids, g, padding_idx);
  for_blocks(n, block_size(n, v * d, c10::elementSize(acc)), [&](int64_t n0, int64_t nb) {
    Tensor dst = scratch ? at::zeros({nb, v, d}, g.options().dtype(acc)) : out.narrow(0, n0, nb).zero_();
    const Tensor sample = at::arange(nb, ids.options().dtype(at::kLong)).mul_(v).unsqueeze(1);
    const Tensor index = ids.narrow(0, n0, nb).to(at::kLong).add(sample).reshape({-1});
    dst.view({nb * v, d}).index_add_(0, index, rows.narrow(0, n0, nb).reshape({nb * t, d}).to(acc));
    if (scratch) out.narrow(0, n0, nb).copy_(dst);
  });
}

Tensor embedding_grads(const Tensor& ids, const Tensor& g, int64_t num_embeddings, std::optional<int64_t> padding_idx) {
  check_embedding_factors(ids, g);
  TORCH_CHECK_VALUE(num_embeddings >= 0, "num_embeddings: expected >= 0, got ", num_embeddings);
  Tensor out = at::empty({ids.size(0), num_embeddings, g.size(2)}, g.options());
  embedding_grads_out(ids, g, padding_idx, out);
  return out;
}

Tensor embedding_sq_norms(const Tensor& ids, const Tensor& g_in, std::optional<int64_t> padding_idx,
                          c10::string_view method) {
  check_embedding_factors(ids, g_in);
  const int64_t n = ids.size(0), t = ids.size(1), d = g_in.size(2);
  const bool ghost = embedding_norm_uses_ghost(t, method);
  const auto acc = acc_type(g_in.scalar_type());
  const Tensor g = drop_padding(ids, g_in, padding_idx);
  if (ghost) {  // sum over token pairs with equal ids of g_t · g_s, cost ~T²·D
    Tensor out = at::empty({n}, g.options().dtype(acc));
    for_blocks(n, block_size(n, 2 * t * t, c10::elementSize(acc)), [&](int64_t n0, int64_t nb) {
      const Tensor gb = g.narrow(0, n0, nb).to(acc), ib = ids.narrow(0, n0, nb);
      const Tensor same = ib.unsqueeze(2).eq(ib.unsqueeze(1));
      const Tensor grams = at::bmm(gb, gb.transpose(1, 2));
      out.narrow(0, n0, nb).copy_(at::where(same, grams, at::zeros({}, grams.options())).sum({1, 2}));
    });
    return out;
  }
  // Direct, cost ~T·D + T log T: sort each sample's ids, give each run of equal ids one
  // row, add the tokens' gradients into their run's row, and sum the rows' squares per sample.
  const auto [sorted, order] = ids.to(at::kLong).sort(1);
  Tensor starts = at::ones_like(sorted, sorted.options().dtype(at::kBool));
  if (t > 1) starts.narrow(1, 1, t - 1).copy_(sorted.narrow(1, 1, t - 1).ne(sorted.narrow(1, 0, t - 1)));
  const Tensor run = starts.reshape({-1}).to(at::kLong).cumsum(0).sub_(1);  // [N*T]: each token's run
  const Tensor rows_sorted = g.gather(1, order.unsqueeze(-1).expand({n, t, d})).reshape({n * t, d}).to(acc);
  const Tensor summed = at::zeros({n * t, d}, rows_sorted.options()).index_add_(0, run, rows_sorted);
  const Tensor sample = at::arange(n, run.options()).repeat_interleave(t);
  const Tensor run_sample = at::zeros({n * t}, run.options()).scatter_(0, run, sample);
  return at::zeros({n}, rows_sorted.options()).index_add_(0, run_sample, summed.square().sum(-1));
}

// x [N, *, *normalized_shape] floating, g of x's shape, dtype and device.
void check_layer_norm_factors(const Tensor& x, const Tensor& g, at::IntArrayRef normalized_shape) {
  check_float_dtype(x, "x");
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_VALUE(k >= 1 && x.dim() >= k + 1 && x.sizes().slice(x.dim() - k) == normalized_shape,
                    "x: expected [N, *, ", normalized_shape, "] (normalized_shape last), got shape ", x.sizes());
  TORCH_CHECK_VALUE(g.sizes() == x.sizes(), "g: expected shape ", x.sizes(), " (x's shape), got ", g.sizes());
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), "g: expected dtype ", x.scalar_type(), " (x's dtype), got ",
                   g.scalar_type());
  TORCH_CHECK_VALUE(g.device() == x.device(), "g: expected device ", x.device(), " (x's device), got ", g.device());
}

std::tuple<Tensor, Tensor> layer_norm_grads(const Tensor& x, const Tensor& g, at::IntArrayRef normalized_shape,
                                            double eps) {
  check_layer_norm_factors(x, g, normalized_shape);
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  const auto acc = acc_type(x.scalar_type());
  const Tensor xhat = at::layer_norm(x.to(acc), normalized_shape, {}, {}, eps);
  const Tensor ga = g.to(acc);
  std::vector<int64_t> middle, shape{x.size(0)};
  int64_t positions = 1;
  for (int64_t dim = 1; dim < x.dim() - k; ++dim) {
    middle.push_back(dim);
    positions *= x.size(dim);
  }
  shape.insert(shape.end(), normalized_shape.begin(), normalized_shape.end());
  Tensor gw = xhat.mul(ga), gb;
  if (positions == 1) {  // nothing to add up (a sum over one position costs a fill and an add)
    gw = gw.reshape(shape);
    gb = ga.reshape(shape).clone();  // never an alias of the input g
  } else {
    gw = gw.sum(middle);
    gb = ga.sum(middle);
  }
  return {gw.to(x.scalar_type()), gb.to(x.scalar_type())};
}

// The same in plain loops on the CPU, for calls below kSmallWork elements; x and g are
// [N, P, M] contiguous; x̂ as torch's layer_norm forms it (biased variance, 1/sqrt(var + eps)).
template <typename scalar_t>
void small_layer_norm_norms(const Tensor& x, const Tensor& g, double eps, const Tensor* w_dst, const Tensor* b_dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), p = x.size(1), m = x.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  acc_t* wp = w_dst ? w_dst->mutable_data_ptr<acc_t>() : nullptr;
  acc_t* bp = b_dst ? b_dst->mutable_data_ptr<acc_t>() : nullptr;
  std::vector<acc_t> gw(m), gb(m);
  for (int64_t s = 0; s < n; ++s) {
    std::fill(gw.begin(), gw.end(), acc_t(0));
    std::fill(gb.begin(), gb.end(), acc_t(0));
    for (int64_t q = 0; q < p; ++q) {
      const scalar_t* xr = xp + (s * p + q) * m;
      const scalar_t* gr = gp + (s * p + q) * m;
      if (wp) {
        acc_t mean = 0, var = 0;
        for (int64_t k = 0; k < m; ++k) mean += static_cast<acc_t>(xr[k]);
        mean /= static_cast<acc_t>(m);
        for (int64_t k = 0; k < m; ++k) {
          const acc_t d = static_cast<acc_t>(xr[k]) - mean;
          var += d * d;
        }
        const acc_t rstd = acc_t(1) / std::sqrt(var / static_cast<acc_t>(m) + static_cast<acc_t>(eps));
        for (int64_t k = 0; k < m; ++k) gw[k] += (static_cast<acc_t>(xr[k]) - mean) * rstd * static_cast<acc_t>(gr[k]);
      }
      if (bp)
        for (int64_t k = 0; k < m; ++k) gb[k] += static_cast<acc_t>(gr[k]);
    }
    acc_t sw = 0, sb = 0;
    for (int64_t k = 0; k < m; ++k) {
      sw += gw[k] * gw[k];
      sb += gb[k] * gb[k];
    }
    if (wp) wp[s] = sw;
    if (bp) bp[s] = sb;
  }
}

// out [weight + bias, N]: the squared norms of the per-sample gradients layer_norm_grads
// returns (weight: sum over positions of x̂ ⊙ g; bias: of g), rows in the order weight, bias.
// The per-sample gradients are temporaries of [N, M] (M = the normalized elements).
void layer_norm_sq_norms(const Tensor& x, const Tensor& g, at::IntArrayRef normalized_shape, double eps, bool weight,
                         bool bias, const Tensor& out) {
  check_layer_norm_factors(x, g, normalized_shape);
  const auto acc = acc_type(x.scalar_type());
  const int64_t n = x.size(0);
  check_norms_out(out, weight + bias, n, acc, x, "weight, bias", {{"x", &x}, {"g", &g}});
  if (n == 0 || !(weight || bias)) return;
  if (x.numel() == 0) {
    out.zero_();
    return;
  }
  int64_t m = 1;
  for (const int64_t s : normalized_shape) m *= s;
  const int64_t positions = x.numel() / (n * m);
  if (x.is_cpu() && x.numel() <= kSmallWork) {
    const Tensor xc = x.reshape({n, positions, m}).contiguous(), gc = g.reshape({n, positions, m}).contiguous();
    const Tensor w = weight ? out.select(0, 0) : Tensor(), b = bias ? out.select(0, weight ? 1 : 0) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "indivgrad_small_layer_norm_norms", [&] {
      small_layer_norm_norms<scalar_t>(xc, gc, eps, weight ? &w : nullptr, bias ? &b : nullptr);
    });
    return;
  }
  const Tensor ga = g.reshape({n, positions, m}).to(acc);
  if (weight) {
    Tensor gw = at::layer_norm(x.reshape({n, positions, m}).to(acc), {m}, {}, {}, eps).mul_(ga);
    gw = positions == 1 ? gw.view({n, m}) : gw.sum(1);
    Tensor dst = out.select(0, 0);
    at::sum_out(dst, gw.mul_(gw), {1});
  }
  if (bias) {
    Tensor dst = out.select(0, weight ? 1 : 0);
    at::sum_out(dst, positions == 1 ? ga.view({n, m}).square() : ga.sum(1).square_(), {1});
  }
}

}  // namespace

Tensor squared_rows(const Tensor& t) {
  return at::linalg_vector_norm(t, 2, {-1}, false, acc_type(t.scalar_type())).square();
}

std::optional<bool> forced_ghost(c10::string_view method) {
  if (method == "ghost") return true;
  if (method == "direct") return false;
  TORCH_CHECK_VALUE(method == "auto", "method: expected \"auto\", \"ghost\" or \"direct\", got \"", std::string(method),
                    "\"");
  return std::nullopt;
}

bool linear_norm_uses_ghost(int64_t t, int64_t d_in, int64_t d_out, c10::string_view method) {
  if (const auto forced = forced_ghost(method)) return *forced;
  // Work per sample in multiply-adds, counting each element of a temporary (in cache) as
  // kFusedElementCost: two T x T Grams, against the [D_out, D_in] gradient (bench/NOTES.md,
  // "Fused sequence-Linear norms").
  const int64_t c = kFusedElementCost;
  return t * t * (d_in + d_out + 2 * c) <= (t + c) * d_in * d_out;
}

bool embedding_norm_uses_ghost(int64_t t, c10::string_view method) {
  if (const auto forced = forced_ghost(method)) return *forced;
  return t <= kEmbeddingGhostMaxTokens;
}

Tensor call_linear_sq_norms(const Tensor& x, const Tensor& g) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("indivgrad_cuda::linear_sq_norms", "")
                       .typed<Tensor(const Tensor&, const Tensor&, c10::string_view)>();
  return op.call(x, g, "auto");
}

TORCH_LIBRARY_IMPL(indivgrad_cuda, CompositeExplicitAutograd, m) {
  m.impl("seq_outer", &seq_outer);
  m.impl("seq_outer_out", &seq_outer_out);
  m.impl("linear_sq_norms", &linear_sq_norms);
  m.impl("embedding_grads", &embedding_grads);
  m.impl("embedding_grads_out", &embedding_grads_out);
  m.impl("embedding_sq_norms", &embedding_sq_norms);
  m.impl("layer_norm_grads", &layer_norm_grads);
  m.impl("linear_layer_sq_norms", &linear_layer_sq_norms);
  m.impl("layer_norm_sq_norms", &layer_norm_sq_norms);
}

}  // namespace indivgrad
