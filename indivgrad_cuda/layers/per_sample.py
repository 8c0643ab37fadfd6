"""Rules whose per-sample gradients are small enough to form for a chunk of samples (the
gains of a normalisation layer, the parameters the fallback serves): every reduction is
then a reduction of those gradients, so a rule of this kind only says how to form them."""

import math

import torch

from indivgrad_cuda.layers.base import (
    Factors,
    LayerRule,
    acc_dtype,
    cast,
    gram_rows,
    mv_into,
    parameter_projection_dims,
    squared_rows,
)


class PerSampleRule(LayerRule):
    """Subclasses implement :meth:`per_sample`; the reductions follow from it."""

    matrix_projections = True  # project a gradient of 2 or more dims by two matrices (False: as one vector)

    def per_sample(self, module, f: Factors) -> dict[str, torch.Tensor]:
        """{attr: [N, *grad_shape]} of every attr the layer serves that requires grad."""
        raise NotImplementedError

    def _grads(self, module, f: Factors) -> dict[str, torch.Tensor]:
        """Per-sample gradients, once per chunk (the clipped sum needs them for the norms too)."""
        if "grads" not in f.cache:
            f.cache["grads"] = self.per_sample(module, f)
        return f.cache["grads"]

    def release(self, module, f):
        if "grads" in f.cache:  # the clipped sum reduces these
            f.a = f.g = None

    def grads(self, module, f, layout, out):
        per_sample = self._grads(module, f)
        for attr, buf in out.items():
            buf.copy_(per_sample[attr].reshape(buf.shape))

    def sq_norms(self, module, f, want, method):
        per_sample = self._grads(module, f)
        return {attr: squared_rows(per_sample[attr]) for attr in want}

    def clipped_sum(self, module, f, coef, grads, accumulate):
        per_sample = self._grads(module, f)
        for attr, dst in grads.items():
            g = per_sample[attr]
            acc = acc_dtype(g.dtype)
            mv_into(dst, cast(g, acc).reshape(g.shape[0], -1).t(), cast(coef, acc), accumulate)

    def gram(self, module, fa, fb, want, per_param):
        ga, gb = self._grads(module, fa), self._grads(module, fb)
        return {(attr,): gram_rows(ga[attr], gb[attr]) for attr in want}

    def projection_dims(self, module, want, share):
        """A vector gets one matrix; a gradient of shape [R, *C] two, ``P_R W P_Cᵀ`` with W as [R, prod(C)]."""
        dims = {}
        for attr in want:
            shape = module.get_parameter(attr).shape
            if not self.matrix_projections:
                shape = (math.prod(shape),)
            dims[attr] = parameter_projection_dims(attr, shape, share / len(want))
        return dims

    def project(self, module, f, mats):
        per_sample = self._grads(module, f)
        out = {}
        for attr, m in mats.items():
            g = per_sample[attr]
            g = cast(g, acc_dtype(g.dtype))
            if len(m) == 1:
                out[attr] = g.flatten(1) @ m[0].t()
            else:
                rows, cols = m
                out[attr] = (rows @ g.reshape(g.shape[0], rows.shape[1], cols.shape[1]) @ cols.t()).flatten(1)
        return out
