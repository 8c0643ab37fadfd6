// The operator schemas (namespace indivgrad_cuda) and the Python module that loads them.
// Implementations: outer_cpu.cpp (CPU), outer_cuda.cu (CUDA), layer_ops.cpp (any device),
// gram.cpp (any device) and gram_cuda.cu (CUDA);
// whole-MLP passes: mlp.cpp;
// fake (meta) implementations: indivgrad_cuda/_fake.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "gram.h"
#include "layer_ops.h"
#include "mlp.h"

TORCH_LIBRARY(indivgrad_cuda, m) {
  m.def("outer(Tensor x, Tensor g, str layout=\"in_out\") -> Tensor");
  m.def("outer_out(Tensor x, Tensor g, str layout, Tensor(a!) out) -> ()");
  m.def(
      "act_outer(Tensor x, Tensor upstream, Tensor pre, str activation=\"relu\", str layout=\"in_out\", "
      "float negative_slope=0.01, float alpha=1.0, float beta=1.0, float threshold=20.0) -> (Tensor, Tensor)");
  m.def(
      "act_outer_out(Tensor x, Tensor upstream, Tensor pre, str activation, str layout, float negative_slope, "
      "float alpha, float beta, float threshold, Tensor(a!) out, Tensor(b!) bias_out) -> ()");
  // The layer rules' ops (layer_ops.cpp): sequences [N, T, D], Embedding, LayerNorm.
  m.def("seq_outer(Tensor x, Tensor g, str layout=\"in_out\") -> Tensor");
  m.def("seq_outer_out(Tensor x, Tensor g, str layout, Tensor(a!) out) -> ()");
  m.def("linear_sq_norms(Tensor x, Tensor g, str method=\"auto\") -> Tensor");
  m.def("embedding_grads(Tensor ids, Tensor g, int num_embeddings, int? padding_idx=None) -> Tensor");
  m.def("embedding_grads_out(Tensor ids, Tensor g, int? padding_idx, Tensor(a!) out) -> ()");
  m.def("embedding_sq_norms(Tensor ids, Tensor g, int? padding_idx=None, str method=\"auto\") -> Tensor");
  m.def("layer_norm_grads(Tensor x, Tensor g, int[] normalized_shape, float eps) -> (Tensor, Tensor)");
  // One op per layer for the norms: the rows of out asked for (weight, bias), in place.
  m.def("linear_layer_sq_norms(Tensor x, Tensor g, str method, bool weight, bool bias, Tensor(a!) out) -> ()");
  m.def(
      "layer_norm_sq_norms(Tensor x, Tensor g, int[] normalized_shape, float eps, bool weight, bool bias, "
      "Tensor(a!) out) -> ()");
  // Inner products between two sets' per-sample gradients of a Linear or Embedding layer (gram.cpp, gram_cuda.cu).
  m.def("linear_gram(Tensor xa, Tensor ga, Tensor xb, Tensor gb, float bias=0., str method=\"auto\") -> Tensor");
  m.def("embedding_gram(Tensor ids_a, Tensor ga, Tensor ids_b, Tensor gb, int? padding_idx=None) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "indivgrad_cuda compiled kernels; use the indivgrad_cuda package, not this module.";
  m.def("compiled_with_cuda", []() {
#ifdef INDIVGRAD_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("linear_norm_uses_ghost", &indivgrad::linear_norm_uses_ghost,
        "Whether linear_sq_norms(method) forms the ghost norm for T positions of D_in -> D_out", pybind11::arg("t"),
        pybind11::arg("d_in"), pybind11::arg("d_out"), pybind11::arg("method") = "auto");
  m.def("embedding_norm_uses_ghost", &indivgrad::embedding_norm_uses_ghost,
        "Whether embedding_sq_norms(method) forms the ghost norm for T tokens", pybind11::arg("t"),
        pybind11::arg("method") = "auto");
  m.def("linear_gram_uses_ghost", &indivgrad::linear_gram_uses_ghost,
        "Whether linear_gram(method) forms T_a x T_b Grams for n_a x n_b samples of D_in -> D_out",
        pybind11::arg("t_a"), pybind11::arg("t_b"), pybind11::arg("n_a"), pybind11::arg("n_b"), pybind11::arg("d_in"),
        pybind11::arg("d_out"), pybind11::arg("method") = "auto");
  indivgrad::bind_mlp(m);
}
