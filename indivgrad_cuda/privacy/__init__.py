"""DP-SGD around the engine's clipped sum: the step (:class:`DPSGD`), Poisson sampling
(:func:`poisson_loader`) and accounting (:func:`epsilon`, through Opacus's accountants)."""

from indivgrad_cuda.privacy.accounting import ACCOUNTANTS, epsilon
from indivgrad_cuda.privacy.sampling import PoissonBatchSampler, poisson_loader
from indivgrad_cuda.privacy.step import DPSGD, StepStats

__all__ = ["ACCOUNTANTS", "DPSGD", "PoissonBatchSampler", "StepStats", "epsilon", "poisson_loader"]
