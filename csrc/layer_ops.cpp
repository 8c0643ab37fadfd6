// The per-layer numeric work of the layer rules for sequences, Embedding and LayerNorm:
// per-sample gradients and their squared norms from a layer's factors (its input and the
// gradient at its output). Device-generic ATen calls, registered once for
// CompositeExplicitAutograd (CPU and CUDA alike); fake implementations in
// indivgrad_cuda/_fake.py. Temporaries are bounded by processing blocks of samples; each
// sample's result is computed the same way in any block, so results do not depend on it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "blocks.h"
#include "checks.h"
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

Tensor linear_sq_norms(const Tensor& x_in, const Tensor& g_in, c10::string_view method) {
  const auto [x, g] = check_factors(x_in, g_in);
  const int64_t n = x.size(0), t = x.size(1), d_in = x.size(2), d_out = g.size(2);
  const bool ghost = linear_norm_uses_ghost(t, d_in, d_out, method);
  const auto acc = acc_type(x.scalar_type());
  if (x_in.dim() == 2) return squared_rows(x_in) * squared_rows(g_in);  // ||x ⊗ g|| = ||x|| ||g||
  if (t == 1) return (squared_rows(x) * squared_rows(g)).squeeze(1);
  Tensor out = at::empty({n}, x.options().dtype(acc));
  const int64_t elem = c10::elementSize(acc);
  if (ghost) {  // <X Xᵀ, G Gᵀ>: T x T Grams, cost ~T²(D_in + D_out)
    for_blocks(n, block_size(n, 2 * t * t, elem), [&](int64_t n0, int64_t nb) {
      const Tensor xb = x.narrow(0, n0, nb).to(acc), gb = g.narrow(0, n0, nb).to(acc);
      const Tensor grams = at::bmm(xb, xb.transpose(1, 2)).mul_(at::bmm(gb, gb.transpose(1, 2)));
      out.narrow(0, n0, nb).copy_(grams.sum({1, 2}));
    });
  } else {  // ||Gᵀ X||²: the [D_out, D_in] gradients of a block, cost ~T·D_in·D_out
    for_blocks(n, block_size(n, d_in * d_out, elem), [&](int64_t n0, int64_t nb) {
      const Tensor w = at::bmm(g.narrow(0, n0, nb).transpose(1, 2).to(acc), x.narrow(0, n0, nb).to(acc));
      out.narrow(0, n0, nb).copy_(w.mul_(w).sum({1, 2}));  // in place; sum is pairwise, so float32 stays accurate
    });
  }
  return out;
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

std::tuple<Tensor, Tensor> layer_norm_grads(const Tensor& x, const Tensor& g, at::IntArrayRef normalized_shape,
                                            double eps) {
  check_float_dtype(x, "x");
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_VALUE(k >= 1 && x.dim() >= k + 1 && x.sizes().slice(x.dim() - k) == normalized_shape,
                    "x: expected [N, *, ", normalized_shape, "] (normalized_shape last), got shape ", x.sizes());
  TORCH_CHECK_VALUE(g.sizes() == x.sizes(), "g: expected shape ", x.sizes(), " (x's shape), got ", g.sizes());
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), "g: expected dtype ", x.scalar_type(), " (x's dtype), got ",
                   g.scalar_type());
  TORCH_CHECK_VALUE(g.device() == x.device(), "g: expected device ", x.device(), " (x's device), got ", g.device());
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
  // Work per sample in multiply-adds, counting each element written and read back as
  // kElementCost: two T x T Grams, against the [D_out, D_in] gradient.
  return t * t * (d_in + d_out + 2 * kElementCost) <= (t + kElementCost) * d_in * d_out;
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
}

}  // namespace indivgrad
