"""``PerSampleGrads``: per-sample gradients, norms and clipped sums of any ``nn.Module``.

Each call picks a capture (how each trainable layer's factors are obtained, see
``indivgrad_cuda.capture``), then reduces the factors: the native capture of an
``nn.Sequential`` MLP on 2-D inputs does it all in C++ (fusing act' into the outer
products), the hooks capture hands them to the layer rules (``indivgrad_cuda.layers``)
through the reducers (``indivgrad_cuda.reducers``).
"""

import functools
from typing import Callable, Optional

import torch
from torch import nn

from indivgrad_cuda import compiled, randomness
from indivgrad_cuda.buffers import Kept
from indivgrad_cuda.capture.hooks import HooksCapture
from indivgrad_cuda.capture.native import NativeCapture
from indivgrad_cuda.capture.parameter_uses import Replanned
from indivgrad_cuda.chunking import batch_size
from indivgrad_cuda.errors import UnsupportedModuleError
from indivgrad_cuda.ops import NORM_METHODS
from indivgrad_cuda.projection import Projection
from indivgrad_cuda.reducers import clipped_sum, inner_products, materialise, norms, projections
from indivgrad_cuda.reducers.clipping import DEFAULT_STABILITY, resolve_groups

REDUCTIONS = ("mean", "sum")
CAPTURES = ("auto", "native", "hooks")
MAX_REPLANS = 3


def _replanning(method):
    """Runs the call again when its first call with an input signature moved parameters to a
    fallback (see capture.parameter_uses). Until the engine's first check has passed, with the
    same random draws (the random state is saved: a cost per call avoided afterwards, when a
    move is rare: a model whose parameter uses change with the input's shape)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        fresh = self._hooks is not None and self._hooks.unchecked()
        state = randomness.RandomState(kwargs.get("generator")) if fresh else None
        for _ in range(MAX_REPLANS):
            try:
                return method(self, *args, **kwargs)
            except Replanned:
                if state is not None:
                    state.restore()
        return method(self, *args, **kwargs)

    return run


class PerSampleGrads:
    """Per-sample gradient engine for any ``nn.Module``.

    Each module with trainable parameters is served by a layer rule
    (:data:`indivgrad_cuda.layers.RULES`: Linear, LayerNorm, RMSNorm and the Hugging Face RMS
    norms, Embedding, GPT-2's Conv1D, MultiheadAttention), else by the per-module fallback
    (torch.func over that module alone; ``fallback=False`` refuses instead), else refused with
    :class:`UnsupportedModuleError` naming every offending module. A parameter shared by
    several modules (tied weights) gets the sum of its uses, norms exact with the cross
    terms. Frozen parameters, parameter-free modules and functional code (attention,
    residuals, pooling, activations) are fine anywhere. A module called several times in one
    forward gets the sum of its calls' contributions. The loss must not mix samples (as any
    per-sample gradient requires): BatchNorm in train mode is refused. :meth:`describe` says
    how each parameter is served.

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

    Precision: the forward, ``loss_fn`` and the backward run in the caller's context, so
    under ``torch.autocast`` each op computes in the dtype a normal autocast step gives it
    (an MLP's native capture is then not used: ``capture="auto"`` takes the hooks capture,
    ``capture="native"`` refuses). Each layer's factors are kept in the dtype its op computed
    in (a Linear's or a convolution's input rounded to the autocast dtype as autocast rounds
    it); the engine's own arithmetic runs with autocast off: norms, clip coefficients and
    inner products in float32 (float64 for float64 models), clipped sums formed in the wider
    of the factors' and the parameter's dtype (float32 under autocast) and written in the
    parameter's, per-sample gradients written in ``out_dtype`` (default: the parameter's).
    The per-module fallback replays a module under the autocast its call ran under.
    float16/bfloat16 models get float32 norms.

    Norms of sequence layers (``norm_method``): ``"auto"`` picks per layer and call the
    cheaper exact form, the ghost norm from T x T Gram matrices or the direct norm from
    each sample's gradient (blocks of samples at a time); ``"ghost"`` or ``"direct"``
    forces one (see :func:`indivgrad_cuda.ops.linear_sq_norms`).

    CUDA graphs (``cuda_graphs=True``, on CUDA, both captures; per-sample gradients, norms
    and the clipped sum): a batch processed in one chunk, with no Dropout in train mode,
    runs as two replayed graphs (the forward, taps included, and the per-sample backward
    with the reduction; ``loss_fn`` runs eagerly between them, noise is added after),
    captured on the first call with a new input signature (shapes, dtypes, structure, the
    inputs' non-tensor values), layout, ``max_norm``, set of output buffers, autocast, or
    parameters or buffers replaced or with changed ``requires_grad``; in-place parameter
    updates need no new capture. The hooks capture graphs from the second call with an
    input signature (the first checks the parameters' uses eagerly). Each graph keeps its
    batch's intermediate state allocated (at most 4 pairs are kept). The output ``loss_fn``
    receives is then a static buffer, overwritten by the next call. If a capture fails the
    engine warns once and runs eagerly from then on. The one-shot functions
    (``per_sample_grads`` ...) do not capture. A model whose forward depends on anything
    else a replay cannot see (a Python flag read in ``forward``, data-dependent control
    flow) needs ``cuda_graphs=False``.

    Args:
        model: the ``nn.Module``; a ``torch.compile``'d one is run uncompiled (its ``_orig_mod``), keyed as it is.
        max_chunk: the most samples processed at once. None: the native capture picks it
            from its intermediate state per sample (a quarter of the free GPU memory,
            counting what PyTorch's allocator holds unused; 1 GiB on CPU); the hooks
            capture runs the whole batch at once, as a normal training step would. Results
            are the same for any chunk size.
        cuda_graphs: replay CUDA graphs where they apply (see above).
        capture: ``"auto"``, ``"native"`` or ``"hooks"``.
        norm_method: ``"auto"``, ``"ghost"`` or ``"direct"``.
        fallback: serve modules without a rule by torch.func (see
            :mod:`indivgrad_cuda.layers.fallback`); False refuses them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_chunk: Optional[int] = None,
        cuda_graphs: bool = True,
        capture: str = "auto",
        norm_method: str = "auto",
        fallback: bool = True,
    ):
        if max_chunk is not None and (not isinstance(max_chunk, int) or max_chunk < 1):
            raise ValueError(f"max_chunk: expected a positive int or None, got {max_chunk!r}")
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs: expected True or False, got {cuda_graphs!r}")
        if capture not in CAPTURES:
            raise ValueError(f"capture: expected one of {CAPTURES}, got {capture!r}")
        if norm_method not in NORM_METHODS:
            raise ValueError(f"norm_method: expected one of {NORM_METHODS}, got {norm_method!r}")
        if not isinstance(fallback, bool):
            raise TypeError(f"fallback: expected True or False, got {fallback!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.max_chunk = max_chunk
        self.norm_method = norm_method
        self._native = self._hooks = None
        # torch.compile(model): its _orig_mod, served eagerly, keyed like model (see compiled.py)
        if capture != "hooks":
            try:
                self._native = NativeCapture(compiled.eager(model, sequential=True), cuda_graphs, max_chunk)
            except UnsupportedModuleError:
                if capture == "native":
                    raise
        if capture != "native":
            self._hooks = HooksCapture(compiled.eager(model), fallback, cuda_graphs)
        self._results = materialise.ResultBuffers()  # reused by the next call with the same shapes
        self._kept = Kept()  # the norms' and the graphed clipped sums' buffers, from call to call
        self._projection = projections.ProjectionCache()  # the last projection(), reused while its key holds

    # ---------------------------------------------------------------- public API

    @_replanning
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
        out_dtype: Optional[torch.dtype] = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample gradients ``{name: [N, *param.shape]}`` of every parameter that
        requires grad, keyed like ``model.named_parameters()``, in ``out_dtype`` (default:
        each parameter's dtype; e.g. ``torch.bfloat16`` halves the bytes written).

        ``layout="in_out"`` gives Linear weights as ``[N, in_features, out_features]``.
        ``into="grad_sample"`` also stores each as ``param.grad_sample`` (as Opacus does).
        ``out``: a dict of your own buffers, written in place (any subset of the names).
        Buffers the engine allocates are reused by the next call with the same N, dtype,
        device and layout, so a training loop allocates them once: the returned tensors
        are overwritten then (``.clone()`` what you keep). An empty batch gives ``[0, ...]``.
        """
        return materialise.per_sample_grads(
            self, inputs, target, loss_fn, reduction, layout, into, out, generator, out_dtype
        )

    @_replanning
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
        return norms.norms(self, inputs, target, loss_fn, reduction, per_param, generator)

    @_replanning
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
        clip_fn: str = "abadi",
        stability: float = DEFAULT_STABILITY,
        clip_groups=None,
    ) -> torch.Tensor:
        """DP-SGD's step: sets each trainable ``p.grad`` to ``sum_n c_n * g_n`` (``g_n``:
        sample n's per-sample gradient), plus Gaussian noise of std
        ``noise_multiplier * max_norm`` when ``noise_multiplier > 0`` (drawn from
        ``generator`` if given, after any Dropout masks). One forward and one backward; one
        GEMM (or index_add) per layer over the batch's rows, each scaled by its sample's
        coefficient. Existing ``p.grad`` tensors are overwritten, not accumulated into. An
        empty batch gives zero gradients (plus the noise).

        Clipping (:mod:`indivgrad_cuda.reducers.clipping`): ``clip_groups`` splits the
        trainable parameters into G groups, each clipped on its own to ``max_norm / sqrt(G)``
        (so the whole clipped gradient's norm stays at most ``max_norm``): None (one group,
        the whole gradient), ``"layer"`` (the parameters of each module), ``"param"`` (each
        parameter), or a list of lists of parameter names naming every trainable parameter
        once (:meth:`clip_groups` gives the groups). ``clip_fn`` gives each group's
        coefficient from its norm: ``"abadi"``, ``min(1, threshold / (norm + 1e-6))``, or
        ``"automatic"`` (Bu et al.'s AUTO-S), ``threshold / (norm + stability)``. With the
        hooks capture each group's GEMMs run as soon as its norms are in: per layer, as each
        layer's gradient arrives.

        Returns the per-sample norms before clipping: ``[N]`` of the whole gradient when
        ``clip_groups`` is None, else ``[N, G]``, column k the norm of group k's part."""
        return clipped_sum.clipped_grad_sum(
            self,
            inputs,
            target,
            loss_fn,
            max_norm,
            reduction,
            noise_multiplier,
            generator,
            clip_fn,
            stability,
            clip_groups,
        )

    @_replanning
    def _clipped_sum_into(self, inputs, target, loss_fn, max_norm, sink, *, reduction, clip_fn, stability, clip_groups):
        """The clipped sums handed to ``sink`` layer by layer (a sharded model's DP-SGD step:
        see reducers/clipped_sum.py); the norms returned as :meth:`clipped_grad_sum` does."""
        return clipped_sum.clipped_grad_sum(
            self, inputs, target, loss_fn, max_norm, reduction, 0.0, None, clip_fn, stability, clip_groups, sink
        )

    def clip_groups(self, clip_groups) -> list[list[str]]:
        """The groups ``clip_groups`` (as :meth:`clipped_grad_sum` takes it) makes of the
        trainable parameters now, as lists of ``named_parameters()`` names: column k of the
        norms it returns is group k's."""
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return [names] if clip_groups is None else resolve_groups(names, clip_groups)

    @_replanning
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
        return inner_products.inner_products(
            self, inputs_a, target_a, inputs_b, target_b, loss_fn, reduction, per_param
        )

    def projection(self, dim: int, *, seed: int = 0) -> Projection:
        """The seeded Kronecker-factored projection :meth:`project` applies to the parameters
        that require grad now: its per-parameter matrices, column slices and total dimension
        ``D_proj`` (at most ``dim``; see :mod:`indivgrad_cuda.projection` for the rule)."""
        return self._projection.get(self, dim, seed)

    @_replanning
    def project(self, inputs, target, loss_fn: Callable, *, dim: int, seed: int = 0, reduction: str = "mean"):
        """Each sample's gradient, over every parameter that requires grad, randomly projected
        to ``[N, D_proj]`` by :meth:`projection` ``(dim, seed=seed)``, layer by layer from its
        factors (a Linear weight's ``P_out G_nᵀ A_n P_inᵀ`` as ``sum_t (P_out g_t) ⊗ (P_in
        a_t)``), never forming a per-sample gradient. Inner products of the rows estimate the
        gradients' inner products without bias. The same seed gives the same matrices on
        every device, and a sample's projection does not depend on its batch. Dropout in train
        mode is refused. float16/bfloat16 models give float32."""
        return projections.project(self, inputs, target, loss_fn, dim, seed, reduction)

    def describe(self) -> dict[str, str]:
        """How each parameter is served, keyed like ``model.named_parameters()``: ``"rule
        (Linear 'fc1')"``, ``"fallback (ViTEmbeddings 'vit.embeddings')"``, ``"tied: rule
        (Embedding 'transformer.wte') + rule (Linear 'lm_head')"``, ``"frozen"``, or
        ``"refused (...)"`` with the reason. An RMS norm recognised by name reads "rule" once
        its first call has confirmed its form (else "fallback")."""
        if self._hooks is None:
            return {n: "rule (native MLP)" if p.requires_grad else "frozen" for n, p in self.model.named_parameters()}
        return self._hooks.scan.describe()

    # ---------------------------------------------------------------- internals

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
        elif torch.is_autocast_enabled(native.device().type):
            raise ValueError(
                "capture='native' does not run under torch.autocast (its passes compute in the parameters' dtype); "
                "use capture='auto' or 'hooks', which run the step as autocast does"
            )
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

    def _device(self):
        return (self._native or self._hooks).device()

    def _layers(self):
        """The layers with trainable parameters now, as the hooks capture names them."""
        return self._hooks.layers() if self._hooks is not None else self._native.layers()


# The one-shot functions build an engine per call (a CUDA graph captured for one replay would
# cost more than it saves); the engine's own options among their keyword arguments go to it.
ENGINE_OPTIONS = ("max_chunk", "capture", "norm_method", "fallback")


def _one_shot(model, kwargs):
    options = {k: kwargs.pop(k) for k in ENGINE_OPTIONS if k in kwargs}
    return PerSampleGrads(model, cuda_graphs=False, **options)


def per_sample_grads(model: nn.Module, inputs, target, loss_fn, **kwargs) -> dict[str, torch.Tensor]:
    """One-shot :class:`PerSampleGrads` ``(model)(inputs, target, loss_fn, **kwargs)``
    (``max_chunk``, ``capture``, ``norm_method`` and ``fallback`` go to the engine; the
    others, ``out_dtype`` included, to the call)."""
    return _one_shot(model, kwargs)(inputs, target, loss_fn, **kwargs)


def per_sample_grad_norms(model: nn.Module, inputs, target, loss_fn, **kwargs):
    """One-shot :meth:`PerSampleGrads.norms`."""
    return _one_shot(model, kwargs).norms(inputs, target, loss_fn, **kwargs)


def clipped_grad_sum(model: nn.Module, inputs, target, loss_fn, max_norm, **kwargs) -> torch.Tensor:
    """One-shot :meth:`PerSampleGrads.clipped_grad_sum`."""
    return _one_shot(model, kwargs).clipped_grad_sum(inputs, target, loss_fn, max_norm, **kwargs)
