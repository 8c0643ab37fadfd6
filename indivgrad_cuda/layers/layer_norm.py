"""nn.LayerNorm with elementwise affine parameters, on inputs [N, *, *normalized_shape].

Sample n's gradients are ``sum_t x̂_t ⊙ g_t`` (weight) and ``sum_t g_t`` (bias), where
``x̂`` is the normalised input: [N, *normalized_shape], as small as the batch's
activations, so norms and the clipped sum are formed from them directly.
"""

from torch import nn

from indivgrad_cuda import ops
from indivgrad_cuda.layers.base import acc_dtype, as_rows, cast, computed_input
from indivgrad_cuda.layers.per_sample import PerSampleRule


class LayerNormRule(PerSampleRule):
    module_type = nn.LayerNorm
    matrix_projections = False

    def record(self, module, args, kwargs, output, n, check=False):
        return as_rows(computed_input(args[0], output), len(module.normalized_shape))

    def output_grad(self, module, grads):
        return as_rows(grads[0], len(module.normalized_shape))

    def per_sample(self, module, f):
        acc = acc_dtype(f.g.dtype)  # half factors: x̂ and the sums in float32, as autocast's LayerNorm computes
        gw, gb = ops.layer_norm_grads(cast(f.a, acc), cast(f.g, acc), module.normalized_shape, module.eps)
        return {"weight": gw, "bias": gb}

    def write_sq_norms(self, module, f, want, method, out):
        """Norms alone: one op that never returns the per-sample gradients. For a clipped sum
        (or once formed) from the per-sample gradients, which the clipped sum reduces too."""
        if "grads" in f.cache or f.cache.get("clipping") or want not in (["weight", "bias"], ["weight"], ["bias"]):
            return super().write_sq_norms(module, f, want, method, out)
        acc = acc_dtype(f.g.dtype)
        x, g = cast(f.a, acc), cast(f.g, acc)
        ops.layer_norm_sq_norms(
            x, g, module.normalized_shape, module.eps, weight="weight" in want, bias="bias" in want, out=out
        )


RULE = LayerNormRule()
