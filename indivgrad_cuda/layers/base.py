"""What a layer rule is: how one supported layer type turns its factors into per-sample
gradients, squared norms and a clipped sum (see :mod:`indivgrad_cuda.layers`)."""

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class Factors:
    """One layer's factors for a chunk of N samples: ``a``, what the layer saw (its input,
    [N, T, ...]), and ``g``, the gradient at its output ([N, T, ...]), with the calls of a
    module used several times in one forward concatenated along T."""

    a: Any
    g: Any
    cache: dict = field(default_factory=dict)  # what a rule computes once for several reductions

    def rows(self, n0: int, n1: int) -> "Factors":
        """Samples n0..n1 of these factors: of the per-sample gradients when a rule has formed
        them (a fallback's records are calls, not rows), else of every tensor in a and g."""
        if "grads" in self.cache:
            cut = Factors(None, None)
            cut.cache["grads"] = {k: v[n0:n1] for k, v in self.cache["grads"].items()}
            return cut
        return Factors(_rows(self.a, n0, n1), _rows(self.g, n0, n1))


def _rows(t, n0, n1):
    """Rows n0..n1 of every tensor in t (a tensor, or a dict, list or tuple of them)."""
    if isinstance(t, torch.Tensor):
        return t[n0:n1]
    if isinstance(t, dict):
        return {k: _rows(v, n0, n1) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return type(t)(_rows(v, n0, n1) for v in t)
    return t


def computed_input(x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """A layer's floating-point input (detached) as its op computed with it: in the dtype of
    its output, and so of the gradient arriving there. Under autocast that is the op's autocast
    dtype (a Linear's or a convolution's float32 input rounded to bfloat16/float16 as autocast
    rounds it for its GEMM; a CUDA LayerNorm's half input in float32); without, its own."""
    x = x.detach()
    return cast(x, output.dtype) if x.is_floating_point() else x


def as_rows(t: torch.Tensor, dims: int) -> torch.Tensor:
    """[N, *, last dims] as [N, T, last dims] (t itself when it is so already: a reshape
    costs a dispatch even then)."""
    if t.dim() == dims + 2:
        return t
    return t.reshape(t.shape[0], -1, *t.shape[t.dim() - dims :])


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype: t itself when it has it (a call of Tensor.to costs a dispatch even then,
    which adds up over the layers of a small model)."""
    return t if t.dtype == dtype else t.to(dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms of float16/bfloat16 gradients accumulate in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sum_dtype(factors: torch.dtype, dst: torch.Tensor) -> torch.dtype:
    """The dtype a clipped sum is formed in: the wider of the factors' and its destination's
    (float32 for half factors into a float32 parameter's gradient, as under autocast)."""
    return torch.promote_types(factors, dst.dtype)


def squared_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N]: each sample's squared norm, accumulated in acc_dtype."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=acc_dtype(t.dtype)).square()


class LayerRule:
    """Per supported layer type. ``params`` names the module's parameter attributes a rule
    knows; a module's trainable ones among them get results. ``module_type`` is the type it
    serves (with that type's forward: a subclass that overrides it is not recognised).

    Precision: ``record`` keeps the input in the dtype the layer's op computed in
    (:func:`computed_input`), so a layer's factors share one dtype; the reductions compute in
    at least float32 for half factors (norms, Grams, projections in :func:`acc_dtype`; a
    clipped sum in the wider of the factors' and the parameter's dtype) and write each result
    in its destination's dtype."""

    params = ("weight", "bias")
    module_type: type = nn.Module
    # the rule serves the parameters of the module's submodules too (their forward is never called)
    owns_subtree = False
    # the factors come from inside the module's forward (intercept()), not from its input and output
    inner = False
    served_by = "rule"  # how describe() reports it

    def matches(self, module: nn.Module) -> bool:
        cls = self.module_type
        return isinstance(module, cls) and type(module).forward is cls.forward

    def bind(self, path: str, module: nn.Module, fallback: bool = True) -> "LayerRule":
        """The rule for the module at ``path`` (rules that keep state per module return a new
        one); ``fallback``: whether the engine may serve it by the fallback instead."""
        return self

    def attrs(self, module: nn.Module) -> list[str]:
        """The parameter attributes this rule serves on ``module`` (dotted below it when it owns its subtree)."""
        return [a for a, p in module.named_parameters(recurse=False) if a in self.params]

    def name(self, module: nn.Module) -> str:
        return type(module).__name__

    def unsupported_setting(self, module: nn.Module) -> Optional[str]:
        """Why this module's settings cannot be served (None: they can)."""
        return None

    def bad_input(self, module: nn.Module, x: torch.Tensor) -> Optional[str]:
        """Why the layer's input x cannot be a batch of samples (None: it can); the capture
        prefixes the module's name."""
        return None

    def intercept(self, module: nn.Module, n: int, tap):
        """For an ``inner`` rule: a context active during one call of the module, which passes
        each tensor whose gradient it needs through ``tap`` (returning the tapped tensor) and
        whose ``pieces`` are the call's record."""
        raise NotImplementedError

    def taps(self, output) -> list[int]:
        """Which leaves of the output (torch.utils._pytree order) carry gradients to record."""
        return [0]

    def record(self, module: nn.Module, args: tuple, kwargs: dict, output, n: int, check: bool = False) -> Any:
        """What to keep of one call's input, as [N, T, ...] (detached); n is the batch; ``check``:
        the first call with this input signature (a rule may verify its assumptions then)."""
        raise NotImplementedError

    def output_grad(self, module: nn.Module, grads: list[torch.Tensor]) -> Any:
        """The gradients at one call's tapped outputs (one per taps() leaf), as the rule keeps them."""
        raise NotImplementedError

    def combine(self, records: list[torch.Tensor], grads: list[torch.Tensor]) -> Factors:
        if len(records) == 1:
            return Factors(records[0], grads[0])
        return Factors(torch.cat(records, 1), torch.cat(grads, 1))

    def grad_shape(self, module: nn.Module, attr: str, layout: str) -> tuple:
        """Shape of one sample's gradient of ``module.<attr>`` in ``layout``."""
        return tuple(module.get_parameter(attr).shape)

    def grads(self, module: nn.Module, f: Factors, layout: str, out: dict[str, torch.Tensor]) -> None:
        """Writes per-sample gradients [N, *grad_shape] into ``out[attr]`` (the wanted attrs)."""
        raise NotImplementedError

    def sq_norms(self, module: nn.Module, f: Factors, want: list[str], method: str) -> dict[str, torch.Tensor]:
        """Squared per-sample gradient norms [N] (acc_dtype) of the wanted attrs."""
        raise NotImplementedError

    def write_sq_norms(self, module: nn.Module, f: Factors, want: list[str], method: str, out: torch.Tensor) -> None:
        """Writes the wanted attrs' squared norms as the rows of ``out`` ([len(want), N], in
        want's order, acc_dtype; e.g. rows of the engine's [P, N] buffer): a rule with an op
        that forms all of them at once overrides this (one dispatch per layer, not several)."""
        got = self.sq_norms(module, f, want, method)
        for k, attr in enumerate(want):
            if attr in got:
                out[k].copy_(got[attr])
            else:
                out[k].zero_()

    def clipped_sum(
        self, module: nn.Module, f: Factors, coef: torch.Tensor, grads: dict[str, torch.Tensor], accumulate: bool
    ) -> None:
        """``grads[attr] (+)= sum_n coef[n] * (sample n's gradient)`` for the wanted attrs."""
        raise NotImplementedError

    def release(self, module: nn.Module, f: Factors) -> None:
        """Called by the clipped sum once the layer's norms are taken (its factors are held
        until every layer's are): drops what the clipped sum will not need (a rule that
        kept its per-sample gradients needs no factors)."""

    def gram(
        self, module: nn.Module, fa: Factors, fb: Factors, want: list[str], per_param: bool
    ) -> dict[tuple[str, ...], torch.Tensor]:
        """Inner products [N_a, N_b] (acc_dtype) between set a's and set b's per-sample
        gradients of the wanted attrs, keyed by the attrs each covers: one attr per key
        when ``per_param``, else any grouping (the values add up to the layer's total)."""
        raise NotImplementedError

    def projection_dims(self, module: nn.Module, want: list[str], share: float) -> dict[str, tuple]:
        """For each wanted attr, its projection's factor matrices as ``(key, k, d)``: a
        ``[k, d]`` Gaussian matrix named ``key`` (shared by the attrs that name it), two for a
        matrix-shaped gradient ``[R, C]`` (``P_R W P_Cᵀ``), one for a vector (``P w``), with
        the layer's dims ``sum_attr prod(k)`` at most ``share`` (and at least 1 per attr)."""
        raise NotImplementedError

    def project(self, module: nn.Module, f: Factors, mats: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """Each attr's projected per-sample gradients [N, prod(k)] (acc_dtype) by its
        matrices ``mats[attr]`` (as projection_dims ordered them), without forming them."""
        raise NotImplementedError


class WholeCalls:
    """For rules that keep each call's input and output gradient whole (calls of any shapes,
    each reduced on its own): ``Factors.a`` and ``.g`` are lists, one entry per call."""

    def record(self, module, args, kwargs, output, n, check=False):
        return computed_input(args[0], output)

    def output_grad(self, module, grads):
        return grads[0]

    def combine(self, records, grads):
        return Factors(list(records), list(grads))


def fit(d: int, k: float) -> int:
    """A projection's dimension: k rounded down, at least 1 and at most d."""
    return max(1, min(d, int(k)))


def parameter_projection_dims(attr: str, shape, share: float) -> tuple:
    """A parameter's projection matrices ``(key, k, d)`` for its gradient of ``shape``: one
    for a vector (``P w``), two for ``[R, *C]`` (``P_R W P_Cᵀ`` with W as [R, prod(C)]), with
    ``prod(k)`` at most ``share`` (and at least 1)."""
    if len(shape) <= 1:
        d = math.prod(shape)
        return ((attr, fit(d, share), d),)
    rows, cols = shape[0], math.prod(shape[1:])
    k_cols = fit(cols, math.isqrt(int(share)))
    return ((f"{attr}/rows", fit(rows, share // k_cols), rows), (f"{attr}/cols", k_cols, cols))


def gram_rows(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[N_a, N_b] inner products of the rows of u [N_a, ...] and v [N_b, ...], in acc_dtype."""
    acc = acc_dtype(u.dtype)
    return u.flatten(1).to(acc) @ v.flatten(1).to(acc).t()


def mm_into(dst: torch.Tensor, left: torch.Tensor, right: torch.Tensor, accumulate: bool) -> None:
    """``dst (+)= left @ right``: straight into dst when it has the factors' dtype, else
    formed in theirs and written in dst's."""
    if dst.dtype != left.dtype:
        write_or_add(dst, left @ right, accumulate)
    elif accumulate:
        dst.addmm_(left, right)
    else:
        torch.mm(left, right, out=dst)


def mv_into(dst: torch.Tensor, mat: torch.Tensor, vec: torch.Tensor, accumulate: bool) -> None:
    """``dst (+)= mat @ vec`` with dst of any shape holding mat's rows (one op when dst is
    contiguous with the operands' dtype)."""
    flat = dst.view(-1) if dst.is_contiguous() else None
    if flat is None or dst.dtype != mat.dtype:
        write_or_add(dst, (mat @ vec).view(dst.shape), accumulate)
    elif accumulate:
        flat.addmv_(mat, vec)
    else:
        torch.mv(mat, vec, out=flat)


def sum_rows_into(dst: torch.Tensor, rows: torch.Tensor, accumulate: bool) -> None:
    """``dst (+)= rows.sum(0)`` (one op when not accumulating into dst of rows' dtype)."""
    if accumulate or dst.dtype != rows.dtype:
        write_or_add(dst, rows.sum(0), accumulate)
    else:
        torch.sum(rows, 0, out=dst)


def write_or_add(dst: torch.Tensor, value: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        dst.add_(value)
    else:
        dst.copy_(value)
