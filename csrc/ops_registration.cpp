// The operator schemas (namespace indivgrad_cuda) and the Python module that loads them.
// Implementations: outer_cpu.cpp (CPU), outer_cuda.cu (CUDA); whole-MLP passes: mlp.cpp;
// fake (meta) implementations: indivgrad_cuda/_fake.py.
#include <torch/extension.h>
#include <torch/library.h>

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
  indivgrad::bind_mlp(m);
}
