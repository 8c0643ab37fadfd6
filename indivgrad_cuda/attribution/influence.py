"""Influence functions with Kronecker-factored curvature (Grosse et al. 2023, arXiv
2308.03296; as Kronfluence): ``score(train n, test m) = g_mᵀ (H + λI)⁻¹ g_n``, H a K-FAC or
EK-FAC approximation of the Fisher fitted layer by layer from the engine's factors
(:mod:`indivgrad_cuda.attribution.curvature`)."""

import os
from typing import Callable, Optional, Union

import torch
from torch import nn

from indivgrad_cuda.attribution import curvature
from indivgrad_cuda.attribution.checkpoints import engine_for
from indivgrad_cuda.attribution.passes import check_block_size, each_block, sampled_loss
from indivgrad_cuda.chunking import batch_size, take_rows
from indivgrad_cuda.engine import REDUCTIONS
from indivgrad_cuda.layers import acc_dtype

STRATEGIES = ("ekfac", "kfac")
FISHERS = ("true", "empirical")


class Influence:
    """Influence scores ``[N_train, N_test]``: ``g_testᵀ (H + λI)⁻¹ g_train``, positive when
    up-weighting the training sample lowers the test sample's measurement (its loss by
    default), as Kronfluence reports them.

    ``fit`` makes one pass over a fitting set for the covariance factors of each layer's inputs
    and output gradients (and the diagonal curvatures), a second for EK-FAC's eigenvalues (on
    [N, D_in] inputs from the rotated factors in one GEMM, no per-sample gradient formed);
    ``scores`` preconditions each test sample's gradient (one matrix per Linear layer) and
    multiplies it with each training sample's gradient of that layer, formed from the layer's
    factors a block of 64 MiB at a time (never the whole model's): the same multiply-adds as
    the Gram form ``g_nᵀ Q_m a_n``, in one GEMM per block. Which curvature each layer gets:
    :mod:`indivgrad_cuda.attribution.curvature` and :meth:`describe`.

    Args:
        model: the model (its parameters that require grad are the ones scored); put it in
            eval mode (Dropout in train mode is refused).
        loss_fn: ``loss_fn(output, target)``, per-sample losses [N] or a scalar reduced by
            ``reduction``, as :class:`PerSampleGrads` takes it.
        strategy: ``"ekfac"`` or ``"kfac"``.
        damping: ``λ > 0`` for every layer, or None for Kronfluence's heuristic (0.1 times
            the mean of each layer's eigenvalues).
        fisher: ``"true"`` (labels sampled from ``softmax(output)``, the model's own
            predictive distribution over the last dim: classification) or ``"empirical"``
            (the loss at the fitting set's targets).
        seed: the sampled labels' seed (``fisher="true"``).
        reduction: how a scalar ``loss_fn`` reduced the per-sample losses (``"mean"`` or
            ``"sum"``), as :class:`PerSampleGrads` takes it.
        block_size: samples per forward and backward (memory is bounded by it).
        engine_options: ``max_chunk``, ``capture``, ``norm_method``, ``fallback`` for the engine.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        *,
        strategy: str = "ekfac",
        damping: Optional[float] = None,
        fisher: str = "true",
        seed: int = 0,
        reduction: str = "mean",
        block_size: int = 1024,
        **engine_options,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher: expected one of {FISHERS}, got {fisher!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        if damping is not None and (
            isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0
        ):
            raise ValueError(f"damping: expected a number > 0 or None (the heuristic), got {damping!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable (output, target) -> loss, got {type(loss_fn).__name__}")
        self.model, self.loss_fn, self.strategy, self.fisher = model, loss_fn, strategy, fisher
        self.damping, self.seed, self.reduction = damping, seed, reduction
        self.block_size = check_block_size(block_size)
        self.engine = engine_for(model, engine_options)
        self.curvatures: dict[str, object] = {}  # layer path -> Kronecker or Diagonal, once fitted

    # ---------------------------------------------------------------- fitting

    def fit(self, inputs, target) -> "Influence":
        """Fits each layer's curvature on a set (``target`` is used with
        ``fisher="empirical"`` only). Returns self."""
        n = batch_size(inputs)
        if n == 0:
            raise ValueError("inputs: expected at least one sample to fit the curvature on, got an empty set")
        curv = {}
        passes = 2 if self.strategy == "ekfac" else 1

        def pass_over(k):
            """The k-th pass's runner: the loss at the targets, or at labels sampled afresh."""
            if self.fisher == "empirical":
                return each_block(self.engine, inputs, target, self.loss_fn, self.block_size, "inputs", self.reduction)
            u = torch.rand(n, generator=torch.Generator().manual_seed(self.seed * 2 + k), dtype=torch.float64)
            u = u.to(_device(self.model))
            return each_block(
                self.engine, inputs, u, sampled_loss(self.loss_fn), self.block_size, "inputs", self.reduction
            )

        over, layers, *_ = pass_over(0)
        for layer in layers:
            curv[layer.path] = _curvature_for(layer)

        def covariances(layers, i, f, n0, n1):
            layer, c = layers[i], curv[layers[i].path]
            if f is None:
                return
            if c.kind == "kronecker":
                c.add_covariances(layer, f)
            else:
                c.add(_layer_grads(layer, f, n1 - n0))

        over(covariances)
        for c in curv.values():
            if c.kind == "kronecker":
                if c.a_cov is None:
                    raise ValueError(f"layers {c.names}: no gradient reached them on the fitting set")
                c.eigendecompose()
                if self.strategy == "kfac":
                    c.kfac_eigenvalues()
        if passes == 2:

            def eigenvalues(layers, i, f, n0, n1):
                c = curv[layers[i].path]
                if f is not None and c.kind == "kronecker":
                    c.add_eigenvalues(layers[i], f)

            pass_over(1)[0](eigenvalues)
        for path, c in curv.items():
            if c.lam is None:
                raise ValueError(f"layer {path!r} ({c.names}): no gradient reached it on the fitting set")
        self.curvatures = curv
        return self

    # ---------------------------------------------------------------- scoring

    def scores(
        self,
        train_inputs,
        train_target,
        test_inputs,
        test_target,
        *,
        measurement: Optional[Callable] = None,
        test_block_size: Optional[int] = None,
    ) -> torch.Tensor:
        """``[N_train, N_test]`` influence scores. ``measurement(output, target) -> [N]``: the
        per-sample quantity whose change is predicted (default: ``loss_fn``; e.g.
        :func:`indivgrad_cuda.attribution.negative_margin`). The test set is preconditioned
        ``test_block_size`` samples at a time (default ``block_size``), the training set
        streamed past each block in blocks of ``block_size``."""
        if not self.curvatures:
            raise RuntimeError("scores: call fit() first (or load_state_dict())")
        test_block = (
            self.block_size if test_block_size is None else check_block_size(test_block_size, "test_block_size")
        )
        measure = self.loss_fn if measurement is None else measurement
        n_test = batch_size(test_inputs)
        over_train, layers, device, n_train = each_block(
            self.engine, train_inputs, train_target, self.loss_fn, self.block_size, "train_inputs", self.reduction
        )
        self._check_layers(layers)
        dtype = acc_dtype(next(iter(self.model.parameters())).dtype)
        out = torch.zeros(n_train, n_test, dtype=dtype, device=device)
        inv = {path: c.inverse_eigenvalues(self.damping) for path, c in self.curvatures.items()}
        for m0 in range(0, n_test, test_block):
            m1 = min(n_test, m0 + test_block)
            q = self._preconditioned(test_inputs, test_target, m0, m1, measure, inv)
            cols = out[:, m0:m1]

            def add(layers, i, f, n0, n1, q=q, cols=cols):
                layer = layers[i]
                if f is None or layer.path not in q:
                    return
                c = self.curvatures[layer.path]
                if c.kind == "kronecker":
                    cols[n0:n1] += c.score(layer, f, q[layer.path])
                else:
                    cols[n0:n1] += _layer_grads(layer, f, n1 - n0) @ q[layer.path].t()

            over_train(add)
        return out

    def _preconditioned(self, test_inputs, test_target, m0, m1, measure, inv) -> dict:
        """Each layer's preconditioned test gradients of samples m0..m1."""
        xb, tb = take_rows(test_inputs, test_target, m0, m1)
        over, layers, *_ = each_block(self.engine, xb, tb, measure, self.block_size, "test_inputs", self.reduction)
        self._check_layers(layers)
        q = {}

        def keep(layers, i, f, n0, n1):  # rows n0..n1 of the block; a layer no gradient reached keeps zeros
            layer, c = layers[i], self.curvatures[layers[i].path]
            if f is None:
                return
            part = (
                c.precondition(layer, f, inv[layer.path])
                if c.kind == "kronecker"
                else _layer_grads(layer, f, n1 - n0) * inv[layer.path]
            )
            if layer.path not in q:
                q[layer.path] = part.new_zeros(m1 - m0, *part.shape[1:])
            q[layer.path][n0:n1] = part

        over(keep)
        return q

    def _check_layers(self, layers) -> None:
        now = {layer.path: _curvature_for(layer) for layer in layers}
        fitted = self.curvatures
        if {p: (c.kind, c.names) for p, c in now.items()} != {p: (c.kind, c.names) for p, c in fitted.items()}:
            raise ValueError(
                f"the model's trainable layers {sorted(now)} are not the ones the curvature was fitted on "
                f"{sorted(fitted)} (requires_grad changed, or another model): fit again"
            )

    # ---------------------------------------------------------------- describing, saving

    def describe(self) -> dict[str, str]:
        """The curvature each trainable parameter gets: ``"kronecker (Linear 'fc1')"`` or
        ``"diagonal (LayerNorm 'ln')"``, keyed like ``named_parameters()``."""
        out = {}
        for layer in self.engine._layers():
            c = _curvature_for(layer)
            for name in c.names:
                out[name] = f"{c.kind} ({type(layer.module).__name__} '{layer.path}')"
        return out

    def state_dict(self) -> dict:
        """The fitted curvature (eigenbases and eigenvalues per layer) and the settings."""
        if not self.curvatures:
            raise RuntimeError("state_dict: call fit() first")
        layers = {p: {"kind": c.kind, "names": list(c.names), **c.state()} for p, c in self.curvatures.items()}
        return {"strategy": self.strategy, "fisher": self.fisher, "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        """Loads a fitted curvature; a ValueError when it was fitted on another model (its
        layers, parameters or shapes differ) or with another strategy."""
        if not isinstance(state, dict) or not {"layers", "strategy"} <= set(state):
            raise TypeError(f"state: expected a dict from Influence.state_dict(), got {type(state).__name__}")
        if state["strategy"] != self.strategy:
            raise ValueError(
                f"state: fitted with strategy {state['strategy']!r}, this Influence uses {self.strategy!r}"
            )
        curv = {}
        for layer in self.engine._layers():
            c = _curvature_for(layer)
            got = state["layers"].get(layer.path)
            if got is None or (got["kind"], got["names"]) != (c.kind, c.names):
                raise ValueError(f"state: fitted on another model: layer {layer.path!r} ({c.kind} {c.names}) differs")
            p = next(iter(layer.trainable().values()))  # the dtype and device fit would give
            c.load({k: v.to(p.device, acc_dtype(p.dtype)) for k, v in got.items() if k not in ("kind", "names")})
            _check_shapes(layer, c)
            curv[layer.path] = c
        extra = sorted(set(state["layers"]) - set(curv))
        if extra:
            raise ValueError(f"state: fitted on another model: it has layers {extra} this model lacks")
        self.curvatures = curv

    def save(self, path: Union[str, os.PathLike]) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: Union[str, os.PathLike]) -> "Influence":
        self.load_state_dict(torch.load(path, map_location=_device(self.model), weights_only=True))
        return self


def _device(model) -> torch.device:
    return next(iter(model.parameters())).device


def _curvature_for(layer):
    names = [layer.names[a] for a in layer.trainable()]
    return curvature.Kronecker(names) if curvature.is_kronecker(layer) else curvature.Diagonal(names)


def _layer_grads(layer, f, n) -> torch.Tensor:
    """[n, P]: the layer's trainable parameters' per-sample gradients, flattened and concatenated."""
    attrs = list(layer.trainable())
    p = next(iter(layer.trainable().values()))
    out = {
        a: torch.empty(n, *layer.rule.grad_shape(layer.module, a, "out_in"), dtype=acc_dtype(p.dtype), device=p.device)
        for a in attrs
    }
    layer.rule.grads(layer.module, f, "out_in", out)
    return torch.cat([out[a].flatten(1) for a in attrs], 1)


def _check_shapes(layer, c) -> None:
    params = layer.trainable()
    if c.kind == "kronecker":
        w = params["weight"]
        d_out, d_in = (w.shape[1], w.shape[0]) if layer.rule.transposed else w.shape[:2]
        want = {
            "u_a": (d_in + ("bias" in params),) * 2,
            "u_g": (d_out, d_out),
            "lam": (d_out, d_in + ("bias" in params)),
        }
        got = {"u_a": c.u_a.shape, "u_g": c.u_g.shape, "lam": c.lam.shape}
    else:
        want = {"lam": (sum(p.numel() for p in params.values()),)}
        got = {"lam": c.lam.shape}
    for k, shape in want.items():
        if tuple(got[k]) != tuple(shape):
            raise ValueError(
                f"state: fitted on another model: layer {layer.path!r}'s {k} is {list(got[k])}, expected {list(shape)}"
            )
