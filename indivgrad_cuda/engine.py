"""``PerSampleGrads``: per-sample gradients, norms and clipped sums of any ``nn.Module``.

Each call picks a capture (how each trainable layer's factors are obtained, see
``indivgrad_cuda.capture``), then reduces the factors: the native capture of an
``nn.Sequential`` MLP on 2-D inputs does it all in C++ (fusing act' into the outer
products), the hooks capture hands them to the layer rules (``indivgrad_cuda.layers``)
through the reducers (``indivgrad_cuda.reducers``).
"""

import math
from typing import Callable, Optional

import torch
from torch import nn

from indivgrad_cuda import attribution, randomness, reducers
from indivgrad_cuda.buffers import allocate, check_out_buffers
from indivgrad_cuda.capture.hooks import HooksCapture
from indivgrad_cuda.capture.layers import UnsupportedModuleError
from indivgrad_cuda.capture.native import NativeCapture
from indivgrad_cuda.chunking import batch_size, named_tensors
from indivgrad_cuda.layers import acc_dtype
from indivgrad_cuda.ops import LAYOUTS, NORM_METHODS
from indivgrad_cuda.projection import Projection, build_projection

REDUCTIONS = ("mean", "sum")
CAPTURES = ("auto", "native", "hooks")


class PerSampleGrads:
    """Per-sample gradient engine for any ``nn.Module``.

    Every trainable parameter must belong to a supported layer: ``nn.Linear`` (inputs
    ``[N, *, D_in]``), ``nn.LayerNorm`` (elementwise affine) or ``nn.Embedding``; anything
    else raises :class:`UnsupportedModuleError` naming every offending module. Frozen
    parameters, parameter-free modules and functional code (attention, residuals, pooling,
    activations) are fine anywhere. A module called several times in one forward gets the
    sum of its calls' contributions. The loss must not mix samples (as any per-sample
    gradient requires): BatchNorm in train mode is refused.

    Captures (``capture="auto"``): an ``nn.Sequential`` MLP (Linear, activations, Dropout,
    Flatten) given a 2-D Tensor runs natively (one compiled forward and backward, act'
    fused into the outer products on CUDA, CUDA graphs); everything else through forward
    hooks and one autograd backward to the layers' outputs that forms no summed gradient.
    Both give the same results; ``"native"`` or ``"hooks"`` forces one.

    Inputs: ``inputs`` is a Tensor (``model(inputs)``), a tuple (``model(*inputs)``) or a
    dict (``model(**inputs)``); dim 0 of every tensor in it is the batch.

    Parameters are read at every call, so optimiser updates, replaced Parameter objects,
    ``requires_grad`` changes and ``model.train()/eval()`` are seen; replacing a module, or
    changing a module's settings (a Dropout's p, a LeakyReLU's slope), needs a new engine.

    Loss functions: ``loss_fn(output, target)`` (``loss_fn(output)`` when ``target`` is
    None) may return per-sample losses ``[N]`` (gradients of each entry) or a scalar; for a
    scalar, ``reduction="mean"`` (the loss averaged over the batch: sample n's loss is N
    times its share, as Opacus's ``loss_reduction="mean"``) or ``"sum"`` says how the
    per-sample losses were reduced.

    Randomness: each call draws, from ``generator`` (which must be on the model's device),
    first one mask per ``nn.Dropout`` call in train mode for the whole batch, in forward
    order (``torch.empty(N, *shape).bernoulli_(1 - p, generator=generator)`` scaled by
    ``1 / (1 - p)``), then the DP-SGD noise (one draw per parameter, in
    ``named_parameters()`` order); so results do not depend on chunking. Other random
    modules and functional randomness in a custom forward draw from torch's generators
    chunk by chunk.

    Precision: the forward and the backward compute in the parameters' dtype, with
    autocast turned off for the model's device type; ``loss_fn`` runs in the caller's
    context, autocast included. float16/bfloat16 models get float32 norms.

    Norms of sequence layers (``norm_method``): ``"auto"`` picks per layer and call the
    cheaper exact form, the ghost norm from T x T Gram matrices or the direct norm from
    each sample's gradient (blocks of samples at a time); ``"ghost"`` or ``"direct"``
    forces one (see :func:`indivgrad_cuda.ops.linear_sq_norms`).

    CUDA graphs (``cuda_graphs=True``, native capture on CUDA only): a batch processed in
    one chunk, with no Dropout in train mode, runs as two replayed graphs (the forward and
    the per-sample backward, norms or clipped sum; noise is added after) captured on the
    first call with a new input shape, dtype, layout, ``max_norm``, set of output buffers,
    or parameters replaced or with changed ``requires_grad``; in-place parameter updates
    need no new capture. Each graph keeps its batch's intermediate state allocated (at most
    4 pairs are kept). The output tensor ``loss_fn`` receives is then a static buffer,
    overwritten by the next call. If a capture fails the engine warns once and runs
    eagerly from then on. The one-shot functions (``per_sample_grads`` ...) do not capture.

    Args:
        model: the ``nn.Module``.
        max_chunk: the most samples processed at once. None: the native capture picks it
            from its intermediate state per sample (a quarter of the free GPU memory,
            counting what PyTorch's allocator holds unused; 1 GiB on CPU); the hooks
            capture runs the whole batch at once, as a normal training step would. Results
            are the same for any chunk size.
        cuda_graphs: replay CUDA graphs where they apply (see above).
        capture: ``"auto"``, ``"native"`` or ``"hooks"``.
        norm_method: ``"auto"``, ``"ghost"`` or ``"direct"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_chunk: Optional[int] = None,
        cuda_graphs: bool = True,
        capture: str = "auto",
        norm_method: str = "auto",
    ):
        if max_chunk is not None and (not isinstance(max_chunk, int) or max_chunk < 1):
            raise ValueError(f"max_chunk: expected a positive int or None, got {max_chunk!r}")
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs: expected True or False, got {cuda_graphs!r}")
        if capture not in CAPTURES:
            raise ValueError(f"capture: expected one of {CAPTURES}, got {capture!r}")
        if norm_method not in NORM_METHODS:
            raise ValueError(f"norm_method: expected one of {NORM_METHODS}, got {norm_method!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.max_chunk = max_chunk
        self.norm_method = norm_method
        self._native = self._hooks = None
        if capture != "hooks":
            try:
                self._native = NativeCapture(model, cuda_graphs, max_chunk)
            except UnsupportedModuleError:
                if capture == "native":
                    raise
        if capture != "native":
            self._hooks = HooksCapture(model)
        self._cached_key = None
        self._cached_results = None  # name -> buffer, reused by the next call with the same key
        self._projection_key = self._projection = None  # the last projection(), reused while its key holds

    # ---------------------------------------------------------------- public API

    def __call__(
        self,
        inputs,
        target,
        loss_fn: Callable,
        *,
        reduction: str = "mean",
        layout: str = "out_in",
        into: Optional[str] = None,
        out: Optional[dict[str, torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample gradients ``{name: [N, *param.shape]}`` of every parameter that
        requires grad, keyed like ``model.named_parameters()``.

        ``layout="in_out"`` gives Linear weights as ``[N, in_features, out_features]``.
        ``into="grad_sample"`` also stores each as ``param.grad_sample`` (as Opacus does).
        ``out``: a dict of your own buffers, written in place (any subset of the names).
        Buffers the engine allocates are reused by the next call with the same N, dtype,
        device and layout, so a training loop allocates them once: the returned tensors
        are overwritten then (``.clone()`` what you keep). An empty batch gives ``[0, ...]``.
        """
        cap, n = self._begin(inputs, reduction, generator)
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        if into not in (None, "grad_sample"):
            raise ValueError(f"into: expected None or 'grad_sample', got {into!r}")
        layers, params = self._params(cap, layout)
        results = self._result_buffers(params, n, layout, out)
        if cap is self._native:
            cap.grads(inputs, target, loss_fn, reduction, generator, layout, results)
        else:

            def visit(i, f, n0, n1):
                reducers.materialise(layers[i], f, layout, results, slice(n0, n1))

            cap.run(layers, inputs, target, loss_fn, reduction, generator, self.max_chunk, visit)
        if into == "grad_sample":
            params = dict(self.model.named_parameters())
            for name, t in results.items():
                params[name].grad_sample = t
        return results

    def norms(
        self,
        inputs,
        target,
        loss_fn: Callable,
        *,
        reduction: str = "mean",
        per_param: bool = False,
        generator: Optional[torch.Generator] = None,
    ):
        """Per-sample gradient norms ``[N]`` over all parameters that require grad, never
        forming a per-sample gradient of all samples at once (Linear on 2-D inputs:
        ``||x_n ⊗ g_n|| = ||x_n|| ||g_n||``; sequences: the ghost or direct norm).

        With ``per_param=True`` returns ``(norms, {name: [N]})``. float16/bfloat16 models
        get float32 norms."""
        cap, n = self._begin(inputs, reduction, generator)
        layers, params = self._params(cap, "out_in")
        sq = self._squared_norm_buffer(params, n)
        if cap is self._native:
            cap.norms(inputs, target, loss_fn, reduction, generator, sq)
        else:
            visit, end_chunk = self._norms_reducer(layers, sq)
            cap.run(layers, inputs, target, loss_fn, reduction, generator, self.max_chunk, visit, end_chunk)
        total = sq.sum(0).sqrt()
        if per_param:
            return total, dict(zip(params, sq.sqrt().unbind(0)))
        return total

    def clipped_grad_sum(
        self,
        inputs,
        target,
        loss_fn: Callable,
        max_norm: float,
        *,
        reduction: str = "mean",
        noise_multiplier: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """DP-SGD's step: sets each trainable ``p.grad`` to
        ``sum_n min(1, max_norm / (||g_n|| + 1e-6)) * g_n`` (``g_n``: sample n's full
        per-sample gradient), plus Gaussian noise of std ``noise_multiplier * max_norm``
        when ``noise_multiplier > 0`` (drawn from ``generator`` if given, after any Dropout
        masks). One forward and one backward; one GEMM (or index_add) per layer over the
        batch's rows, each scaled by its sample's coefficient. Returns the per-sample norms
        ``[N]`` before clipping. Existing ``p.grad`` tensors are overwritten, not
        accumulated into. An empty batch gives zero gradients (plus the noise)."""
        cap, n = self._begin(inputs, reduction, generator)
        if not (isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"max_norm: expected a positive finite number, got {max_norm!r}")
        if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier: expected a number >= 0, got {noise_multiplier!r}")
        max_norm = float(max_norm)
        layers, params = self._params(cap, "out_in")
        grads = {name: _grad_tensor(p) for name, (p, _) in params.items()}
        sq = self._squared_norm_buffer(params, n)
        if n == 0:
            for g in grads.values():
                g.zero_()
        if cap is self._native:
            cap.clipped_sum(inputs, target, loss_fn, reduction, generator, max_norm, grads, sq)
        else:
            pending = []  # (layer index, factors) of the chunk: the GEMMs wait for every layer's norms
            norms, norms_end = self._norms_reducer(layers, sq)

            def visit(i, f, n0, n1):
                norms(i, f, n0, n1)
                pending.append((i, f))

            def end_chunk(n0, n1):
                norms_end(n0, n1)
                coef = reducers.clip_coefficients(sq[:, n0:n1], max_norm)
                for i, f in pending:
                    reducers.clipped_sum(layers[i], f, coef, grads, n0 > 0)
                pending.clear()

            cap.run(layers, inputs, target, loss_fn, reduction, generator, self.max_chunk, visit, end_chunk)
        if noise_multiplier > 0:
            randomness.add_noise(list(grads.values()), float(noise_multiplier) * max_norm, generator)
        return sq.sum(0).sqrt()

    def inner_products(
        self,
        inputs_a,
        target_a,
        inputs_b,
        target_b,
        loss_fn: Callable,
        *,
        reduction: str = "mean",
        per_param: bool = False,
    ):
        """Inner products ``K [N_a, N_b]`` between the per-sample gradients of two sets,
        ``K[n, m] = <grad_a[n], grad_b[m]>`` summed over every parameter that requires grad,
        never forming a per-sample gradient of the whole model.

        Per layer, from its factors (input A, output gradient G) of both sets: a Linear on
        2-D inputs gives ``(A_a A_bᵀ + 1) ⊙ (G_a G_bᵀ)`` (weight and bias; one fused kernel on
        CUDA); a Linear on sequences the sum over both samples' positions, as ``T_a x T_b``
        Grams or by contracting both sets' per-sample gradients, a block at a time, whichever
        costs less (:func:`indivgrad_cuda.ops.linear_gram_uses_ghost`); an Embedding the sum
        over pairs of equal tokens; a LayerNorm its small per-sample gradients' Gram.

        Memory: set b is processed in blocks of ``max_chunk`` samples (all of it when None),
        each block's factors kept while set a runs past them in chunks of ``max_chunk``; so
        set a's forward and backward run once per block of b (pass the larger set as a). Each
        layer's temporaries are bounded (64 MiB blocks); the result is ``[N_a, N_b]``.

        Both sets go through the same ``loss_fn`` and ``reduction`` (see the class's docs);
        ``inputs_b`` must have ``inputs_a``'s structure, dtypes and device. Dropout in train
        mode is refused (put the model in eval mode). float16/bfloat16 models give float32.

        Returns ``K``, or ``(K, {name: [N_a, N_b]})`` with ``per_param=True``."""
        if not isinstance(per_param, bool):
            raise TypeError(f"per_param: expected True or False, got {per_param!r}")
        attribution.check_same_structure(inputs_a, inputs_b)
        layers, device, dtype = self._attribution_setup(inputs_a, reduction, "inputs_a")
        self._attribution_setup(inputs_b, reduction, "inputs_b")
        return attribution.inner_products(
            self._factor_runner(loss_fn, reduction),
            (inputs_a, target_a),
            (inputs_b, target_b),
            layers,
            per_param,
            self.max_chunk,
            acc_dtype(dtype),
            device,
        )

    def projection(self, dim: int, *, seed: int = 0) -> Projection:
        """The seeded Kronecker-factored projection :meth:`project` applies to the parameters
        that require grad now: its per-parameter matrices, column slices and total dimension
        ``D_proj`` (at most ``dim``; see :mod:`indivgrad_cuda.projection` for the rule)."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        layers = self._hooks.layers() if self._hooks is not None else self._native.layers()
        dtype, device = _parameters_dtype_device(layers)
        key = (dim, seed, dtype, device, tuple((layer.path, tuple(layer.trainable())) for layer in layers))
        if self._projection_key != key:
            self._projection = build_projection(layers, dim, seed, dtype, device)
            self._projection_key = key
        return self._projection

    def project(self, inputs, target, loss_fn: Callable, *, dim: int, seed: int = 0, reduction: str = "mean"):
        """Each sample's gradient, over every parameter that requires grad, randomly projected
        to ``[N, D_proj]`` by :meth:`projection` ``(dim, seed=seed)``, layer by layer from its
        factors (a Linear weight's ``P_out G_nᵀ A_n P_inᵀ`` as ``sum_t (P_out g_t) ⊗ (P_in
        a_t)``), never forming a per-sample gradient. Inner products of the rows estimate the
        gradients' inner products without bias. The same seed gives the same matrices on
        every device, and a sample's projection does not depend on its batch. Dropout in train
        mode is refused. float16/bfloat16 models give float32."""
        proj = self.projection(dim, seed=seed)
        _, device, _ = self._attribution_setup(inputs, reduction, "inputs")
        return attribution.project(self._factor_runner(loss_fn, reduction), inputs, target, proj, device)

    # ---------------------------------------------------------------- internals

    def _attribution_setup(self, inputs, reduction, name):
        """Checks one set of the attribution methods; returns its capture's layers, the
        model's device and its parameters' dtype."""
        cap, _ = self._begin(inputs, reduction, None)
        device = cap.device()
        for where, t in named_tensors(inputs):
            if t.device != device:
                raise ValueError(f"{name}{where}: expected a tensor on {device} (the model's), got {t.device}")
        training = [
            path for path, m in self.model.named_modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0
        ]
        if training:
            raise ValueError(
                f"modules {training} (Dropout) are in train mode: attribution needs each sample's gradient to be "
                f"deterministic; call model.eval() first"
            )
        layers = cap.layers()
        return layers, device, _parameters_dtype_device(layers)[0]

    def _factor_runner(self, loss_fn, reduction):
        """run(inputs, target, visit): one set's forward and backward, each layer's factors to
        visit(layer, factors or None, n0, n1)."""

        def run(inputs, target, visit):
            cap, _ = self._begin(inputs, reduction, None)
            layers = cap.layers()
            cap.run(
                layers,
                inputs,
                target,
                loss_fn,
                reduction,
                None,
                self.max_chunk,
                lambda i, f, n0, n1: visit(layers[i], f, n0, n1),
            )

        return run

    def _begin(self, inputs, reduction, generator):
        """Checks what every method takes; returns the capture for these inputs and N."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        native = self._native
        if native is not None and native.applies(inputs):
            cap = native
            native.check_input(inputs)
        elif self._hooks is not None:
            cap = self._hooks
        elif isinstance(inputs, torch.Tensor):
            raise ValueError(
                f"inputs: capture='native' needs a 2-D Tensor [N, D] (or one the model's nn.Flatten "
                f"flattens), got shape {list(inputs.shape)}"
            )
        else:
            raise TypeError(f"inputs: capture='native' needs a Tensor, got {type(inputs).__name__}")
        n = batch_size(inputs)
        randomness.check_generator(generator, cap.device())
        return cap, n

    def _params(self, cap, layout):
        """(the hooks capture's layers or None, {name: (parameter, per-sample shape)})."""
        if cap is self._native:
            return None, cap.params(layout)
        layers = cap.layers()
        return layers, cap.params(layers, layout)

    def _norms_reducer(self, layers, sq):
        """(visit, end_chunk) for the hooks capture: visit(i, f, n0, n1) keeps layer i's squared
        norms, end_chunk(n0, n1) writes the chunk's into sq's columns in one copy (one per
        parameter cost a launch each on a GPU, where small models are bound by launches)."""
        rows = reducers.norm_rows(layers)
        got = [None] * sq.shape[0]

        def visit(i, f, n0, n1):
            for r, v in zip(rows[i], reducers.squared_norms(layers[i], f, self.norm_method, n1 - n0, sq)):
                got[r] = v

        def end_chunk(n0, n1):
            if got:
                sq[:, n0:n1] = torch.stack(got)
                got[:] = [None] * len(got)

        return visit, end_chunk

    def _squared_norm_buffer(self, params, n):
        """[P, N] for the squared norms of the P parameters that require grad."""
        acc = torch.float32
        dtypes = {p.dtype for p, _ in params.values()}
        if dtypes and not dtypes & {torch.float16, torch.bfloat16}:
            acc = torch.float64 if torch.float64 in dtypes else torch.float32
        device = next(iter(params.values()))[0].device if params else self._device()
        return torch.empty(len(params), n, dtype=acc, device=device)

    def _device(self):
        return (self._native or self._hooks).device()

    def _result_buffers(self, params, n, layout, out):
        specs = {name: ((n, *shape), p.dtype, p.device) for name, (p, shape) in params.items()}
        out = dict(out or {})
        check_out_buffers(out, specs)
        key = (tuple(specs.items()), layout, frozenset(out))
        if self._cached_key != key:
            self._cached_key, self._cached_results = None, None  # free the old buffers first
            self._cached_results = allocate({k: s for k, s in specs.items() if k not in out})
            self._cached_key = key
        results = dict(self._cached_results)
        results.update(out)
        return {name: results[name] for name in specs}  # in named_parameters() order


def _parameters_dtype_device(layers) -> tuple[torch.dtype, torch.device]:
    """The trainable parameters' dtype and device (float32 on the CPU when there are none)."""
    for layer in layers:
        for p in layer.trainable().values():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _grad_tensor(p):
    if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
        p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
    return p.grad


# The one-shot functions build an engine per call (a CUDA graph captured for one replay would
# cost more than it saves); the engine's own options among their keyword arguments go to it.
ENGINE_OPTIONS = ("max_chunk", "capture", "norm_method")


def _one_shot(model, kwargs):
    options = {k: kwargs.pop(k) for k in ENGINE_OPTIONS if k in kwargs}
    return PerSampleGrads(model, cuda_graphs=False, **options)


def per_sample_grads(model: nn.Module, inputs, target, loss_fn, **kwargs) -> dict[str, torch.Tensor]:
    """One-shot :class:`PerSampleGrads` ``(model)(inputs, target, loss_fn, **kwargs)``
    (``max_chunk``, ``capture`` and ``norm_method`` go to the engine)."""
    return _one_shot(model, kwargs)(inputs, target, loss_fn, **kwargs)


def per_sample_grad_norms(model: nn.Module, inputs, target, loss_fn, **kwargs):
    """One-shot :meth:`PerSampleGrads.norms`."""
    return _one_shot(model, kwargs).norms(inputs, target, loss_fn, **kwargs)


def clipped_grad_sum(model: nn.Module, inputs, target, loss_fn, max_norm, **kwargs) -> torch.Tensor:
    """One-shot :meth:`PerSampleGrads.clipped_grad_sum`."""
    return _one_shot(model, kwargs).clipped_grad_sum(inputs, target, loss_fn, max_norm, **kwargs)
