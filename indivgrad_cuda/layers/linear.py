"""nn.Linear on inputs [N, *, D_in]: the middle dims are the positions T of each sample.

Sample n's weight gradient is ``sum_t g_t ⊗ a_t = G_nᵀ A_n``; its squared norm is the ghost
norm ``<A_n A_nᵀ, G_n G_nᵀ>`` or the direct ``||G_nᵀ A_n||²``, whichever costs fewer
multiply-adds (``indivgrad_cuda._C.linear_norm_uses_ghost``); the clipped sum is one GEMM
over the N·T rows, each scaled by its sample's coefficient.
"""

import math

import torch
from torch import nn

from indivgrad_cuda import ops
from indivgrad_cuda.layers.base import Factors, LayerRule, acc_dtype, fit, gram_rows, squared_rows, write_or_add


class LinearRule(LayerRule):
    def record(self, module, inputs, output):
        a = inputs[0].detach()
        return a.reshape(a.shape[0], -1, a.shape[-1])

    def output_grad(self, module, grad):
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])

    def grad_shape(self, module, attr, layout):
        if attr == "weight" and layout == "in_out":
            return (module.in_features, module.out_features)
        return tuple(getattr(module, attr).shape)

    def grads(self, module, f: Factors, layout, out: dict[str, torch.Tensor]):
        if "weight" in out:
            ops.seq_outer(f.a, f.g, layout=layout, out=out["weight"])
        if "bias" in out:
            out["bias"].copy_(_bias_grads(f))

    def sq_norms(self, module, f: Factors, want: list[str], method):
        norms = {}
        if "weight" in want:
            norms["weight"] = ops.linear_sq_norms(f.a, f.g, method=method)
        if "bias" in want:
            norms["bias"] = squared_rows(_bias_grads(f))
        return norms

    def clipped_sum(self, module, f: Factors, coef, grads, accumulate):
        c = coef.to(f.g.dtype)
        if "weight" in grads:
            a, g = f.a, f.g
            if a.shape[-1] < g.shape[-1]:  # scale the narrower factor's rows
                a = a * c[:, None, None]
            else:
                g = g * c[:, None, None]
            rows_g, rows_a, w = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1]), grads["weight"]
            if accumulate:
                w.addmm_(rows_g.t(), rows_a)
            else:
                torch.mm(rows_g.t(), rows_a, out=w)
        if "bias" in grads:
            write_or_add(grads["bias"], c @ _bias_grads(f), accumulate)

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
        d_out, d_in = module.out_features, module.in_features
        dims = {}
        if "weight" in want:  # k_out·(k_in + 1 for the bias) <= share, k_in ~ sqrt(share)
            k_in = fit(d_in, math.isqrt(int(share)))
            k_out = fit(d_out, share // (k_in + ("bias" in want)))
            dims["weight"] = (("out", k_out, d_out), ("in", k_in, d_in))
        else:
            k_out = fit(d_out, share)
        if "bias" in want:  # projected by the weight's P_out, as LoGra does
            dims["bias"] = (("out", k_out, d_out),)
        return dims

    def project(self, module, f: Factors, mats):
        acc = acc_dtype(f.g.dtype)
        p_out = (mats.get("weight") or mats["bias"])[0]
        g = f.g.to(acc) @ p_out.t()  # [N, T, k_out]: P_out g_t
        out = {}
        if "weight" in mats:  # P_out (sum_t g_t ⊗ a_t) P_inᵀ = sum_t (P_out g_t) ⊗ (P_in a_t)
            out["weight"] = ops.seq_outer(f.a.to(acc) @ mats["weight"][1].t(), g, layout="out_in").flatten(1)
        if "bias" in mats:
            out["bias"] = g.sum(1)
        return out


def _bias_grads(f: Factors) -> torch.Tensor:
    """[N, D_out]: sum_t g_t (a view of g when T = 1: a sum over one position costs a fill and an add)."""
    if "bias" not in f.cache:
        f.cache["bias"] = f.g[:, 0] if f.g.shape[1] == 1 else f.g.sum(1)
    return f.cache["bias"]


RULE = (nn.Linear, LinearRule())
