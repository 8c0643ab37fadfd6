"""Tied parameters: one parameter used by several layers (GPT-2's ``wte`` and ``lm_head``; a
weight shared by two modules). Sample n's gradient is the sum of its uses' contributions
``g_n = sum_u g_u[n]``, so its squared norm is ``sum_u ||g_u[n]||² + 2 sum_{u<v} <g_u[n],
g_v[n]>`` and an inner product between two sets ``sum_{u,v} <g_u^a[n], g_v^b[m]>``.

Uses of one kind (Linear with Linear, Embedding with Embedding, same settings) are merged
first: their factors concatenated along T are one use. Cross terms between kinds come from
the factors where a formula exists, never forming a [V, D] gradient per sample: an Embedding
(ids, ``g_e`` [T_e, D]) with a Linear whose weight is that table (``a`` [T_l, D], ``g_l``
[T_l, V]) gives ``sum_t sum_s g_l[s, id_t] (g_e[t] · a[s])``. Other pairs form both uses'
per-sample gradients a block of samples at a time (``CROSS_BLOCK_BYTES`` each).
"""

from dataclasses import dataclass
from typing import Optional

import torch

from indivgrad_cuda.layers.base import Factors, LayerRule, acc_dtype, cast
from indivgrad_cuda.layers.embedding import EmbeddingRule
from indivgrad_cuda.layers.linear import LinearRule
from indivgrad_cuda.layers.per_sample import PerSampleRule

CROSS_BLOCK_BYTES = 64 << 20  # per block of per-sample gradients a generic cross term forms
CROSS_BLOCK_ELEMENTS = 1 << 24  # of the [n, m, T_e, T_l] products of an Embedding x Linear block


@dataclass
class Use:
    """One layer's use of a tied parameter in a chunk: its rule, module, the parameter's
    attribute there, and the layer's factors."""

    rule: LayerRule
    module: torch.nn.Module
    attr: str
    f: Factors
    n: int  # samples in the chunk

    def kind(self) -> Optional[tuple]:
        """Uses of equal kinds merge by concatenating their factors along T (None: never)."""
        if isinstance(self.rule, EmbeddingRule):
            return ("embedding", self.module.padding_idx)
        if type(self.rule) is LinearRule and self.attr == "weight":
            return ("linear",)
        return None

    def grads(self, rows: slice) -> torch.Tensor:
        """[n, *param.shape]: this use's per-sample gradients of samples ``rows``."""
        if isinstance(self.rule, PerSampleRule):
            self.rule._grads(self.module, self.f)  # formed once for the chunk, then cut
        f = self.f.rows(rows.start, rows.stop)
        p = self.module.get_parameter(self.attr)
        out = torch.empty((rows.stop - rows.start, *p.shape), dtype=p.dtype, device=p.device)
        self.rule.grads(self.module, f, "out_in", {self.attr: out})
        return out


def merge(uses: list[Use]) -> list[Use]:
    """Uses of one kind merged into one (factors concatenated along T), in first-use order."""
    out, by_kind = [], {}
    for u in uses:
        k = u.kind()
        if k is None or k not in by_kind:
            if k is not None:
                by_kind[k] = len(out)
            out.append(u)
            continue
        first = out[by_kind[k]]
        f = Factors(torch.cat([first.f.a, u.f.a], 1), torch.cat([first.f.g, u.f.g], 1))
        out[by_kind[k]] = Use(first.rule, first.module, first.attr, f, first.n)
    return out


def sq_norms(uses: list[Use], method: str) -> torch.Tensor:
    """[N] squared norms of the sum of the (merged) uses' per-sample gradients."""
    total = None
    for i, u in enumerate(uses):
        part = u.rule.sq_norms(u.module, u.f, [u.attr], method)[u.attr]
        for v in uses[i + 1 :]:
            part = part + 2 * cross(u, v, diagonal=True).to(part.dtype)
        total = part if total is None else total + part
    return total


def gram(ua: Use, ub: Use) -> torch.Tensor:
    """[N_a, N_b] inner products of one use's per-sample gradients in set a and one in set b."""
    same_kind = ua.kind() is not None and ua.kind() == ub.kind()
    if same_kind or (type(ua.rule) is type(ub.rule) and ua.module is ub.module):  # the rule's own Gram
        return ua.rule.gram(ua.module, ua.f, ub.f, [ua.attr], True)[(ua.attr,)]
    return cross(ua, ub, diagonal=False)


def cross(u: Use, v: Use, diagonal: bool) -> torch.Tensor:
    """``<g_u[n], g_v[n]>`` [N] (diagonal: both uses of one set) or ``<g_u[n], g_v[m]>`` [N_u, N_v]."""
    ku, kv = u.kind(), v.kind()
    if ku and kv and ku[0] == "embedding" and kv[0] == "linear":
        return _embedding_linear(u, v, diagonal)
    if ku and kv and ku[0] == "linear" and kv[0] == "embedding":
        k = _embedding_linear(v, u, diagonal)
        return k if diagonal else k.t()
    return _by_blocks(u, v, diagonal)


def _embedding_linear(e: Use, lin: Use, diagonal: bool) -> torch.Tensor:
    ids, ge = e.f.a, e.f.g
    a, gl = lin.f.a, lin.f.g
    acc = acc_dtype(gl.dtype)
    ge, a, gl = cast(ge, acc), cast(a, acc), cast(gl, acc)
    if e.module.padding_idx is not None:  # padding tokens add nothing to the table's gradient
        ge = torch.where((ids != e.module.padding_idx)[..., None], ge, 0)
    te, tl = ids.shape[1], a.shape[1]
    if diagonal:
        n = ids.shape[0]
        out = torch.empty(n, dtype=acc, device=gl.device)
        step = max(1, CROSS_BLOCK_ELEMENTS // max(1, te * tl))
        for n0 in range(0, n, step):
            s = slice(n0, min(n, n0 + step))
            m = torch.bmm(ge[s], a[s].transpose(1, 2))  # [n, T_e, T_l]: g_e[t] · a[s]
            w = torch.gather(gl[s], 2, ids[s, None, :].expand(-1, tl, -1))  # [n, T_l, T_e]: g_l[s, id_t]
            out[s] = (m * w.transpose(1, 2)).sum((1, 2))
        return out
    na, nb = ids.shape[0], a.shape[0]
    out = torch.empty(na, nb, dtype=acc, device=gl.device)
    step_b = max(1, min(nb, CROSS_BLOCK_ELEMENTS // max(1, te * tl)))
    step_a = max(1, CROSS_BLOCK_ELEMENTS // max(1, te * tl * step_b))
    for m0 in range(0, nb, step_b):
        sb = slice(m0, min(nb, m0 + step_b))
        for n0 in range(0, na, step_a):
            sa = slice(n0, min(na, n0 + step_a))
            dots = torch.einsum("ntd,msd->nmts", ge[sa], a[sb])
            rows = gl[sb][:, :, ids[sa].reshape(-1)]  # [m, T_l, n * T_e]
            w = rows.reshape(rows.shape[0], tl, -1, te).permute(2, 0, 3, 1)  # [n, m, T_e, T_l]
            out[sa, sb] = (dots * w).sum((2, 3))
    return out


def _by_blocks(u: Use, v: Use, diagonal: bool) -> torch.Tensor:
    p = u.module.get_parameter(u.attr)
    step = max(1, CROSS_BLOCK_BYTES // max(1, p.numel() * p.element_size()))
    acc = acc_dtype(p.dtype)
    nu, nv = u.n, v.n
    if diagonal:
        out = torch.empty(nu, dtype=acc, device=p.device)
        for n0 in range(0, nu, step):
            s = slice(n0, min(nu, n0 + step))
            out[s] = (cast(u.grads(s).flatten(1), acc) * cast(v.grads(s).flatten(1), acc)).sum(1)
        return out
    out = torch.empty(nu, nv, dtype=acc, device=p.device)
    for n0 in range(0, nu, step):
        s = slice(n0, min(nu, n0 + step))
        gu = cast(u.grads(s).flatten(1), acc)
        for m0 in range(0, nv, step):
            t = slice(m0, min(nv, m0 + step))
            out[s, t] = gu @ cast(v.grads(t).flatten(1), acc).t()
    return out
