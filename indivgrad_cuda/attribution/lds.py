"""The linear datamodeling score (LDS; Park et al. 2023): how well an estimator's scores,
summed over a training subset, rank the outputs of models actually trained on the subsets."""

import math
from dataclasses import dataclass

import torch


@dataclass
class LDS:
    """mean: the LDS, the mean over test samples of each one's Spearman correlation;
    low, high: its 95% confidence interval over test samples (mean ± 1.96 standard errors);
    per_test: [N_test] correlations (NaN where the predictions or the outputs are constant
    over the subsets: such samples are left out of the mean, counted in ``left_out``)."""

    mean: float
    low: float
    high: float
    per_test: torch.Tensor
    left_out: int


def lds(scores: torch.Tensor, subsets: torch.Tensor, actual: torch.Tensor) -> LDS:
    """LDS of ``scores`` [N_train, N_test] given ``subsets`` [S, N_train] (bool: which
    training samples each of S models was trained on) and ``actual`` [S, N_test] (each
    model's output on each test sample, e.g. its margin). The prediction for subset s and
    test sample m is ``sum_{n in s} scores[n, m]``."""
    for name, t, dims in (("scores", scores, 2), ("subsets", subsets, 2), ("actual", actual, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name}: expected a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    n_train, n_test = scores.shape
    if subsets.shape[1] != n_train or actual.shape != (subsets.shape[0], n_test):
        raise ValueError(
            f"expected subsets [S, {n_train}] and actual [S, {n_test}] for scores [{n_train}, {n_test}], "
            f"got subsets {list(subsets.shape)} and actual {list(actual.shape)}"
        )
    if n_test == 0:
        raise ValueError("scores: expected at least one test sample (column), got none")
    if subsets.shape[0] < 3:
        raise ValueError(f"subsets: expected at least 3 subsets for a rank correlation, got {subsets.shape[0]}")
    predicted = subsets.cpu().to(torch.float64) @ scores.cpu().to(torch.float64)
    per_test = torch.stack([_spearman(predicted[:, m], actual[:, m].cpu().double()) for m in range(n_test)])
    ok = per_test[~per_test.isnan()]
    mean = ok.mean().item() if len(ok) else float("nan")
    half = 1.96 * ok.std().item() / math.sqrt(len(ok)) if len(ok) > 1 else float("nan")
    return LDS(mean, mean - half, mean + half, per_test, int(per_test.isnan().sum()))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, ties given their mean rank (as scipy.stats.rankdata's "average")."""
    order = x.argsort()
    sorted_x = x[order]
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() + 1) / 2
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return ra @ rb / denom if denom > 0 else torch.tensor(float("nan"), dtype=torch.float64)
