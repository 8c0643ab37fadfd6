"""DP-SGD around the engine's clipped sum: the step (:class:`DPSGD`: flat, per-group and
automatic clipping, :class:`AdaptiveClipping`), Poisson sampling (:func:`poisson_loader`)
and accounting (:func:`epsilon`, through Opacus's accountants)."""

from indivgrad_cuda.privacy.accounting import ACCOUNTANTS, epsilon
from indivgrad_cuda.privacy.adaptive import AdaptiveClipping
from indivgrad_cuda.privacy.sampling import PoissonBatchSampler, poisson_loader
from indivgrad_cuda.privacy.step import DPSGD, StepStats

__all__ = ["ACCOUNTANTS", "DPSGD", "AdaptiveClipping", "PoissonBatchSampler", "StepStats", "epsilon", "poisson_loader"]
