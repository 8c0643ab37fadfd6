"""TracIn (Pruthi et al., arXiv 2002.08484) over training checkpoints:
``score(train n, test m) = sum_c lr_c <grad_c(train n), grad_c(test m)>`` and the
self-influence ``sum_c lr_c ||grad_c(train n)||²``, from the engine's inner products and
norms (exact, never forming a per-sample gradient), or from projected gradients (TRAK-style,
``projection_dim``)."""

from collections.abc import Iterable, Sequence
from typing import Callable, Optional, Union

import torch
from torch import nn

from indivgrad_cuda.attribution.checkpoints import Checkpoint, each_checkpoint, engine_for


def tracin_scores(
    model: nn.Module,
    checkpoints: Iterable[Checkpoint],
    learning_rates: Union[float, Sequence[float]],
    train: tuple,
    test: tuple,
    loss_fn: Callable,
    *,
    reduction: str = "mean",
    projection_dim: Optional[int] = None,
    seed: int = 0,
    **engine_options,
) -> torch.Tensor:
    """TracIn scores ``[N_train, N_test]``.

    Args:
        model: the model; each checkpoint is loaded into it in turn (``load_state_dict``)
            and its own state is restored afterwards.
        checkpoints: state dicts, or paths to them (``torch.load``, weights only).
        learning_rates: the learning rate at each checkpoint, or one for all.
        train, test: ``(inputs, target)`` of each set (inputs as the engine takes them).
        loss_fn, reduction: as :class:`PerSampleGrads` takes them.
        projection_dim: None for exact inner products (:meth:`PerSampleGrads.inner_products`);
            else inner products of gradients projected to at most this many dims
            (:meth:`PerSampleGrads.project`, drawn from ``seed``; the same matrices at every
            checkpoint).
        engine_options: ``max_chunk``, ``capture``, ``norm_method`` for the engine.
    """
    engine = engine_for(model, engine_options)
    total = None
    for lr in each_checkpoint(model, checkpoints, learning_rates):
        if projection_dim is None:
            k = engine.inner_products(*train, *test, loss_fn, reduction=reduction)
        else:
            fa = engine.project(*train, loss_fn, dim=projection_dim, seed=seed, reduction=reduction)
            fb = engine.project(*test, loss_fn, dim=projection_dim, seed=seed, reduction=reduction)
            k = fa @ fb.t()
        total = k.mul_(lr) if total is None else total.add_(k, alpha=lr)
    return total


def tracin_self_influence(
    model: nn.Module,
    checkpoints: Iterable[Checkpoint],
    learning_rates: Union[float, Sequence[float]],
    train: tuple,
    loss_fn: Callable,
    *,
    reduction: str = "mean",
    projection_dim: Optional[int] = None,
    seed: int = 0,
    **engine_options,
) -> torch.Tensor:
    """TracIn self-influence ``[N]``: ``sum_c lr_c ||grad_c(n)||²`` from the per-sample
    norms (:meth:`PerSampleGrads.norms`), or from projected gradients with
    ``projection_dim``. Arguments as :func:`tracin_scores`. High self-influence flags
    samples the model found hard to fit: mislabelled or atypical ones."""
    engine = engine_for(model, engine_options)
    total = None
    for lr in each_checkpoint(model, checkpoints, learning_rates):
        if projection_dim is None:
            sq = engine.norms(*train, loss_fn, reduction=reduction).square()
        else:
            sq = engine.project(*train, loss_fn, dim=projection_dim, seed=seed, reduction=reduction).square().sum(1)
        total = sq.mul_(lr) if total is None else total.add_(sq, alpha=lr)
    return total
