"""nn.Embedding on ids [N, *]: the middle dims are the tokens T of each sample.

Sample n's gradient [num_embeddings, D] adds each token's output gradient into its id's row;
``padding_idx`` gets none, as in torch. Its squared norm: the ghost form sums ``g_t · g_s``
over pairs of equal tokens, the direct form adds the gradients of equal tokens first
(``indivgrad_cuda._C.embedding_norm_uses_ghost`` picks); the clipped sum is one
``index_add`` over the N·T tokens.
"""

import math

import torch
from torch import nn

from indivgrad_cuda import ops
from indivgrad_cuda.layers.base import LayerRule, acc_dtype, as_rows, cast, fit, write_or_add


class EmbeddingRule(LayerRule):
    module_type = nn.Embedding
    params = ("weight",)

    def unsupported_setting(self, module):
        if module.max_norm is not None:
            return f"max_norm={module.max_norm} renormalises the weight in place during the forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True scales by token counts over the whole batch, which mixes samples"
        return None

    def record(self, module, args, kwargs, output, n, check=False):
        ids = args[0]
        return ids.reshape(ids.shape[0], -1)

    def output_grad(self, module, grads):
        return as_rows(grads[0], 1)

    def grads(self, module, f, layout, out):
        if "weight" in out:
            w = out["weight"]
            ops.embedding_grads(f.a, cast(f.g, w.dtype), module.num_embeddings, module.padding_idx, out=w)

    def sq_norms(self, module, f, want, method):
        if "weight" not in want:
            return {}
        return {"weight": ops.embedding_sq_norms(f.a, f.g, module.padding_idx, method=method)}

    def clipped_sum(self, module, f, coef, grads, accumulate):
        if "weight" not in grads:
            return
        rows = f.g.to(acc_dtype(f.g.dtype)) * coef[:, None, None]
        if module.padding_idx is not None:
            rows = torch.where((f.a != module.padding_idx)[..., None], rows, 0)
        ids, rows, dst = f.a.reshape(-1), rows.reshape(-1, rows.shape[-1]), grads["weight"]
        if dst.dtype == rows.dtype:  # straight into the gradient, no [V, D] temporary
            if not accumulate:
                dst.zero_()
            dst.index_add_(0, ids, rows)
        else:  # half types add up in float32, rounded once
            write_or_add(
                dst, torch.zeros(dst.shape, dtype=rows.dtype, device=rows.device).index_add_(0, ids, rows), accumulate
            )

    def gram(self, module, fa, fb, want, per_param):
        if "weight" not in want:
            return {}
        return {("weight",): ops.embedding_gram(fa.a, fa.g, fb.a, fb.g, module.padding_idx)}

    def projection_dims(self, module, want, share):
        v, d = module.num_embeddings, module.embedding_dim
        k_cols = fit(d, math.isqrt(int(share)))
        return {"weight": (("rows", fit(v, share // k_cols), v), ("cols", k_cols, d))}

    def project(self, module, f, mats):
        p_rows, p_cols = mats["weight"]
        acc = acc_dtype(f.g.dtype)
        rows = p_rows.t()[f.a.reshape(-1)].view(*f.a.shape, -1)  # [N, T, k_rows]: P_rows e_id
        g = cast(f.g, acc)
        if module.padding_idx is not None:  # padding tokens get no gradient, NaN or not
            g = torch.where((f.a != module.padding_idx)[..., None], g, 0)
        return {"weight": ops.seq_outer(rows, g @ p_cols.t(), layout="in_out").flatten(1)}


RULE = EmbeddingRule()
