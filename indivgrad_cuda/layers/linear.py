"""nn.Linear on inputs [N, *, D_in]: the middle dims are the positions T of each sample.

Sample n's weight gradient is ``sum_t g_t ⊗ a_t = G_nᵀ A_n``; its squared norm is the ghost
norm ``<A_n A_nᵀ, G_n G_nᵀ>`` or the direct ``||G_nᵀ A_n||²``, whichever costs fewer
multiply-adds (``indivgrad_cuda._C.linear_norm_uses_ghost``); the clipped sum is one GEMM
over the N·T rows, each scaled by its sample's coefficient.

Hugging Face's GPT-2 ``Conv1D`` is the same layer with its weight stored transposed,
``[D_in, D_out]`` (``y = x W + b``): :class:`Conv1DRule` is this rule in that orientation.
Its per-sample gradients always take the weight's own shape (``layout`` is nn.Linear's).
"""

import math

import torch
from torch import nn

from indivgrad_cuda import ops
from indivgrad_cuda.layers.base import (
    Factors,
    LayerRule,
    acc_dtype,
    as_rows,
    cast,
    computed_input,
    fit,
    gram_rows,
    mm_into,
    squared_rows,
    sum_dtype,
    sum_rows_into,
)


class LinearRule(LayerRule):
    module_type = nn.Linear
    transposed = False  # the weight is stored [D_in, D_out] (Conv1D), not nn.Linear's [D_out, D_in]

    def widths(self, module) -> tuple[int, int]:
        """(D_in, D_out)."""
        return module.in_features, module.out_features

    def _layout(self, layout: str) -> str:
        return "in_out" if self.transposed else layout

    def record(self, module, args, kwargs, output, n, check=False):
        return as_rows(computed_input(args[0], output), 1)

    def output_grad(self, module, grads):
        return as_rows(grads[0], 1)

    def grad_shape(self, module, attr, layout):
        if attr == "weight":
            d_in, d_out = self.widths(module)
            return (d_in, d_out) if self._layout(layout) == "in_out" else (d_out, d_in)
        return tuple(module.get_parameter(attr).shape)

    def grads(self, module, f: Factors, layout, out: dict[str, torch.Tensor]):
        if "weight" in out:  # in the buffer's dtype (half factors' products are exact in float32)
            w = out["weight"]
            ops.seq_outer(cast(f.a, w.dtype), cast(f.g, w.dtype), layout=self._layout(layout), out=w)
        if "bias" in out:  # summed in the buffer's dtype (float32 for half factors under autocast)
            b = out["bias"]
            if f.g.shape[1] > 1:
                torch.sum(f.g, 1, dtype=b.dtype, out=b)
            else:
                b.copy_(f.g[:, 0])

    def sq_norms(self, module, f: Factors, want: list[str], method):
        norms = {}
        if "weight" in want:
            norms["weight"] = ops.linear_sq_norms(f.a, f.g, method=method)
        if "bias" in want:
            norms["bias"] = squared_rows(_bias_grads(f))
        return norms

    def write_sq_norms(self, module, f: Factors, want, method, out):
        if want not in (["weight", "bias"], ["weight"], ["bias"]):  # the op's rows are weight, then bias
            return super().write_sq_norms(module, f, want, method, out)
        ops.linear_layer_sq_norms(f.a, f.g, method=method, weight="weight" in want, bias="bias" in want, out=out)

    def clipped_sum(self, module, f: Factors, coef, grads, accumulate):
        w, b = grads.get("weight"), grads.get("bias")
        dt = sum_dtype(f.g.dtype, w if w is not None else b)
        c = cast(coef, dt).view(-1, 1, 1)
        a, g = cast(f.a, dt), cast(f.g, dt)
        if w is not None and b is None and a.shape[-1] < g.shape[-1]:
            a = a * c  # scale the narrower factor's rows
        else:
            g = g * c  # the bias's sum is the scaled rows' sum
        rows_g = g.reshape(-1, g.shape[-1])
        if w is not None:
            rows_a = a.reshape(-1, a.shape[-1])
            left, right = (rows_a.t(), rows_g) if self.transposed else (rows_g.t(), rows_a)
            mm_into(w, left, right, accumulate)
        if b is not None:
            sum_rows_into(b, rows_g, accumulate)

    def gram(self, module, fa: Factors, fb: Factors, want, per_param):
        if "weight" in want and not per_param:  # (xa·xb + 1)(ga·gb): weight and bias in one pass
            bias = 1.0 if "bias" in want else 0.0
            return {tuple(want): ops.linear_gram(fa.a, fa.g, fb.a, fb.g, bias=bias)}
        out = {}
        if "weight" in want:
            out[("weight",)] = ops.linear_gram(fa.a, fa.g, fb.a, fb.g)
        if "bias" in want:
            out[("bias",)] = gram_rows(_bias_grads(fa), _bias_grads(fb))
        return out

    def projection_dims(self, module, want, share):
        d_in, d_out = self.widths(module)
        dims = {}
        if "weight" in want:  # k_out·(k_in + 1 for the bias) <= share, k_in ~ sqrt(share)
            k_in = fit(d_in, math.isqrt(int(share)))
            k_out = fit(d_out, share // (k_in + ("bias" in want)))
            pair = (("out", k_out, d_out), ("in", k_in, d_in))
            dims["weight"] = pair[::-1] if self.transposed else pair
        else:
            k_out = fit(d_out, share)
        if "bias" in want:  # projected by the weight's P_out, as LoGra does
            dims["bias"] = (("out", k_out, d_out),)
        return dims

    def project(self, module, f: Factors, mats):
        acc = acc_dtype(f.g.dtype)
        out = {}
        if "weight" in mats:  # P_out (sum_t g_t ⊗ a_t) P_inᵀ = sum_t (P_out g_t) ⊗ (P_in a_t)
            p_out, p_in = mats["weight"][::-1] if self.transposed else mats["weight"]
            g = cast(f.g, acc) @ p_out.t()  # [N, T, k_out]: P_out g_t
            a = cast(f.a, acc) @ p_in.t()
            out["weight"] = ops.seq_outer(a, g, layout="in_out" if self.transposed else "out_in").flatten(1)
        if "bias" in mats:  # the weight's P_out unless the weight is tied elsewhere
            (p_bias,) = mats["bias"]
            out["bias"] = (g if "weight" in mats and p_bias is p_out else cast(f.g, acc) @ p_bias.t()).sum(1)
        return out


def _bias_grads(f: Factors) -> torch.Tensor:
    """[N, D_out]: sum_t g_t (a view of g when T = 1: a sum over one position costs a fill and an add)."""
    if "bias" not in f.cache:
        f.cache["bias"] = f.g[:, 0] if f.g.shape[1] == 1 else f.g.sum(1)
    return f.cache["bias"]


class Conv1DRule(LinearRule):
    """Hugging Face's ``Conv1D`` (GPT-2, GPT, ...), recognised by name so that nothing imports
    transformers unless the model has one: ``transformers.*.Conv1D`` with ``nx``, ``nf`` and
    its forward ``addmm(bias, x, weight)``."""

    transposed = True

    def matches(self, module):
        cls = type(module)
        return (
            cls.__name__ == "Conv1D"
            and cls.__module__.startswith("transformers.")
            and isinstance(getattr(module, "weight", None), nn.Parameter)
            and tuple(module.weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
        )

    def widths(self, module):
        return module.nx, module.nf


RULE = LinearRule()
CONV1D_RULE = Conv1DRule()
