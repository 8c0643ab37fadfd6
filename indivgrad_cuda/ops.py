"""The fused per-sample-gradient ops.

For a linear layer ``C = X W`` with ``G = dL/dC``, sample n's weight gradient is the outer
product ``X[n] ⊗ G[n]``. :func:`outer` writes those outer products; :func:`act_outer` first
forms ``G = upstream * act'(pre)`` (the gradient through the layer's activation) and writes
both G (the per-sample bias gradient) and the outer products, in one pass on CUDA.

Both ops are registered with the PyTorch dispatcher as ``torch.ops.indivgrad_cuda.*`` (CPU
and CUDA kernels, fake implementations for ``torch.compile``); these wrappers add keyword
arguments and ``out=`` buffers.

Layouts: ``"in_out"`` gives ``[N, D_in, D_out]`` (the W of ``C = X W``); ``"out_in"`` gives
``[N, D_out, D_in]``, ``nn.Linear.weight``'s layout (what torch.func and Opacus return).
Each layout is written directly, never as a transposed copy.

dtypes: float32, float64, float16, bfloat16; half types compute in float32 and are rounded
once when written. NaN and inf propagate exactly as in torch's own autograd formulas for
each activation (e.g. relu passes the upstream gradient wherever ``not pre <= 0``).
"""

from typing import Optional

import torch

from indivgrad_cuda._loader import load_extension

_C, _ = load_extension()
from indivgrad_cuda._fake import _outer_shape  # noqa: E402  (importing registers the fake implementations)

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu", "softplus")
LAYOUTS = ("in_out", "out_in")

_ops = torch.ops.indivgrad_cuda


def outer(
    x: torch.Tensor, g: torch.Tensor, *, layout: str = "in_out", out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-sample outer products: ``out[n] = x[n] ⊗ g[n]``.

    Args:
        x: ``[N, D_in]`` layer inputs.
        g: ``[N, D_out]`` gradients with respect to the layer's outputs.
        layout: ``"in_out"`` → ``[N, D_in, D_out]``; ``"out_in"`` → ``[N, D_out, D_in]``.
        out: optional buffer of exactly that shape, x's dtype and device, contiguous, not
            overlapping ``x`` or ``g``; written in place and returned.
    """
    if out is None:
        return _ops.outer(x, g, layout)
    _ops.outer_out(x, g, layout, out)
    return out


def act_outer(
    x: torch.Tensor,
    upstream: torch.Tensor,
    pre: torch.Tensor,
    activation: str = "relu",
    *,
    layout: str = "in_out",
    out: Optional[torch.Tensor] = None,
    bias_out: Optional[torch.Tensor] = None,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    beta: float = 1.0,
    threshold: float = 20.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient through an activation, then per-sample outer products, fused.

    With ``y = act(pre)`` and ``upstream = dL/dy``: ``grad_bias = upstream * act'(pre)``
    (``[N, D_out]``; this is G, the per-sample bias gradient) and
    ``grad_weight[n] = x[n] ⊗ grad_bias[n]`` in the chosen ``layout``.

    Args:
        x: ``[N, D_in]`` layer inputs.
        upstream: ``[N, D_out]`` gradient reaching the activation's output.
        pre: ``[N, D_out]`` pre-activations (the layer's linear output).
        activation: one of :data:`ACTIVATIONS`. Derivatives follow torch's autograd,
            conventions included (relu'(0) = 0; elu at 0 takes the ``alpha`` branch;
            softplus is linear where ``beta * pre > threshold``).
        layout: ``"in_out"`` or ``"out_in"`` (see module docs).
        out, bias_out: optional buffers for grad_weight and grad_bias (exact shape, x's
            dtype and device, contiguous, not overlapping any input or each other).
        negative_slope: leaky_relu's slope. alpha: elu's alpha. beta, threshold: softplus's.

    Returns:
        ``(grad_weight, grad_bias)``.
    """
    args = (x, upstream, pre, activation, layout, negative_slope, alpha, beta, threshold)
    if out is None and bias_out is None:
        return _ops.act_outer(*args)
    well_formed = x.dim() == upstream.dim() == 2  # else the op raises the error naming the argument
    if out is None:
        out = x.new_empty(_outer_shape(x, upstream, layout) if well_formed else (0,))
    if bias_out is None:
        bias_out = x.new_empty(upstream.shape)
    _ops.act_outer_out(*args, out, bias_out)
    return out, bias_out


# ---------------------------------------------------------------- the layer rules' ops
# Device-generic (CPU and CUDA through ATen; the T = 1 case of seq_outer is the fused outer
# kernel). Norms come back in float32 for float16/bfloat16 inputs.

NORM_METHODS = ("auto", "ghost", "direct")


def seq_outer(
    x: torch.Tensor, g: torch.Tensor, *, layout: str = "in_out", out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-sample gradients of a Linear layer over T positions: ``out[n] = sum_t x[n, t] ⊗ g[n, t]``.

    Args:
        x: ``[N, T, D_in]`` layer inputs; g: ``[N, T, D_out]`` gradients at its outputs.
        layout: ``"in_out"`` → ``[N, D_in, D_out]``; ``"out_in"`` → ``[N, D_out, D_in]``.
        out: optional buffer of exactly that shape (x's dtype and device, contiguous).
    """
    if out is None:
        return _ops.seq_outer(x, g, layout)
    _ops.seq_outer_out(x, g, layout, out)
    return out


def linear_sq_norms(x: torch.Tensor, g: torch.Tensor, *, method: str = "auto") -> torch.Tensor:
    """Squared norms ``[N]`` of the per-sample gradients ``sum_t x[n, t] ⊗ g[n, t]`` (``x``
    ``[N, T, D_in]`` or ``[N, D_in]``, ``g`` likewise), never forming them for all samples at
    once. ``method``: ``"ghost"`` (``<X Xᵀ, G Gᵀ>``, ~T²(D_in+D_out) work), ``"direct"`` (the
    gradients of a block of samples, ~T·D_in·D_out), or ``"auto"``: the cheaper
    (:func:`linear_norm_uses_ghost`)."""
    return _ops.linear_sq_norms(x, g, method)


def embedding_grads(
    ids: torch.Tensor,
    g: torch.Tensor,
    num_embeddings: int,
    padding_idx: Optional[int] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample gradients ``[N, num_embeddings, D]`` of an Embedding's weight: row ``v`` of
    sample n is the sum of ``g[n, t]`` over its tokens with ``ids[n, t] == v``; the
    ``padding_idx`` row gets none. ids: ``[N, T]`` int64/int32; g: ``[N, T, D]``."""
    if out is None:
        return _ops.embedding_grads(ids, g, num_embeddings, padding_idx)
    _ops.embedding_grads_out(ids, g, padding_idx, out)
    return out


def embedding_sq_norms(
    ids: torch.Tensor, g: torch.Tensor, padding_idx: Optional[int] = None, *, method: str = "auto"
) -> torch.Tensor:
    """Squared norms ``[N]`` of :func:`embedding_grads` without forming them. ``method``:
    ``"ghost"`` (``g_t · g_s`` over pairs of equal tokens, ~T²·D), ``"direct"`` (gradients of
    equal tokens added first, ~T·D + T log T), or ``"auto"``: ghost up to 64 tokens."""
    return _ops.embedding_sq_norms(ids, g, padding_idx, method)


def layer_norm_grads(
    x: torch.Tensor, g: torch.Tensor, normalized_shape, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients ``(weight, bias)``, each ``[N, *normalized_shape]``, of a
    LayerNorm's elementwise affine parameters, from its input x ``[N, *, *normalized_shape]``
    and the gradient g at its output (same shape): ``sum over * of x̂ ⊙ g`` and of ``g``."""
    return _ops.layer_norm_grads(x, g, list(normalized_shape), float(eps))


def _norms_out(x: torch.Tensor, rows: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is not None:
        return out
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return torch.empty((rows, x.shape[0]), dtype=dtype, device=x.device)


def linear_layer_sq_norms(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    method: str = "auto",
    weight: bool = True,
    bias: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A Linear layer's squared per-sample gradient norms in one op: row 0 of ``out`` gets the
    weight's (``||sum_t g[n, t] ⊗ x[n, t]||²``, as :func:`linear_sq_norms`), the next row the
    bias's (``||sum_t g[n, t]||²``), only those asked for (``weight``/``bias``), in that order.

    Args:
        x: ``[N, T, D_in]`` or ``[N, D_in]``; g: ``[N, T, D_out]`` or ``[N, D_out]`` (x's dtype, device).
        method: the weight's form, as in :func:`linear_sq_norms`.
        out: ``[weight + bias, N]`` of the accumulation dtype (float32 for float16/bfloat16
            inputs, else x's dtype), x's device, each row contiguous: e.g. rows of a bigger
            ``[P, N]`` buffer. Allocated when None. Returned.
    """
    out = _norms_out(x, int(weight) + int(bias), out)
    _ops.linear_layer_sq_norms(x, g, method, bool(weight), bool(bias), out)
    return out


def layer_norm_sq_norms(
    x: torch.Tensor,
    g: torch.Tensor,
    normalized_shape,
    eps: float,
    *,
    weight: bool = True,
    bias: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The squared norms of :func:`layer_norm_grads`'s per-sample gradients in one op, never
    returning those: row 0 of ``out`` the weight's (``||sum over * of x̂ ⊙ g||²``), the next
    the bias's (``||sum over * of g||²``), only those asked for, in that order. x, g:
    ``[N, *, *normalized_shape]``; out as in :func:`linear_layer_sq_norms`."""
    out = _norms_out(x, int(weight) + int(bias), out)
    _ops.layer_norm_sq_norms(x, g, list(normalized_shape), float(eps), bool(weight), bool(bias), out)
    return out


def linear_norm_uses_ghost(t: int, d_in: int, d_out: int) -> bool:
    """The cost rule of ``method="auto"``: the ghost norm when
    ``T²(D_in + D_out + 2c) <= (T + c)·D_in·D_out``, counting multiply-adds per sample and
    ``c = 16`` for each element of a temporary, which the fused forms keep in cache
    (csrc/layer_ops.h; bench/NOTES.md, "Fused sequence-Linear norms")."""
    return _C.linear_norm_uses_ghost(t, d_in, d_out, "auto")


# ---------------------------------------------------------------- inner products of two sets


def linear_gram(
    xa: torch.Tensor,
    ga: torch.Tensor,
    xb: torch.Tensor,
    gb: torch.Tensor,
    *,
    bias: float = 0.0,
    method: str = "auto",
) -> torch.Tensor:
    """Inner products ``[N_a, N_b]`` between set a's and set b's per-sample gradients of a
    Linear layer, ``K[n, m] = sum_{t,s} (xa[n,t]·xb[m,s] + bias)(ga[n,t]·gb[m,s])``, never
    forming them for more than a block of samples: ``bias=1`` adds the bias's (its
    gradient is ``sum_t g_t``), ``bias=0`` gives the weight's alone.

    Args:
        xa, ga: set a's factors, ``[N_a, D_in]`` and ``[N_a, D_out]`` or ``[N_a, T_a, D_in]``
            and ``[N_a, T_a, D_out]``; xb, gb: set b's, likewise (T_b may differ).
        method: ``"ghost"`` (``T_a x T_b`` Grams of both factors, multiplied), ``"direct"``
            (both sides' per-sample gradients, a block at a time, contracted), or ``"auto"``:
            the cheaper (:func:`linear_gram_uses_ghost`); 2-D factors always take the Gram
            form, fused into one kernel on CUDA.
    """
    return _ops.linear_gram(xa, ga, xb, gb, float(bias), method)


def linear_gram_uses_ghost(t_a: int, t_b: int, n_a: int, n_b: int, d_in: int, d_out: int) -> bool:
    """The cost rule of ``linear_gram(method="auto")``, counting multiply-adds and ``c = 128``
    for each element of a temporary written and read back: the Gram form when
    ``T_a·T_b·(D_in + D_out + 2c) <= D_in·D_out·(1 + (T_a + c)/N_b + (T_b + c)/N_a)``
    (per pair of samples; the direct form forms each side's gradients once per block of the
    other); one position on both sides always takes the Gram form (csrc/gram.h)."""
    return _C.linear_gram_uses_ghost(t_a, t_b, n_a, n_b, d_in, d_out, "auto")


def embedding_gram(
    ids_a: torch.Tensor, ga: torch.Tensor, ids_b: torch.Tensor, gb: torch.Tensor, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """Inner products ``[N_a, N_b]`` between two sets' per-sample gradients of an Embedding's
    weight: the sum of ``ga[n,t]·gb[m,s]`` over token pairs with equal ids (``padding_idx``
    tokens pair with none), from ``T_a x T_b`` Grams of blocks of samples. ids: ``[N, T]``
    int64/int32; g: ``[N, T, D]``."""
    return _ops.embedding_gram(ids_a, ga, ids_b, gb, padding_idx)
