"""nn.Conv1d, nn.Conv2d and nn.Conv3d: a Linear over unfolded input patches.

With the input unfolded into patches ``A`` ([N, T, C_in/g·k] per group g, T output
positions, k the kernel's size) and ``G`` the gradient at the output ([N, T, C_out/g] per
group), sample n's weight gradient is group by group ``G_nᵀ A_n``: the Linear rule's
factors, with the groups folded into the batch ([N·g, T, ...]), so the Linear ops serve
them (:func:`indivgrad_cuda.ops.seq_outer`, ``linear_sq_norms``, ``linear_gram``).

Unfolding multiplies the input's memory by k, so what unfolds works a block of samples at
a time, each block's patches at most ``BLOCK_BYTES``; and where it is cheaper the
per-sample gradients are formed without unfolding, as the weight gradient of a convolution
grouped over the batch (Rochette et al. 2019: the batch folded into the channels, one
group per sample and conv group), or for few input channels as a convolution of the input
channels (as a batch) with each sample's output gradient. Each reduction picks its form per layer and call by a
cost rule measured with ``bench/norms.py``:

- per-sample gradients (materialised, and the direct norm's): by :func:`grads_form`, a
  convolution grouped over the batch (many output positions and input channels), a
  convolution of the input channels with each sample's output gradient (few input
  channels: first layers), else the unfolded GEMM;
- norms: the ghost norm ``<A Aᵀ, G Gᵀ>`` from the unfolded patches when
  :func:`norm_uses_ghost` picks it for ``(T, C_in/g·k, C_out/g)`` (fastDP's mixed ghost
  rule, ``2T² <= C_in·k·C_out``, fitted to the direct forms here), else the squares of the
  per-sample gradients of a block; for a clipped sum, the per-sample gradients whenever
  they take no more memory than the layer's factors (kept, they make the clipped sum a
  weighted sum instead of a second weight gradient);
- the clipped sum: the layer's own weight gradient with each sample's input or output
  gradient (the smaller) scaled by its coefficient (``convolution_backward``: no patches
  unfolded, the arithmetic of the summed step); or, where the norms formed the per-sample
  gradients and they take no more memory than the layer's factors, their weighted sum;
- inner products and projections: the Linear forms on unfolded blocks (groups = 1), or
  the per-sample gradients of a block (grouped convolutions, whose gradients are small).

Every padding (numbers, ``"same"`` (asymmetric for even kernels), ``"valid"``) and
``padding_mode`` is the module's own: the input is padded as its forward pads it
(``_reversed_padding_repeated_twice``), then convolved without padding. A module called
several times adds up its calls (each call is its own set of patches; they are
concatenated along T where the Linear forms need one).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from indivgrad_cuda import ops
from indivgrad_cuda.layers.base import (
    Factors,
    LayerRule,
    WholeCalls,
    acc_dtype,
    cast,
    fit,
    gram_rows,
    squared_rows,
    sum_dtype,
    write_or_add,
)

# The bytes of unfolded patches (or per-sample gradients) formed at once: as many as the
# layer's own factors (its input and output gradient: what a normal step holds for it), at
# least BLOCK_BYTES_MIN and at most BLOCK_BYTES.
BLOCK_BYTES = 64 << 20
BLOCK_BYTES_MIN = 4 << 20
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


GRAD_FORMS = ("unfold", "grouped", "channels")


def grads_form(t: int, c_in: int, groups: int, method: str = "auto") -> str:
    """How the per-sample gradients of a convolution (``c_in`` input channels per group,
    ``t`` output positions) are formed: ``"channels"`` (a convolution whose batch is the
    input channels and whose weight is each sample's output gradient, grouped over the
    samples: for few input channels and one group), ``"grouped"`` (the weight gradient of a
    convolution grouped over the batch: from 64 positions and 8 input channels), else
    ``"unfold"`` (a GEMM over unfolded patches). Measured on CPU, 2 threads (bench/norms.py,
    bench/NOTES.md): with 3 input channels "channels" took 0.5x the unfolded GEMM's time and
    0.3x the grouped one's; from 8 channels and 64 positions "grouped" took 0.1-0.7x the
    unfolded GEMM's (1.0-1.5x the layer's summed weight gradient), and 0.04x for a depthwise
    one; at 16 positions and 64-128 channels the unfolded GEMM is 2.5-5x faster than
    "grouped". ``method`` forces a form
    ("channels" only with one group: with more it is "grouped")."""
    if method != "auto":
        return "grouped" if method == "channels" and groups > 1 else method
    if c_in < 8 and groups == 1:
        return "channels"
    return "grouped" if t >= 64 and (c_in >= 8 or groups > 1) else "unfold"


def norm_uses_ghost(t: int, d_in: int, d_out: int) -> bool:
    """Whether a convolution's squared norms take the ghost form (``t`` output positions,
    ``d_in = C_in/g·k``, ``d_out = C_out/g``): when its multiply-adds ``T²(d_in + d_out)``
    are at most half the per-sample gradients' ``T·d_in·d_out``, as it also writes the
    unfolded patches, which the direct forms do not: ``2·T·(d_in + d_out) <= d_in·d_out``.
    Fitted on bench/norms.py's nine conv shapes (CPU, bench/NOTES.md), where Linear's rule
    (``linear_norm_uses_ghost``) took the ghost form at 8x8 positions and 64 channels at
    1.4x the direct form's time."""
    return 2 * t * (d_in + d_out) <= d_in * d_out


class _Geometry:
    """A convolution's shape facts, read from the module once per reduction."""

    def __init__(self, module: nn.Module, x: torch.Tensor):
        self.dims = len(module.kernel_size)
        self.kernel = tuple(module.kernel_size)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        self.c_in, self.c_out = module.in_channels, module.out_channels
        pads = list(module._reversed_padding_repeated_twice)  # (last dim's left, right, ...), as F.pad takes them
        self.pads = pads
        symmetric = all(pads[2 * i] == pads[2 * i + 1] for i in range(self.dims))
        # zeros padding the same on both sides is passed to the convolution (no padded copy)
        self.inline = module.padding_mode == "zeros" and symmetric
        self.padding = (
            tuple(pads[2 * (self.dims - 1 - i)] for i in range(self.dims)) if self.inline else (0,) * self.dims
        )
        self.mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        size = [
            x.shape[2 + i] + pads[2 * (self.dims - 1 - i)] + pads[2 * (self.dims - 1 - i) + 1] for i in range(self.dims)
        ]
        self.out_size = tuple(
            (size[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1 for i in range(self.dims)
        )
        self.t = math.prod(self.out_size)
        self.k = math.prod(self.kernel)
        self.d_in, self.d_out = self.c_in // self.groups * self.k, self.c_out // self.groups

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the convolution sees it, apart from inline padding."""
        return x if self.inline else self.fully_padded(x)

    def fully_padded(self, x: torch.Tensor) -> torch.Tensor:
        """The input with every side's padding applied (inline zeros too)."""
        return F.pad(x, self.pads, mode=self.mode) if any(self.pads) else x

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C_in, *S] -> the patches [N·g, T, C_in/g·k], group-major, in the weight's
        (channel, kernel) order (for 1-D and 2-D a transposed view of F.unfold's im2col)."""
        if self.dims <= 2:
            x = self.padded(x)
            n, lead = x.shape[0], (1,) * (2 - self.dims)  # a 1-D convolution is a 2-D one of height 1
            cols = F.unfold(
                x.reshape(n, self.c_in, *lead, *x.shape[2:]),
                lead + self.kernel,
                dilation=lead + self.dilation,
                padding=(0,) * len(lead) + self.padding,
                stride=lead + self.stride,
            )  # [N, C_in·k, T]
            return cols.view(n * self.groups, self.d_in, self.t).transpose(1, 2)
        x = self.fully_padded(x)
        for i in range(self.dims):
            x = x.unfold(2 + i, self.dilation[i] * (self.kernel[i] - 1) + 1, self.stride[i])
        if any(d > 1 for d in self.dilation):
            x = x[(slice(None),) * (2 + self.dims) + tuple(slice(None, None, d) for d in self.dilation)]
        n, d = x.shape[0], self.dims
        x = x.reshape(n, self.groups, self.c_in // self.groups, *x.shape[2:])  # [N, g, C/g, *So, *k]
        x = x.permute(0, 1, *range(3, 3 + d), 2, *range(3 + d, 3 + 2 * d))  # [N, g, *So, C/g, *k]
        return x.reshape(n * self.groups, self.t, self.d_in)

    def fold_grad(self, g: torch.Tensor) -> torch.Tensor:
        """[N, C_out, *So] -> [N·g, T, C_out/g] (a view)."""
        return g.reshape(g.shape[0] * self.groups, self.d_out, self.t).transpose(1, 2)

    def grouped_grads(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-sample weight gradients [N, C_out, C_in/g, *k]: the weight gradient of the
        convolution with the batch folded into the channels, one group per sample and group."""
        n = x.shape[0]
        folded = self.weight_grad(
            x.reshape(1, n * self.c_in, *x.shape[2:]), g.reshape(1, n * self.c_out, *g.shape[2:]), n
        )
        return folded.view(n, self.c_out, self.c_in // self.groups, *self.kernel)

    def channel_grads(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-sample weight gradients [N, C_out, C_in, *k] (one group) by a convolution of the
        input channels as a batch ([C_in, N, *S] padded) with each sample's output gradient as
        its weight, grouped over the samples: sample n's gradient at kernel offset κ is
        ``sum_t g[n, :, t] x[n, :, stride·t + dilation·κ]``, a convolution over κ with the
        roles of stride and dilation swapped."""
        n = x.shape[0]
        x = self.fully_padded(x)
        s, d, k = self.stride, self.dilation, self.kernel
        used = [s[i] * (self.out_size[i] - 1) + d[i] * (k[i] - 1) + 1 for i in range(self.dims)]
        x = x[(..., *(slice(0, u) for u in used))]  # what a stride leaves unread at the end would add offsets
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        out = conv(
            x.transpose(0, 1),
            g.reshape(n * self.c_out, 1, *g.shape[2:]),
            stride=self.dilation,
            dilation=self.stride,
            groups=n,
        )  # [C_in, N·C_out, *k]
        return out.view(self.c_in, n, self.c_out, *self.kernel).movedim(0, 2)

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """The summed weight gradient [C_out, C_in/g, *k] (the normal backward's); with the
        channels of ``copies`` samples folded into x and g, theirs stacked."""
        weight = g.new_empty(1).expand(copies * self.c_out, self.c_in // self.groups, *self.kernel)
        return torch.ops.aten.convolution_backward(
            g,
            self.padded(x),
            weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            (0,) * self.dims,
            copies * self.groups,
            (False, True, False),
        )[1]


def _held(f: Factors) -> int:
    """Bytes of a layer's factors (every call's input and output gradient)."""
    return sum(v.numel() * v.element_size() for v in (*f.a, *f.g))


def _blocks(n: int, per_sample_bytes: int, f: Factors):
    """Sample ranges whose temporaries fit the block budget of the layer with factors f (at
    least one sample each)."""
    budget = min(BLOCK_BYTES, max(BLOCK_BYTES_MIN, _held(f)))
    step = max(1, budget // max(1, per_sample_bytes))
    for n0 in range(0, n, step):
        yield n0, min(n, n0 + step)


class ConvRule(WholeCalls, LayerRule):
    grad_method = "auto"  # one of GRAD_FORMS forces the per-sample gradients' form (tests, bench)

    def matches(self, module):
        return any(isinstance(module, cls) and type(module).forward is cls.forward for cls in CONV_TYPES)

    def unsupported_setting(self, module):
        if module.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            return f"padding_mode={module.padding_mode!r} is not one of zeros, reflect, replicate, circular"
        return None

    def bad_input(self, module, x):
        dims = len(module.kernel_size) + 2
        if x.dim() != dims:
            return (
                f"was called with an unbatched input of shape {list(x.shape)}; per-sample gradients need a batch "
                f"[N, C_in, ...] of {dims} dims, dim 0 the samples"
            )
        return None

    # ------------------------------------------------------------------ pieces
    def _calls(self, module, f: Factors):
        """[(geometry, x, g)] per call; the geometries are read once per chunk."""
        if "geometry" not in f.cache:
            f.cache["geometry"] = [_Geometry(module, x) for x in f.a]
        return list(zip(f.cache["geometry"], f.a, f.g))

    def _bias_grads(self, f: Factors) -> torch.Tensor:
        """[N, C_out]: sum over the positions (and calls) of g."""
        if "bias" not in f.cache:
            total = None
            for g in f.g:
                part = g.flatten(2).sum(2)
                total = part if total is None else total + part
            f.cache["bias"] = total
        return f.cache["bias"]

    def _weight_grads(self, module, f: Factors, n0: int, n1: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Samples n0..n1's weight gradients [n, C_out, C_in/g, *k], into ``out`` when given."""
        for k, (geo, x, g) in enumerate(self._calls(module, f)):
            x, g = x[n0:n1], g[n0:n1]
            form = grads_form(geo.t, geo.c_in // geo.groups, geo.groups, self.grad_method)
            if form != "unfold":
                part = geo.grouped_grads(x, g) if form == "grouped" else geo.channel_grads(x, g)
                if out is None:
                    out = part
                elif k == 0:
                    out.copy_(part)
                else:
                    out.add_(part)
                continue
            if out is None:
                out = torch.empty((n1 - n0, *module.weight.shape), dtype=module.weight.dtype, device=x.device)
            a, gf = cast(geo.unfold(x), out.dtype), cast(geo.fold_grad(g), out.dtype)  # written in the buffer's dtype
            view = out.view(a.shape[0], geo.d_out, geo.d_in)
            if k == 0:
                ops.seq_outer(a, gf, layout="out_in", out=view)
            else:
                view.add_(ops.seq_outer(a, gf, layout="out_in"))
        return out

    def _unfolded(self, module, f: Factors, n0: int, n1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples n0..n1's patches and output gradients, [n·g, T, C_in/g·k] and [n·g, T,
        C_out/g], the calls concatenated along T."""
        parts = [(geo.unfold(x[n0:n1]), geo.fold_grad(g[n0:n1])) for geo, x, g in self._calls(module, f)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([a for a, _ in parts], 1), torch.cat([g for _, g in parts], 1)

    def _sizes(self, module, f: Factors) -> tuple[int, int, int]:
        """(T over the calls, bytes of one sample's patches, bytes of one sample's gradients)."""
        calls = self._calls(module, f)
        t = sum(geo.t for geo, _, _ in calls)
        elem = f.a[0].element_size()
        return t, t * calls[0][0].c_in * calls[0][0].k * elem, module.weight.numel() * elem

    # ------------------------------------------------------------------ reductions
    def grads(self, module, f, layout, out):
        n = f.a[0].shape[0]
        if "weight" in out:
            _, patch_bytes, _ = self._sizes(module, f)
            for n0, n1 in _blocks(n, patch_bytes, f):
                self._weight_grads(module, f, n0, n1, out["weight"][n0:n1])
        if "bias" in out:
            out["bias"].copy_(self._bias_grads(f))

    def sq_norms(self, module, f, want, method):
        norms = {}
        if "weight" in want:
            norms["weight"] = self._weight_sq_norms(module, f, method)
        if "bias" in want:
            norms["bias"] = squared_rows(self._bias_grads(f))
        return norms

    def _weight_sq_norms(self, module, f: Factors, method: str) -> torch.Tensor:
        n = f.a[0].shape[0]
        geo = self._calls(module, f)[0][0]
        t, patch_bytes, grad_bytes = self._sizes(module, f)
        # for a clipped sum, per-sample gradients taking no more memory than the factors are kept
        keep = f.cache.get("clipping", False) and n * grad_bytes <= _held(f)
        if method != "auto":
            ghost = method == "ghost"
        elif keep:  # direct: the clipped sum is then their weighted sum, no second convolution
            ghost = False
        else:
            ghost = norm_uses_ghost(t, geo.d_in, geo.d_out)
        out = torch.empty(n, dtype=acc_dtype(f.g[0].dtype), device=f.g[0].device)
        if ghost:
            # the ghost norm's T x T Grams are formed by the op in its own blocks
            for n0, n1 in _blocks(n, patch_bytes, f):
                a, g = self._unfolded(module, f, n0, n1)
                out[n0:n1] = ops.linear_sq_norms(a, g, method="ghost").view(n1 - n0, geo.groups).sum(1)
        else:
            kept = (
                torch.empty((n, *module.weight.shape), dtype=module.weight.dtype, device=out.device) if keep else None
            )
            for n0, n1 in _blocks(n, max(patch_bytes, grad_bytes), f):
                out[n0:n1] = squared_rows(self._weight_grads(module, f, n0, n1, None if kept is None else kept[n0:n1]))
            if keep:
                f.cache["weight"] = kept
        return out

    def clipped_sum(self, module, f, coef, grads, accumulate):
        if "weight" in grads and "weight" in f.cache:  # the norms' per-sample gradients: no convolution
            kept = f.cache["weight"]
            acc = acc_dtype(kept.dtype)
            write_or_add(grads["weight"], torch.tensordot(cast(coef, acc), cast(kept, acc), dims=1), accumulate)
        elif "weight" in grads:
            w = grads["weight"]
            dt = sum_dtype(f.g[0].dtype, w)
            c = cast(coef, dt)
            for k, (geo, x, g) in enumerate(self._calls(module, f)):
                x, g = cast(x, dt), cast(g, dt)
                # the layer's weight gradient with each sample scaled: scale the smaller of x and g
                if x.numel() < g.numel():
                    x = x * c.view(-1, *([1] * (x.dim() - 1)))
                else:
                    g = g * c.view(-1, *([1] * (g.dim() - 1)))
                write_or_add(w, geo.weight_grad(x, g), accumulate or k > 0)
        if "bias" in grads:
            b = self._bias_grads(f)
            dt = sum_dtype(b.dtype, grads["bias"])
            write_or_add(grads["bias"], cast(coef, dt) @ cast(b, dt), accumulate)

    def release(self, module, f):
        if "weight" in f.cache or not module.weight.requires_grad:  # kept, or no weight to sum
            if module.bias is not None:
                self._bias_grads(f)
            f.a = f.g = None

    def gram(self, module, fa, fb, want, per_param):
        out = {}
        if "weight" in want:
            out[("weight",)] = self._weight_gram(module, fa, fb)
        if "bias" in want:
            out[("bias",)] = gram_rows(self._bias_grads(fa), self._bias_grads(fb))
        return out

    def _weight_gram(self, module, fa: Factors, fb: Factors) -> torch.Tensor:
        na, nb = fa.a[0].shape[0], fb.a[0].shape[0]
        out = torch.zeros(na, nb, dtype=acc_dtype(fa.g[0].dtype), device=fa.g[0].device)
        grouped = module.groups > 1  # the per-sample gradients are small: contract them
        _, pa, ga = self._sizes(module, fa)
        _, pb, _ = self._sizes(module, fb)
        for b0, b1 in _blocks(nb, max(pb, ga) * 2, fb):
            right = self._weight_grads(module, fb, b0, b1) if grouped else self._unfolded(module, fb, b0, b1)
            for a0, a1 in _blocks(na, max(pa, ga) * 2, fa):
                if grouped:
                    out[a0:a1, b0:b1] = gram_rows(self._weight_grads(module, fa, a0, a1), right)
                else:
                    xa, gla = self._unfolded(module, fa, a0, a1)
                    out[a0:a1, b0:b1] = ops.linear_gram(xa, gla, *right)
        return out

    def projection_dims(self, module, want, share):
        """The weight as the matrix [C_out, C_in/g·k]: ``P_out W P_inᵀ`` (k_in ~ sqrt(share));
        the bias by the weight's ``P_out``, as the Linear rule does."""
        d_out, d_in = module.out_channels, module.weight[0].numel()
        dims = {}
        if "weight" in want:
            k_in = fit(d_in, math.isqrt(int(share)))
            k_out = fit(d_out, share // (k_in + ("bias" in want)))
            dims["weight"] = (("out", k_out, d_out), ("in", k_in, d_in))
        else:
            k_out = fit(d_out, share)
        if "bias" in want:
            dims["bias"] = (("out", k_out, d_out),)
        return dims

    def project(self, module, f, mats):
        acc = acc_dtype(f.g[0].dtype)
        n = f.a[0].shape[0]
        out = {}
        if "weight" in mats:
            # P_out W_n P_inᵀ = sum over positions and groups j of (P_out[:, j] g_tj) ⊗ (P_in a_tj)
            p_out, p_in = mats["weight"]
            geo = self._calls(module, f)[0][0]
            gs = geo.groups
            p_out_g = p_out.view(p_out.shape[0], gs, geo.d_out)
            _, patch_bytes, _ = self._sizes(module, f)
            rows = []
            for n0, n1 in _blocks(n, patch_bytes, f):
                a, g = self._unfolded(module, f, n0, n1)  # [n·g, T, d_in], [n·g, T, d_out]
                a = (cast(a, acc) @ p_in.t()).view(n1 - n0, -1, p_in.shape[0])  # [n, g·T, k_in]
                g = cast(g, acc).reshape(n1 - n0, gs, -1, geo.d_out)
                g = torch.einsum("njto,kjo->njtk", g, p_out_g).reshape(n1 - n0, -1, p_out.shape[0])
                rows.append(ops.seq_outer(a, g, layout="out_in").flatten(1))
            out["weight"] = torch.cat(rows) if len(rows) > 1 else rows[0]
        if "bias" in mats:
            (p_bias,) = mats["bias"]
            out["bias"] = cast(self._bias_grads(f), acc) @ p_bias.t()
        return out


RULE = ConvRule()
