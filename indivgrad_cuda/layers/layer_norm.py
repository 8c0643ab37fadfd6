"""nn.LayerNorm with elementwise affine parameters, on inputs [N, *, *normalized_shape].

Sample n's gradients are ``sum_t x̂_t ⊙ g_t`` (weight) and ``sum_t g_t`` (bias), where
``x̂`` is the normalised input: [N, *normalized_shape], as small as the batch's
activations, so norms and the clipped sum are formed from them directly.
"""

import math

import torch
from torch import nn

from indivgrad_cuda import ops
from indivgrad_cuda.layers.base import Factors, LayerRule, acc_dtype, fit, gram_rows, squared_rows, write_or_add


class LayerNormRule(LayerRule):
    def record(self, module, inputs, output):
        a = inputs[0].detach()
        return a.reshape(a.shape[0], -1, *module.normalized_shape)

    def output_grad(self, module, grad):
        return grad.reshape(grad.shape[0], -1, *module.normalized_shape)

    def _grads(self, module, f: Factors):
        """Per-sample gradients, once per chunk (the clipped sum needs them for the norms too)."""
        if "grads" not in f.cache:
            gw, gb = ops.layer_norm_grads(f.a, f.g, module.normalized_shape, module.eps)
            f.cache["grads"] = {"weight": gw, "bias": gb}
        return f.cache["grads"]

    def grads(self, module, f, layout, out: dict[str, torch.Tensor]):
        per_sample = self._grads(module, f)
        for attr, buf in out.items():
            buf.copy_(per_sample[attr])

    def sq_norms(self, module, f, want, method):
        per_sample = self._grads(module, f)
        return {attr: squared_rows(per_sample[attr]) for attr in want}

    def clipped_sum(self, module, f, coef, grads, accumulate):
        per_sample = self._grads(module, f)
        for attr, dst in grads.items():
            write_or_add(dst, torch.tensordot(coef.to(per_sample[attr].dtype), per_sample[attr], dims=1), accumulate)

    def gram(self, module, fa, fb, want, per_param):
        ga, gb = self._grads(module, fa), self._grads(module, fb)
        return {(attr,): gram_rows(ga[attr], gb[attr]) for attr in want}

    def projection_dims(self, module, want, share):
        d = math.prod(module.normalized_shape)
        return {attr: ((attr, fit(d, share // len(want)), d),) for attr in want}

    def project(self, module, f, mats):
        per_sample = self._grads(module, f)
        return {attr: per_sample[attr].flatten(1).to(acc_dtype(f.g.dtype)) @ p.t() for attr, (p,) in mats.items()}


RULE = (nn.LayerNorm, LayerNormRule())
