#include "mlp.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <pybind11/functional.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "activation.h"
#include "activation_aten.h"
#include "checks.h"
#include "layer_ops.h"

namespace indivgrad {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void act_outer_out(const Tensor& x, const Tensor& up, const Tensor& pre, const ActParams& a, c10::string_view name,
                   c10::string_view layout, const Tensor& out, const Tensor& bias_out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("indivgrad_cuda::act_outer_out", "")
                       .typed<void(const Tensor&, const Tensor&, const Tensor&, c10::string_view, c10::string_view,
                                   double, double, double, double, const Tensor&, const Tensor&)>();
  op.call(x, up, pre, name, layout, a.negative_slope, a.alpha, a.beta, a.threshold, out, bias_out);
}

struct Step {
  enum class Kind { Linear, Activation, Dropout, Flatten };
  Kind kind;
  ActParams act{};       // Activation
  std::string act_name;  // Activation
  int64_t dropout = -1;  // Dropout: its index among the Dropout layers (its mask's index)
  int64_t layer = -1;    // Linear: its index among the linear layers
  int64_t slot = -1;     // where forward saves what backward needs of this step (-1: nothing)
};

class MlpProgram {
 public:
  void add_linear() {
    Step s{Step::Kind::Linear};
    s.layer = static_cast<int64_t>(linear_steps_.size());
    s.slot = take_slots(2);  // the layer's input X and its output C (the next step's pre)
    linear_steps_.push_back(static_cast<int64_t>(steps_.size()));
    steps_.push_back(s);
  }
  void add_activation(const std::string& name, double negative_slope, double alpha, double beta, double threshold) {
    Step s{Step::Kind::Activation};
    s.act = parse_activation(name, negative_slope, alpha, beta, threshold);
    s.act_name = name;
    // Right after a linear layer its pre-activation is that layer's saved C; the
    // backward of a later activation in the same block needs its own input.
    if (!linear_steps_.empty() && !follows_linear()) s.slot = take_slots(1);
    steps_.push_back(s);
  }
  void add_dropout() {
    Step s{Step::Kind::Dropout};
    s.dropout = num_dropout_++;
    if (!linear_steps_.empty()) s.slot = take_slots(1);  // the scaled mask
    steps_.push_back(s);
  }
  void add_flatten() { steps_.push_back(Step{Step::Kind::Flatten}); }

  int64_t num_linear() const { return static_cast<int64_t>(linear_steps_.size()); }
  int64_t num_dropout() const { return num_dropout_; }

  // Returns the network output and what backward needs (an opaque list). masks[k] is the
  // k-th Dropout's scaled mask, [N, features per sample] (None: identity, eval mode). The
  // caller draws them for the whole batch and passes each chunk its rows, so the masks,
  // hence the results, do not depend on how the batch is chunked.
  std::tuple<Tensor, std::vector<OptTensor>> forward(const Tensor& x, const std::vector<Tensor>& weights,
                                                     const std::vector<OptTensor>& biases,
                                                     const std::vector<OptTensor>& masks) const {
    const at::NoGradGuard no_grad;  // parameters require grad; nothing here is for autograd
    check_params(weights, biases);
    TORCH_CHECK_VALUE(static_cast<int64_t>(masks.size()) == num_dropout_, "masks: expected ", num_dropout_,
                      " (one per Dropout layer), got ", masks.size());
    std::vector<OptTensor> saved(num_slots_);  // Dropout in eval mode saves no mask
    Tensor h = x;
    for (const Step& s : steps_) {
      switch (s.kind) {
        case Step::Kind::Flatten:
          if (h.dim() > 2) h = h.flatten(1);
          break;
        case Step::Kind::Linear: {
          const Tensor& w = weights[s.layer];
          check_layer_input(h, w, s.layer);
          saved[s.slot] = h;
          h = biases[s.layer] ? at::addmm(*biases[s.layer], h, w.t()) : at::mm(h, w.t());
          saved[s.slot + 1] = h;
          break;
        }
        case Step::Kind::Activation:
          if (s.slot >= 0) saved[s.slot] = h;
          h = activation_forward(s.act, h);
          break;
        case Step::Kind::Dropout:
          if (const OptTensor& m = masks[s.dropout]) {
            check_mask(*m, h, s.dropout);
            const Tensor mask = h.dim() == 2 ? *m : m->view(h.sizes());  // before a Flatten h may be [N, C, ...]
            h = h * mask;
            if (s.slot >= 0) saved[s.slot] = mask;
          }
          break;
      }
    }
    return {h, saved};
  }

  // Per-sample gradients written into out_weights[l] / out_biases[l] (undefined: not
  // wanted) for every linear layer l, in `layout`.
  void grads(const Tensor& grad_output, const std::vector<OptTensor>& saved, const std::vector<Tensor>& weights,
             const std::vector<OptTensor>& out_weights, const std::vector<OptTensor>& out_biases,
             const std::string& layout) const {
    const at::NoGradGuard no_grad;  // parameters require grad; nothing here is for autograd
    walk_backward(grad_output, saved, weights, present(out_weights), present(out_biases),
                  [&](int64_t l, const Tensor& x, const Tensor& up, const Tensor& pre, const Step* act) {
                    const ActParams a = act ? act->act : kIdentity;
                    if (out_weights[l]) {
                      const Tensor g =
                          out_biases[l] ? *out_biases[l] : at::empty_like(up, at::MemoryFormat::Contiguous);
                      act_outer_out(x, up, pre, a, act ? act->act_name : "identity", layout, *out_weights[l], g);
                      return g;
                    }
                    Tensor g = activation_backward(a, up, pre);
                    if (out_biases[l]) out_biases[l]->copy_(g);
                    return g;
                  });
  }

  // Squared per-sample gradient norms [P, N], one row per wanted parameter (weights and
  // biases in layer order), from ||x_n ⊗ g_n|| = ||x_n|| ||g_n||: nothing [N, D, D'] is formed.
  Tensor norms(const Tensor& grad_output, const std::vector<OptTensor>& saved, const std::vector<Tensor>& weights,
               const std::vector<bool>& want_w, const std::vector<bool>& want_b) const {
    const at::NoGradGuard no_grad;  // parameters require grad; nothing here is for autograd
    return walk_norms(grad_output, saved, weights, want_w, want_b, nullptr, nullptr);
  }

  // Each wanted layer's factors: X_l (its input) and G_l = dL/dC_l (the gradient at its
  // output), G formed by ATen; undefined for layers with no wanted parameter.
  std::pair<std::vector<Tensor>, std::vector<Tensor>> factors(const Tensor& grad_output,
                                                              const std::vector<OptTensor>& saved,
                                                              const std::vector<Tensor>& weights,
                                                              const std::vector<bool>& want_w,
                                                              const std::vector<bool>& want_b) const {
    const at::NoGradGuard no_grad;  // parameters require grad; nothing here is for autograd
    std::vector<Tensor> xs(num_linear()), gs(num_linear());
    walk_backward(grad_output, saved, weights, want_w, want_b,
                  [&](int64_t l, const Tensor& x, const Tensor& up, const Tensor& pre, const Step* act) {
                    Tensor g = activation_backward(act ? act->act : kIdentity, up, pre);
                    if (want_w[l] || want_b[l]) {
                      xs[l] = x;
                      gs[l] = g;
                    }
                    return g;
                  });
    return {xs, gs};
  }

  // DP-SGD: grad_w[l] (+)= sum_n c_{w,n} g_n x_n^T (one GEMM per layer) and
  // grad_b[l] (+)= sum_n c_{b,n} g_n, where c = coefficients(sq) [P, N] holds each wanted
  // parameter's clip coefficients, a row per row of the squared norms sq [P, N]. The clipping
  // rule (groups, thresholds, clip function) is the caller's, written once in Python
  // (reducers/clipping.py); it is called with the GIL held. Returns sq. The noise is the
  // caller's: it is drawn once per batch, after all chunks.
  Tensor clipped_sum(const Tensor& grad_output, const std::vector<OptTensor>& saved, const std::vector<Tensor>& weights,
                     const std::vector<OptTensor>& grad_weights, const std::vector<OptTensor>& grad_biases,
                     const std::function<Tensor(const Tensor&)>& coefficients, bool accumulate) const {
    const at::NoGradGuard no_grad;  // parameters require grad; nothing here is for autograd
    std::vector<Tensor> xs(num_linear()), gs(num_linear());
    const Tensor sq = walk_norms(grad_output, saved, weights, present(grad_weights), present(grad_biases), &xs, &gs);
    Tensor coef;
    {
      const pybind11::gil_scoped_acquire gil;
      coef = coefficients(sq);
    }
    TORCH_CHECK(coef.dim() == 2 && coef.size(0) == sq.size(0) && coef.size(1) == sq.size(1),
                "coefficients: expected [P, N] = ", sq.sizes(), ", got ", coef.sizes());
    int64_t row = 0;  // sq's rows: the wanted parameters, weights and biases in layer order
    for (int64_t l = 0; l < num_linear(); ++l) {
      if (grad_weights[l]) {
        const Tensor& g = gs[l];
        const Tensor gc = g * coef[row++].unsqueeze(1).to(g.scalar_type());
        Tensor gw = *grad_weights[l];
        accumulate ? gw.addmm_(gc.t(), xs[l]) : at::mm_out(gw, gc.t(), xs[l]);
      }
      if (grad_biases[l]) {
        const Tensor& g = gs[l];
        const Tensor c = coef[row++].to(g.scalar_type());
        Tensor gb = *grad_biases[l];
        accumulate ? gb.addmv_(g.t(), c) : at::mv_out(gb, g.t(), c);
      }
    }
    return sq;
  }

 private:
  static constexpr ActParams kIdentity{Activation::Identity, 0, 0, 0, 0};

  static std::vector<bool> present(const std::vector<OptTensor>& buffers) {
    std::vector<bool> out;
    for (const OptTensor& t : buffers) out.push_back(t.has_value());
    return out;
  }

  // The backward with G_l formed by ATen (no outer products): squared per-sample norms
  // [P, N]; xs/gs (when given) receive each visited layer's X_l and G_l.
  Tensor walk_norms(const Tensor& grad_output, const std::vector<OptTensor>& saved, const std::vector<Tensor>& weights,
                    const std::vector<bool>& want_w, const std::vector<bool>& want_b, std::vector<Tensor>* xs,
                    std::vector<Tensor>* gs) const {
    std::vector<Tensor> rows(num_linear() * 2);
    walk_backward(grad_output, saved, weights, want_w, want_b,
                  [&](int64_t l, const Tensor& x, const Tensor& up, const Tensor& pre, const Step* act) {
                    Tensor g = activation_backward(act ? act->act : kIdentity, up, pre);
                    if (want_w[l]) rows[2 * l] = call_linear_sq_norms(x, g);  // the Linear rule's op
                    if (want_b[l]) rows[2 * l + 1] = squared_rows(g);
                    if (xs) (*xs)[l] = x;
                    if (gs) (*gs)[l] = g;
                    return g;
                  });
    return stack_defined(rows, grad_output);
  }

  bool follows_linear() const { return !steps_.empty() && steps_.back().kind == Step::Kind::Linear; }
  int64_t take_slots(int64_t n) {
    const int64_t first = num_slots_;
    num_slots_ += n;
    return first;
  }

  void check_params(const std::vector<Tensor>& weights, const std::vector<OptTensor>& biases) const {
    TORCH_CHECK_VALUE(
        static_cast<int64_t>(weights.size()) == num_linear() && static_cast<int64_t>(biases.size()) == num_linear(),
        "expected ", num_linear(), " weights and biases, got ", weights.size(), " and ", biases.size());
  }

  static void check_layer_input(const Tensor& h, const Tensor& w, int64_t layer) {
    TORCH_CHECK_VALUE(h.dim() == 2 && h.size(1) == w.size(1), "Linear layer ", layer, " expects input [N, ", w.size(1),
                      "], got shape ", h.sizes());
    TORCH_CHECK_TYPE(h.scalar_type() == w.scalar_type(), "x: expected dtype ", w.scalar_type(),
                     " (the model's parameters), got ", h.scalar_type());
    TORCH_CHECK_VALUE(h.device() == w.device(), "x: expected device ", w.device(), " (the model's parameters), got ",
                      h.device());
  }

  static void check_mask(const Tensor& m, const Tensor& h, int64_t k) {
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == h.size(0) && m.numel() == h.numel() && m.is_contiguous(), "masks[",
                      k, "]: expected a contiguous [", h.size(0), ", ", h.numel() / std::max<int64_t>(h.size(0), 1),
                      "] tensor, got shape ", m.sizes(), " and strides ", m.strides());
    TORCH_CHECK_TYPE(m.scalar_type() == h.scalar_type() && m.device() == h.device(), "masks[", k, "]: expected ",
                     h.scalar_type(), " on ", h.device(), ", got ", m.scalar_type(), " on ", m.device());
  }

  // Rows that are defined, stacked into [P, N]; [0, N] when none are.
  static Tensor stack_defined(const std::vector<Tensor>& rows, const Tensor& like) {
    std::vector<Tensor> present;
    for (const Tensor& r : rows)
      if (r.defined()) present.push_back(r);
    if (present.empty()) return at::empty({0, like.size(0)}, like.options());
    return at::stack(present);
  }

  // Walks from dL/d(output) back through the network. For each linear layer l, last to
  // first, while l or an earlier layer has a wanted gradient, calls
  // visit(l, X_l, upstream, C_l, act): `upstream` is the gradient at the output of the
  // activation `act` applied right after the layer (act null: at the layer's output C_l);
  // visit returns G_l = dL/dC_l, from which the walk continues with G_l W_l.
  template <typename Visit>
  void walk_backward(const Tensor& grad_output, const std::vector<OptTensor>& saved, const std::vector<Tensor>& weights,
                     const std::vector<bool>& want_w, const std::vector<bool>& want_b, Visit visit) const {
    TORCH_CHECK_VALUE(static_cast<int64_t>(saved.size()) == num_slots_, "saved: expected ", num_slots_,
                      " tensors from forward, got ", saved.size());
    int64_t first = 0;  // layers before the first wanted one need no gradient
    while (first < num_linear() && !want_w[first] && !want_b[first]) ++first;
    Tensor up = grad_output;
    int64_t end = static_cast<int64_t>(steps_.size());
    for (int64_t l = num_linear() - 1; l >= first; --l) {
      const int64_t lin = linear_steps_[l];
      for (int64_t k = end - 1; k > lin + 1; --k) up = step_backward(steps_[k], up, saved);
      const Step* act = nullptr;
      if (lin + 1 < end) {
        const Step& s = steps_[lin + 1];
        if (s.kind == Step::Kind::Activation) {
          act = &s;
        } else {
          up = step_backward(s, up, saved);
        }
      }
      const Step& linear = steps_[lin];
      const Tensor g = visit(l, *saved[linear.slot], up, *saved[linear.slot + 1], act);
      if (l > first) up = at::mm(g, weights[l]);
      end = lin;
    }
  }

  static Tensor step_backward(const Step& s, const Tensor& up, const std::vector<OptTensor>& saved) {
    switch (s.kind) {
      case Step::Kind::Activation: return activation_backward(s.act, up, *saved[s.slot]);
      case Step::Kind::Dropout: return saved[s.slot] ? up * *saved[s.slot] : up;
      default: return up;  // Flatten of a 2-D tensor
    }
  }

  std::vector<Step> steps_;
  std::vector<int64_t> linear_steps_;  // index in steps_ of each linear layer
  int64_t num_slots_ = 0;
  int64_t num_dropout_ = 0;
};

}  // namespace

void bind_mlp(pybind11::module& m) {
  pybind11::class_<MlpProgram>(m, "MlpProgram")
      .def(pybind11::init<>())
      .def("add_linear", &MlpProgram::add_linear)
      .def("add_activation", &MlpProgram::add_activation)
      .def("add_dropout", &MlpProgram::add_dropout)
      .def("add_flatten", &MlpProgram::add_flatten)
      .def_property_readonly("num_linear", &MlpProgram::num_linear)
      .def_property_readonly("num_dropout", &MlpProgram::num_dropout)
      .def("forward", &MlpProgram::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("grads", &MlpProgram::grads, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("norms", &MlpProgram::norms, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("clipped_sum", &MlpProgram::clipped_sum, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("factors", &MlpProgram::factors, pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace indivgrad
