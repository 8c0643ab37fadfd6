"""nn.MultiheadAttention: all its parameters (``in_proj_weight`` or ``q/k/v_proj_weight``,
``in_proj_bias``, ``bias_k``/``bias_v``, and ``out_proj``'s, which MHA's forward uses
without calling ``out_proj``), ``batch_first`` either way, ``key_padding_mask``, 2-D or 3-D
``attn_mask``, ``need_weights`` either way.

The rule takes the factors of MHA's own projections: while MHA's forward runs,
``torch.nn.functional.linear`` (the name ``F.multi_head_attention_forward`` calls) is
wrapped, so each call with (a block of rows of) one of its weights keeps the input and taps
the output (a ``TorchFunctionMode`` would see ``multi_head_attention_forward`` whole, not the
calls inside it); so each projection is a Linear on those rows
(``in_proj_weight``'s q, k and v blocks are disjoint: no cross terms) and every reduction is
the Linear one, with MHA's attention itself run once, as in a normal step. MHA computes
seq-first inside (it transposes ``batch_first`` inputs), so a projection's input is ``[T, N,
D]`` or ``[T·N, D]`` with the batch in dim -2. With ``bias_k``/``bias_v`` (concatenated to
the keys, not projected) MHA is served by the per-module fallback instead
(:class:`MultiheadAttentionFallback`: torch.func over MHA's forward, its batch dims known).
"""

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from indivgrad_cuda import ops
from indivgrad_cuda.errors import UnsupportedModuleError
from indivgrad_cuda.layers.base import (
    Factors,
    LayerRule,
    acc_dtype,
    cast,
    computed_input,
    gram_rows,
    mm_into,
    parameter_projection_dims,
    squared_rows,
    sum_dtype,
)
from indivgrad_cuda.layers.fallback import FallbackRule

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class MultiheadAttentionRule(LayerRule):
    module_type = nn.MultiheadAttention
    owns_subtree = True
    inner = True  # its factors come from inside its forward (see intercept)

    def attrs(self, module):
        return [a for a, _ in module.named_parameters()]

    def bind(self, path, module, fallback=True):
        if module.bias_k is not None or module.bias_v is not None:
            return MultiheadAttentionFallback(path)
        return self

    def taps(self, output):
        return []

    def intercept(self, module, n, tap):
        return _Projections(module, n, tap)

    def output_grad(self, module, grads):
        return grads

    def combine(self, records, grads):
        """{(weight attr, row0, row1, bias attr, row0, row1): (a, g)} over the calls, each [N, T, D]."""
        pieces = {}
        for record, call_grads in zip(records, grads):
            for (key, a), g in zip(record, call_grads):
                g = _batch_major(g, a.shape[0])
                if key in pieces:
                    a0, g0 = pieces[key]
                    a, g = torch.cat([a0, a], 1), torch.cat([g0, g], 1)
                pieces[key] = (a, g)
        return Factors(pieces, None)

    # -------------------------------------------------------------- reductions

    def grads(self, module, f, layout, out):
        for t in out.values():
            t.zero_()
        for (w, r0, r1, b, b0, b1), (a, g) in f.a.items():
            if w in out:
                dt = out[w].dtype
                out[w][:, r0:r1] += ops.seq_outer(cast(a, dt), cast(g, dt), layout="out_in")
            if b in out:
                out[b][:, b0:b1] += g.sum(1)

    def sq_norms(self, module, f, want, method):
        norms = {}
        for (w, _, _, b, _, _), (a, g) in f.a.items():
            if w in want:
                norms[w] = norms.get(w, 0) + ops.linear_sq_norms(a, g, method=method)
            if b in want:
                norms[b] = norms.get(b, 0) + squared_rows(g.sum(1))
        return norms

    def clipped_sum(self, module, f, coef, grads, accumulate):
        if not accumulate:
            for t in grads.values():
                t.zero_()
        for (w, r0, r1, b, b0, b1), (a, g) in f.a.items():
            dt = sum_dtype(g.dtype, next(iter(grads.values()))) if grads else g.dtype
            a, g, c = cast(a, dt), cast(g, dt), cast(coef, dt)
            if w in grads:
                rows_g = (g * c[:, None, None]).reshape(-1, g.shape[-1])
                mm_into(grads[w][r0:r1], rows_g.t(), a.reshape(-1, a.shape[-1]), True)
            if b in grads:
                grads[b][b0:b1] += c @ g.sum(1)

    def gram(self, module, fa, fb, want, per_param):
        out = {}
        for key, (a, g) in fa.a.items():
            if key not in fb.a:
                continue
            ab, gb = fb.a[key]
            w, _, _, b, _, _ = key
            if w in want:
                out[(w,)] = out.get((w,), 0) + ops.linear_gram(a, g, ab, gb)
            if b in want:
                out[(b,)] = out.get((b,), 0) + gram_rows(g.sum(1), gb.sum(1))
        return out

    def projection_dims(self, module, want, share):
        return {a: parameter_projection_dims(a, module.get_parameter(a).shape, share / len(want)) for a in want}

    def project(self, module, f, mats):
        out = {}
        for (w, r0, r1, b, b0, b1), (a, g) in f.a.items():
            acc = acc_dtype(g.dtype)
            if w in mats:
                rows, cols = mats[w]
                part = ops.seq_outer(
                    cast(a, acc) @ cols.t(), cast(g, acc) @ rows[:, r0:r1].t(), layout="out_in"
                ).flatten(1)
                out[w] = out.get(w, 0) + part
            if b in mats:
                out[b] = out.get(b, 0) + cast(g, acc).sum(1) @ mats[b][0][:, b0:b1].t()
        return out


def _batch_major(t: torch.Tensor, n: int) -> torch.Tensor:
    """[T, N, D] or [T·N, D] (seq-first, MHA's inside) -> [N, T, D]."""
    return t.reshape(-1, n, t.shape[-1]).transpose(0, 1)


class _Projections:
    """Active during one MHA call: taps each F.linear on one of its weights (or a block of its
    rows) and keeps [(key, input as [N, T, D])], key = (weight attr, its rows, bias attr, its
    rows): with kdim/vdim, the q, k and v weights are separate but their biases are blocks of
    in_proj_bias.
    Calls on other weights (another thread's) pass through untouched."""

    def __init__(self, module, n, tap):
        self.n, self.tap = n, tap
        self.params = list(module.named_parameters())
        self.pieces = []
        self.original = None

    def __enter__(self):
        self.original = F.linear
        F.linear = self._linear
        return self

    def __exit__(self, *exc):
        F.linear = self.original

    def _locate(self, t):
        if t is None:
            return None, 0, 0
        for attr, p in self.params:
            if t is p or (t._base is p and t.dim() == p.dim() and t.shape[1:] == p.shape[1:]):
                r0 = (t.storage_offset() - p.storage_offset()) // (p.stride(0) if p.dim() > 1 else 1)
                return attr, r0, r0 + t.shape[0]
        return None, 0, 0

    def _linear(self, x, w, b=None):
        out = self.original(x, w, b)
        attr, r0, r1 = self._locate(w)
        if attr is not None:
            battr, b0, b1 = self._locate(b)
            if not ((x.dim() == 3 and x.shape[1] == self.n) or (x.dim() == 2 and x.shape[0] % self.n == 0)):
                raise UnsupportedModuleError(
                    f"MultiheadAttention: a projection's input of shape {list(x.shape)} has no batch of {self.n} "
                    f"in dim -2"
                )
            self.pieces.append(((attr, r0, r1, battr, b0, b1), _batch_major(computed_input(x, out), self.n)))
            return self.tap(out)
        return out


class MultiheadAttentionFallback(FallbackRule):
    """MHA with ``bias_k``/``bias_v``: torch.func over its forward, with its batch dims."""

    module_type = nn.MultiheadAttention
    owns_subtree = True

    def batch_dims(self, module, args, kwargs, n):
        bound = _SIGNATURE.bind(module, *args, **kwargs)
        named = dict(bound.arguments)
        del named["self"]
        seq = 0 if module.batch_first else 1
        dims, unsqueeze = {}, {}
        for name in ("query", "key", "value"):
            t = named[name]
            if t.dim() != 3 or t.shape[seq] != n:
                raise UnsupportedModuleError(
                    f"'{self.path}' (MultiheadAttention): {name} must be batched with the batch (N={n}) in dim {seq} "
                    f"(batch_first={module.batch_first}), got shape {list(t.shape)}"
                )
            dims[name], unsqueeze[name] = seq, True
        if named.get("key_padding_mask") is not None:
            dims["key_padding_mask"], unsqueeze["key_padding_mask"] = 0, True
        mask = named.get("attn_mask")
        if mask is not None and mask.dim() == 3:  # [N * heads, L, S]: each sample's [heads, L, S]
            named["attn_mask"] = mask.reshape(n, -1, *mask.shape[1:])
            dims["attn_mask"], unsqueeze["attn_mask"] = 0, False
        ids = {id(v): k for k, v in named.items() if isinstance(v, torch.Tensor)}
        leaves = tree_leaves(((), named))
        in_dims = [dims.get(ids.get(id(v))) if isinstance(v, torch.Tensor) else None for v in leaves]
        flags = [bool(unsqueeze.get(ids.get(id(v)))) if isinstance(v, torch.Tensor) else False for v in leaves]
        return (), named, in_dims, flags

    def output_dims(self, module, outputs):
        return [0 if module.batch_first else 1] + [0] * (len(outputs) - 1)


RULE = MultiheadAttentionRule()
