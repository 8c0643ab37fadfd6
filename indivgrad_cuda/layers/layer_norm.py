"""nn.LayerNorm with elementwise affine parameters, on inputs [N, *, *normalized_shape].

Sample n's gradients are ``sum_t x̂_t ⊙ g_t`` (weight) and ``sum_t g_t`` (bias), where
``x̂`` is the normalised input: [N, *normalized_shape], as small as the batch's
activations, so norms and the clipped sum are formed from them directly.
"""

from torch import nn

from indivgrad_cuda import ops
from indivgrad_cuda.layers.per_sample import PerSampleRule


class LayerNormRule(PerSampleRule):
    module_type = nn.LayerNorm
    matrix_projections = False

    def record(self, module, args, kwargs, output, n, check=False):
        a = args[0].detach()
        return a.reshape(a.shape[0], -1, *module.normalized_shape)

    def output_grad(self, module, grads):
        grad = grads[0]
        return grad.reshape(grad.shape[0], -1, *module.normalized_shape)

    def per_sample(self, module, f):
        gw, gb = ops.layer_norm_grads(f.a, f.g, module.normalized_shape, module.eps)
        return {"weight": gw, "bias": gb}


RULE = LayerNormRule()
