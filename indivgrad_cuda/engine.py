"""Per-sample gradients, norms and clipped sums of whole MLPs.

Data flow: the plan (validated once) → one compiled forward call that keeps each layer's
input and pre-activation → dL/d(output) by autograd on the output alone (any loss) → one
compiled backward call that, per layer, fuses act' with the per-sample outer products (or
forms only norms / one GEMM for clipped sums).
"""

import contextlib
import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from indivgrad_cuda import randomness
from indivgrad_cuda.chunking import chunk_size, chunks
from indivgrad_cuda.cuda_graphs import GraphRunner, addresses, parameter_key
from indivgrad_cuda.ops import LAYOUTS
from indivgrad_cuda.plan import build_plan

REDUCTIONS = ("mean", "sum")


class PerSampleGrads:
    """Per-sample gradient engine for an ``nn.Sequential`` MLP.

    The model is validated once (see :data:`indivgrad_cuda.plan.SUPPORTED`; anything else
    raises :class:`UnsupportedModuleError`). Parameters are read at every call, so
    optimiser updates, replaced Parameter objects, ``requires_grad`` changes and
    ``model.train()/eval()`` are seen; replacing a module, or changing a module's settings
    (a Dropout's p, a LeakyReLU's slope), needs a new engine.

    Loss functions: ``loss_fn(output, target)`` (``loss_fn(output)`` when ``target`` is
    None) may return per-sample losses ``[N]`` (gradients of each entry) or a scalar; for a
    scalar, ``reduction="mean"`` (the loss averaged over the batch: sample n's loss is N
    times its share, as Opacus's ``loss_reduction="mean"``) or ``"sum"`` says how the
    per-sample losses were reduced. The loss must not mix samples (as any per-sample
    gradient requires), which is also what lets a batch be processed in chunks.

    Randomness: each call draws, from ``generator`` (which must be on the model's device),
    first one mask per Dropout in train mode for the whole batch, in layer order
    (``torch.empty(N, width).bernoulli_(1 - p, generator=generator)`` scaled by
    ``1 / (1 - p)``), then the DP-SGD noise; so results do not depend on chunking.

    Precision: the forward and the backward passes compute in the parameters' dtype, with
    autocast turned off for the model's device type (x must have that dtype); ``loss_fn``
    runs in the caller's context, autocast included, and its gradient with respect to the
    output comes back in the output's dtype. float16/bfloat16 models get float32 norms.

    CUDA graphs (``cuda_graphs=True``, used on CUDA only): a batch processed in one chunk,
    with no Dropout in train mode, runs as two replayed graphs (the forward and the
    per-sample backward, norms or clipped sum; noise is added after) captured on the first
    call with a new input shape, dtype, layout, ``max_norm``, set of output buffers, or
    parameters replaced or with changed ``requires_grad``; in-place parameter updates need
    no new capture. Each graph keeps its batch's intermediate state allocated (at most 4
    pairs are kept). The output tensor ``loss_fn`` receives is then a static buffer,
    overwritten by the next call. If a capture fails the engine warns once and runs
    eagerly from then on. The one-shot functions (``per_sample_grads`` ...) do not capture.

    Args:
        model: the ``nn.Sequential``.
        max_chunk: the most samples processed at once; None picks it from the
            intermediate state per sample (a quarter of the free GPU memory, counting what
            PyTorch's allocator holds unused; 1 GiB on CPU). Results are the same for any
            chunk size.
        cuda_graphs: replay CUDA graphs where they apply (see above).
    """

    def __init__(self, model: nn.Module, *, max_chunk: Optional[int] = None, cuda_graphs: bool = True):
        if max_chunk is not None and (not isinstance(max_chunk, int) or max_chunk < 1):
            raise ValueError(f"max_chunk: expected a positive int or None, got {max_chunk!r}")
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs: expected True or False, got {cuda_graphs!r}")
        self.model = model
        self.max_chunk = max_chunk
        self._plan = build_plan(model)
        self._graphs = GraphRunner() if cuda_graphs else None
        self._cached_key = None
        self._cached_results = None  # (dict name -> buffer, weight buffers, bias buffers)

    # ---------------------------------------------------------------- public API

    def __call__(
        self,
        x: torch.Tensor,
        target,
        loss_fn: Callable,
        *,
        reduction: str = "mean",
        layout: str = "out_in",
        into: Optional[str] = None,
        out: Optional[Dict[str, torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-sample gradients ``{name: [N, *param.shape]}`` of every parameter that
        requires grad, keyed like ``model.named_parameters()``.

        ``layout="in_out"`` gives weights as ``[N, in_features, out_features]`` instead.
        ``into="grad_sample"`` also stores each as ``param.grad_sample`` (as Opacus does).
        ``out``: a dict of your own buffers, written in place (any subset of the names).
        Buffers the engine allocates are reused by the next call with the same N, dtype,
        device and layout, so a training loop allocates them once: the returned tensors
        are overwritten then (``.clone()`` what you keep). An empty batch gives ``[0, ...]``.
        """
        self._check_common(x, reduction, generator)
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        if into not in (None, "grad_sample"):
            raise ValueError(f"into: expected None or 'grad_sample', got {into!r}")
        program, weights = self._plan.program, self._plan.weights()
        results, out_w, out_b = self._result_buffers(x, layout, out)
        n = x.shape[0]

        def chunk_grads(grad_out, saved, n0, n1):
            sl = (lambda t: t) if (n0, n1) == (0, n) else (lambda t: t if t is None else t[n0:n1])
            program.grads(grad_out, saved, weights, [sl(t) for t in out_w], [sl(t) for t in out_b], layout)

        def graphed_grads(grad_out, saved):  # the result buffers are the graph's outputs: their addresses are in the key
            program.grads(grad_out, saved, weights, out_w, out_b, layout)
            return ()

        self._run(x, target, loss_fn, reduction, generator, chunk_grads, graphed_grads,
                  ("grads", layout, addresses(out_w + out_b)))
        if into == "grad_sample":
            params = dict(self.model.named_parameters())
            for name, t in results.items():
                params[name].grad_sample = t
        return results

    def norms(self, x: torch.Tensor, target, loss_fn: Callable, *, reduction: str = "mean", per_param: bool = False,
              generator: Optional[torch.Generator] = None):
        """Per-sample gradient norms ``[N]`` over all parameters that require grad, from
        ``||x_n ⊗ g_n|| = ||x_n|| ||g_n||``, never forming ``[N, D_in, D_out]``.

        With ``per_param=True`` returns ``(norms, {name: [N]})``. float16/bfloat16 models
        get float32 norms."""
        self._check_common(x, reduction, generator)
        program, weights = self._plan.program, self._plan.weights()
        want_w, want_b = self._wanted()
        sq, names = self._squared_norm_buffer(x)

        def chunk_norms(grad_out, saved, n0, n1):
            sq[:, n0:n1] = program.norms(grad_out, saved, weights, want_w, want_b)

        def graphed_norms(grad_out, saved):
            return program.norms(grad_out, saved, weights, want_w, want_b)

        graphed = self._run(x, target, loss_fn, reduction, generator, chunk_norms, graphed_norms, ("norms",))
        if graphed is not None:
            sq.copy_(graphed)
        total = sq.sum(0).sqrt()
        if per_param:
            return total, dict(zip(names, sq.sqrt().unbind(0)))
        return total

    def clipped_grad_sum(self, x: torch.Tensor, target, loss_fn: Callable, max_norm: float, *,
                         reduction: str = "mean", noise_multiplier: float = 0.0,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """DP-SGD's step: sets each trainable ``p.grad`` to
        ``sum_n min(1, max_norm / (||g_n|| + 1e-6)) * g_n`` (``g_n``: sample n's full
        per-sample gradient), plus Gaussian noise of std ``noise_multiplier * max_norm``
        when ``noise_multiplier > 0`` (drawn from ``generator`` if given, after any Dropout
        masks). Uses one GEMM per layer; returns the per-sample norms ``[N]`` before
        clipping. Existing ``p.grad`` tensors are overwritten, not accumulated into. An
        empty batch gives zero gradients (plus the noise)."""
        self._check_common(x, reduction, generator)
        if not (isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"max_norm: expected a positive finite number, got {max_norm!r}")
        if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier: expected a number >= 0, got {noise_multiplier!r}")
        program, weights, linears = self._plan.program, self._plan.weights(), self._plan.linears
        grads_w = [_grad_tensor(m.weight) for m in linears]
        grads_b = [_grad_tensor(m.bias) for m in linears]
        max_norm = float(max_norm)
        sq, _ = self._squared_norm_buffer(x)
        if x.shape[0] == 0:
            for g in grads_w + grads_b:
                if g is not None:
                    g.zero_()

        def chunk_clipped(grad_out, saved, n0, n1):
            sq[:, n0:n1] = program.clipped_sum(grad_out, saved, weights, grads_w, grads_b, max_norm, n0 > 0)

        def graphed_clipped(grad_out, saved):
            # into the graph's own buffers, copied to p.grad after each replay: p.grad is
            # often a new tensor every step (zero_grad(set_to_none=True))
            gw = [None if g is None else torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads_w]
            gb = [None if g is None else torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads_b]
            return program.clipped_sum(grad_out, saved, weights, gw, gb, max_norm, False), gw, gb

        graphed = self._run(x, target, loss_fn, reduction, generator, chunk_clipped, graphed_clipped,
                            ("clipped_sum", max_norm))
        if graphed is not None:
            sq.copy_(graphed[0])
            for dst, src in zip(grads_w + grads_b, graphed[1] + graphed[2]):
                if dst is not None:
                    dst.copy_(src)
        if noise_multiplier > 0:
            randomness.add_noise(grads_w + grads_b, float(noise_multiplier) * max_norm, generator)
        return sq.sum(0).sqrt()

    # ---------------------------------------------------------------- internals

    def _check_common(self, x, reduction, generator):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
        plan = self._plan
        width = math.prod(x.shape[1:]) if (plan.flattens_input and x.dim() >= 2) else (x.shape[1] if x.dim() == 2 else None)
        if width != plan.in_features:
            expected = f"[N, {plan.in_features}]" + (" (after nn.Flatten)" if plan.flattens_input else "")
            raise ValueError(f"x: expected shape {expected} for the model's first Linear, got {list(x.shape)}")
        randomness.check_generator(generator, plan.linears[0].weight.device)

    def _wanted(self):
        plan = self._plan
        want_w = [m.weight.requires_grad for m in plan.linears]
        want_b = [m.bias is not None and m.bias.requires_grad for m in plan.linears]
        return want_w, want_b

    def _training(self):
        states = {d.training for d in self._plan.dropouts}
        if len(states) > 1:
            raise ValueError("the model's Dropout layers are in mixed train/eval modes; put them all in one")
        return bool(states) and states.pop()

    def _run(self, x, target, loss_fn, reduction, generator, chunk_pass, graphed_pass, graph_key):
        """Forward → dL/d(output) → backward over the batch. Eagerly, chunk by chunk, calling
        chunk_pass(grad_out, saved, n0, n1): returns None. Or through CUDA graphs, where they
        apply, as graphed_pass(grad_out, saved) on the whole batch: returns its results."""
        plan = self._plan
        program, weights, biases = plan.program, plan.weights(), plan.biases()
        device = x.device.type
        n = x.shape[0]
        masks = randomness.dropout_masks(plan, n, x.dtype, x.device, self._training(), generator)
        size = self._chunk_size(x)

        def grad_of_output(output, tc):  # the caller's loss, in the caller's autocast context
            return _grad_of_loss(output, tc, loss_fn, reduction)

        graphs = self._graphs
        if graphs is not None and size >= n and not any(m is not None for m in masks) and graphs.applies(x, weights[0]):
            def forward(xs):
                with _no_autocast(device):
                    return program.forward(xs, weights, biases, masks)

            def backward(grad_out, saved):
                with _no_autocast(device):
                    return graphed_pass(grad_out, saved)

            key = (*graph_key, parameter_key(weights), parameter_key(biases))
            results = graphs.run(key, x, forward, lambda output: grad_of_output(output, target), backward)
            if results is not None:
                return results
        for n0, n1, xc, tc in chunks(x, target, size):
            with _no_autocast(device):
                output, saved = program.forward(xc, weights, biases, [m if m is None else m[n0:n1] for m in masks])
            grad_out = grad_of_output(output, tc)
            with _no_autocast(device):
                chunk_pass(grad_out, saved, n0, n1)
        return None

    def _chunk_size(self, x):
        widths = sum(m.in_features + 3 * m.out_features for m in self._plan.linears)
        return chunk_size(x.shape[0], widths * x.element_size(), x.device, self.max_chunk)

    def _squared_norm_buffer(self, x):
        """[P, N] for the squared norms of the P parameters that require grad, and their names."""
        plan = self._plan
        want_w, want_b = self._wanted()
        names = [name for l in range(len(plan.linears)) for name, want in
                 ((plan.weight_names[l], want_w[l]), (plan.bias_names[l], want_b[l])) if want]
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return torch.empty(len(names), x.shape[0], dtype=acc, device=x.device), names

    def _result_buffers(self, x, layout, out):
        plan = self._plan
        want_w, want_b = self._wanted()
        n = x.shape[0]
        shapes = {}
        for l, m in enumerate(plan.linears):
            if want_w[l]:
                w_shape = (m.out_features, m.in_features) if layout == "out_in" else (m.in_features, m.out_features)
                shapes[plan.weight_names[l]] = (n, *w_shape)
            if want_b[l]:
                shapes[plan.bias_names[l]] = (n, m.out_features)
        out = dict(out or {})
        _check_out_buffers(out, shapes, x)
        key = (n, x.dtype, x.device, layout, tuple(want_w), tuple(want_b), frozenset(out))
        if self._cached_key != key:
            self._cached_key, self._cached_results = None, None  # free the old buffers first
            self._cached_results = _allocate({k: s for k, s in shapes.items() if k not in out}, x)
            self._cached_key = key
        results = dict(self._cached_results)
        results.update(out)
        out_w = [results.get(name) if want_w[l] else None for l, name in enumerate(plan.weight_names)]
        out_b = [results.get(name) if want_b[l] else None for l, name in enumerate(plan.bias_names)]
        return results, out_w, out_b


def _no_autocast(device_type):
    """The compiled passes compute in the parameters' dtype and check it: autocast would
    hand them lower-precision GEMMs. Entering the context costs, so only when needed."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _grad_tensor(p):
    if p is None or not p.requires_grad:
        return None
    if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
        p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
    return p.grad


def _grad_of_loss(output, target, loss_fn, reduction):
    """dL/d(output), scaled so that row n is the gradient of sample n's own loss."""
    out = output.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(out) if target is None else loss_fn(out, target)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn: expected it to return a Tensor, got {type(loss).__name__}")
    n = out.shape[0]
    if loss.dim() == 0:
        (grad,) = torch.autograd.grad(loss, out)
        return grad * n if reduction == "mean" else grad
    if loss.shape == (n,):
        (grad,) = torch.autograd.grad(loss, out, grad_outputs=torch.ones_like(loss))
        return grad
    raise ValueError(f"loss_fn: expected a scalar or per-sample losses of shape [{n}], got shape {list(loss.shape)}")


def _check_out_buffers(out: Dict[str, torch.Tensor], shapes, x):
    for name, t in out.items():
        if name not in shapes:
            raise ValueError(f"out: '{name}' is not a parameter that requires grad; expected names among {list(shapes)}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"out['{name}']: expected a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"out['{name}']: expected shape {list(shapes[name])}, got {list(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"out['{name}']: expected dtype {x.dtype} (x's dtype), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"out['{name}']: expected device {x.device} (x's device), got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"out['{name}']: expected a contiguous tensor, got strides {list(t.stride())}")
    spans = sorted((t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), t.numel() * t.element_size(), name)
                   for name, t in out.items() if t.numel())
    for (start_a, len_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < start_a + len_a:
            raise ValueError(f"out['{a}'] and out['{b}'] share memory; each needs its own buffer")


def _allocate(shapes, x) -> Dict[str, torch.Tensor]:
    total = sum(math.prod(s) for s in shapes.values()) * x.element_size()
    try:
        return {name: torch.empty(s, dtype=x.dtype, device=x.device) for name, s in shapes.items()}
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError) or "memory" in str(e).lower():
            raise MemoryError(
                f"per-sample gradients for N={x.shape[0]} need {total} bytes ({total / 2**30:.2f} GiB) of "
                f"{x.dtype} on {x.device}, which could not be allocated; use norms() or clipped_grad_sum(), "
                f"which form none, or a smaller batch"
            ) from e
        raise


# The one-shot functions build an engine per call: a CUDA graph captured for one replay
# would cost more than it saves.

def per_sample_grads(model: nn.Module, x, target, loss_fn, **kwargs) -> Dict[str, torch.Tensor]:
    """One-shot :class:`PerSampleGrads` ``(model)(x, target, loss_fn, **kwargs)``."""
    return PerSampleGrads(model, cuda_graphs=False)(x, target, loss_fn, **kwargs)


def per_sample_grad_norms(model: nn.Module, x, target, loss_fn, **kwargs):
    """One-shot :meth:`PerSampleGrads.norms`."""
    return PerSampleGrads(model, cuda_graphs=False).norms(x, target, loss_fn, **kwargs)


def clipped_grad_sum(model: nn.Module, x, target, loss_fn, max_norm, **kwargs) -> torch.Tensor:
    """One-shot :meth:`PerSampleGrads.clipped_grad_sum`."""
    return PerSampleGrads(model, cuda_graphs=False).clipped_grad_sum(x, target, loss_fn, max_norm, **kwargs)
