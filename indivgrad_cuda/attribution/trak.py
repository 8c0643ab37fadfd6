"""TRAK (Park et al. 2023, arXiv 2303.14186): attribution from randomly projected gradients
of the model's output function, with the ``(ΦᵀΦ + λI)⁻¹`` preconditioner and the
output-to-loss weighting, averaged over several models or checkpoints."""

import os
from typing import Callable, Optional, Union

import torch
from torch import nn

from indivgrad_cuda.attribution.checkpoints import Checkpoint, each_checkpoint, engine_for
from indivgrad_cuda.attribution.outputs import margin, one_minus_p
from indivgrad_cuda.attribution.passes import check_block_size
from indivgrad_cuda.capture.hooks import call_model
from indivgrad_cuda.chunking import batch_size, split_batch
from indivgrad_cuda.layers import acc_dtype


class TRAK:
    """TRAK scores ``[N_train, N_test]``, positive when training on the sample raises the
    test sample's output function (the margin by default).

    For each model or checkpoint c featurized: ``Φ_c`` [N_train, D_proj], row n the gradient
    of ``output_fn`` at training sample n projected by the engine's Kronecker-factored
    projection (:meth:`PerSampleGrads.project`, seed ``seed + c``: independent projections
    per model, as the paper draws them), streamed ``block_size`` samples at a time; then
    ``Ψ_c = Φ_c (Φ_cᵀ Φ_c + λI)⁻¹`` (the inverse in float64; the pseudo-inverse when
    λ = 0) and the weights ``Q_c = weight_fn`` (``1 - p_y``). Scores, as the paper defines the ensemble::

        τ(test m, train n) = (1/C sum_c φ_c(m)ᵀ Ψ_c[n]) · (1/C sum_c Q_c[n])

    Memory: ``Ψ_c`` (N_train x D_proj) and a copy of each checkpoint's state are kept (a
    checkpoint given as a path is kept as its path, read again by :meth:`scores`).

    Args:
        model: the model; checkpoints are loaded into it in turn and its state restored.
        proj_dim: the projection's dimension (``D_proj`` is at most this; see
            :mod:`indivgrad_cuda.projection`).
        seed: the projection's seed for the first checkpoint.
        regularization: ``λ ≥ 0`` added to ``ΦᵀΦ``; 0 (traker's default) takes the
            pseudo-inverse ``(ΦᵀΦ)⁺``.
        output_fn: ``output_fn(output, target) -> [N]``, the function whose gradient is projected.
        weight_fn: ``weight_fn(output, target) -> [N]``, the output-to-loss weighting.
        block_size: samples per forward and backward.
        engine_options: ``capture``, ``norm_method``, ``fallback`` for the engine.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        proj_dim: int = 2048,
        seed: int = 0,
        regularization: float = 0.0,
        output_fn: Callable = margin,
        weight_fn: Callable = one_minus_p,
        block_size: int = 1024,
        **engine_options,
    ):
        if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1:
            raise ValueError(f"proj_dim: expected a positive int, got {proj_dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        if isinstance(regularization, bool) or not isinstance(regularization, (int, float)) or not regularization >= 0:
            raise ValueError(f"regularization: expected a number >= 0, got {regularization!r}")
        for name, fn in (("output_fn", output_fn), ("weight_fn", weight_fn)):
            if not callable(fn):
                raise TypeError(f"{name}: expected a callable (output, target) -> [N], got {type(fn).__name__}")
        self.model, self.proj_dim, self.seed, self.regularization = model, proj_dim, seed, float(regularization)
        self.output_fn, self.weight_fn = output_fn, weight_fn
        self.block_size = check_block_size(block_size)
        self.engine = engine_for(model, engine_options)
        self.models: list[dict] = []  # per featurized checkpoint: checkpoint, seed, features Ψ, weights Q

    def featurize(self, inputs, target, checkpoint: Optional[Checkpoint] = None) -> None:
        """Adds one model: the training set's features at ``checkpoint`` (a state dict or a
        path; None: the model as it is now). Every call takes the same training set."""
        n = batch_size(inputs)
        if n == 0:
            raise ValueError("inputs: expected at least one training sample, got an empty set")
        if self.models and n != len(self.models[0]["weights"]):
            raise ValueError(
                f"inputs: expected the {len(self.models[0]['weights'])} training samples featurized before, got {n}"
            )
        seed = self.seed + len(self.models)
        state = _kept(self.model.state_dict() if checkpoint is None else checkpoint)
        for _ in each_checkpoint(self.model, [state], 0.0, name="checkpoint"):
            phi, weights = [], []
            xtx = None
            for _, _, xb, tb in split_batch(inputs, target, n, self.block_size):
                f = self.engine.project(xb, tb, self.output_fn, dim=self.proj_dim, seed=seed, reduction="sum")
                f64 = f.double()  # in float64: ΦᵀΦ's null directions must stay at float64 rounding
                xtx = f64.t() @ f64 if xtx is None else xtx.addmm_(f64.t(), f64)
                phi.append(f)
                with torch.no_grad():
                    weights.append(self.weight_fn(call_model(self.model, xb), tb).detach().to(f.dtype))
            phi = torch.cat(phi)
        features = (phi.double() @ _inverse(xtx, self.regularization, phi.dtype)).to(phi.dtype)
        self.models.append({"checkpoint": state, "seed": seed, "features": features, "weights": torch.cat(weights)})

    def scores(self, inputs, target) -> torch.Tensor:
        """``[N_train, N_test]`` TRAK scores of the test samples (see the class's docs)."""
        if not self.models:
            raise RuntimeError("scores: call featurize() first (or load_state_dict())")
        n = batch_size(inputs)
        total = None
        for entry in self.models:
            for _ in each_checkpoint(self.model, [entry["checkpoint"]], 0.0, name="checkpoint"):
                phi = (
                    torch.cat(
                        [
                            self.engine.project(
                                xb, tb, self.output_fn, dim=self.proj_dim, seed=entry["seed"], reduction="sum"
                            )
                            for _, _, xb, tb in split_batch(inputs, target, n, self.block_size)
                        ]
                    )
                    if n
                    else entry["features"].new_zeros(0, entry["features"].shape[1])
                )
            k = entry["features"] @ phi.t()
            total = k if total is None else total.add_(k)
        weights = torch.stack([entry["weights"] for entry in self.models]).mean(0)
        return total.div_(len(self.models)).mul_(weights[:, None])

    def state_dict(self) -> dict:
        """The featurized state: per model its checkpoint, projection seed, ``Ψ`` and ``Q``."""
        return {"proj_dim": self.proj_dim, "regularization": self.regularization, "models": list(self.models)}

    def load_state_dict(self, state: dict) -> None:
        """Loads a featurized state; a ValueError when its projection dim differs or its
        checkpoints do not fit the model."""
        if not isinstance(state, dict) or "models" not in state:
            raise TypeError(f"state: expected a dict from TRAK.state_dict(), got {type(state).__name__}")
        if state["proj_dim"] != self.proj_dim:
            raise ValueError(f"state: featurized with proj_dim {state['proj_dim']}, this TRAK has {self.proj_dim}")
        if state["regularization"] != self.regularization:
            raise ValueError(
                f"state: featurized with regularization {state['regularization']}, this TRAK has {self.regularization}"
            )
        for i, entry in enumerate(state["models"]):
            dim = self.engine.projection(self.proj_dim, seed=entry["seed"]).dim
            if entry["features"].shape[1] != dim:
                raise ValueError(
                    f"state: model {i}'s features have {entry['features'].shape[1]} projected dims, this model's "
                    f"projection has {dim}: featurized on another model"
                )
            if isinstance(entry["checkpoint"], dict):
                missing = set(self.model.state_dict()) ^ set(entry["checkpoint"])
                if missing:
                    raise ValueError(
                        f"state: model {i}'s checkpoint is of another model (keys {sorted(missing)[:5]} differ)"
                    )
        p = next(iter(self.model.parameters()))
        to = dict(device=p.device, dtype=acc_dtype(p.dtype))  # the dtype and device featurize would give
        self.models = [
            {**entry, "features": entry["features"].to(**to), "weights": entry["weights"].to(**to)}
            for entry in state["models"]
        ]

    def save(self, path: Union[str, os.PathLike]) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: Union[str, os.PathLike]) -> "TRAK":
        device = next(iter(self.model.parameters())).device
        self.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return self


def _kept(checkpoint):
    """What featurize keeps of a checkpoint: a copy of a state dict (``model.state_dict()``
    shares the parameters' storage, which training goes on changing), a path as a string."""
    if isinstance(checkpoint, dict):
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in checkpoint.items()}
    return os.fspath(checkpoint) if isinstance(checkpoint, os.PathLike) else checkpoint


def _inverse(xtx: torch.Tensor, regularization: float, features: torch.dtype) -> torch.Tensor:
    """``(ΦᵀΦ + λI)⁻¹``, or with λ = 0 the pseudo-inverse ``(ΦᵀΦ)⁺``: the Kronecker-factored
    projection can leave Φ rank-deficient (a softmax layer's output gradients of the margin
    sum to zero, so its projected bias and weight gradients span one dimension fewer). The
    pseudo-inverse drops eigenvalues below ``max(k eps64, 100 eps²)`` times the largest, eps
    the features' dtype's: a null direction of the exact features takes an eigenvalue of
    about ``eps²`` from their rounding, and any other is kept."""
    if regularization == 0:
        rtol = max(len(xtx) * torch.finfo(torch.float64).eps, 100 * torch.finfo(features).eps ** 2)
        return torch.linalg.pinv(xtx, hermitian=True, rtol=rtol)
    eye = torch.eye(len(xtx), dtype=xtx.dtype, device=xtx.device)
    chol, info = torch.linalg.cholesky_ex(xtx + regularization * eye)
    if info.item() != 0:
        raise ValueError(
            f"regularization: {regularization} leaves ΦᵀΦ + λI singular in float64 (its largest eigenvalue is "
            f"{torch.linalg.eigvalsh(xtx)[-1].item():.3g}); pass a larger value, or 0 for the pseudo-inverse"
        )
    return torch.cholesky_inverse(chol)
