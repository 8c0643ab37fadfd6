"""Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"; Opacus's AdaClipDPOptimizer): the threshold follows a target quantile of the
per-sample norms, by a geometric step from a noised count of the samples left unclipped."""

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class AdaptiveClipping:
    """The threshold's update after each DP-SGD step (Opacus's AdaClip names in brackets):

    ``b = (sum_i (u_i - 1/2) + N(0, count_noise_std²)) / B + 1/2``, the noised fraction of
    the step's samples left unclipped (``u_i = 1`` when no part of sample i's gradient was
    clipped; ``B`` the expected batch size), then
    ``C <- clamp(C * exp(-learning_rate * (b - target_quantile)), min_norm, max_norm)``.

    Args:
        target_quantile: the fraction of samples to leave unclipped, in (0, 1)
            (target_unclipped_quantile); 0.5 is the paper's choice.
        learning_rate: eta of the geometric step, > 0 (clipbound_learning_rate; the paper's
            0.2).
        count_noise_std: sigma_b, the count's noise std (unclipped_num_std); None: the
            paper's ``expected_batch_size / 20``.
        min_norm, max_norm: bounds of the threshold (min_clipbound, max_clipbound).

    Privacy: the count, centred (``u_i - 1/2``: one sample moves it by 1/2), is a Gaussian
    mechanism of noise multiplier ``2 sigma_b`` on the same samples as the gradient's. So
    that the two together spend what one gradient of noise multiplier ``z`` (DPSGD's
    ``noise_multiplier``, the one accounted) would, the gradient's noise multiplier rises to
    ``(z^-2 - (2 sigma_b)^-2)^(-1/2)`` (the paper's Theorem 1): ``2 sigma_b > z`` is needed.
    """

    target_quantile: float
    learning_rate: float = 0.2
    count_noise_std: Optional[float] = None
    min_norm: float = 0.0
    max_norm: float = math.inf

    def __post_init__(self):
        q = self.target_quantile
        if not (_number(q) and 0 < q < 1):
            raise ValueError(f"target_quantile: expected a number in (0, 1), got {q!r}")
        if not (_number(self.learning_rate) and 0 < self.learning_rate < math.inf):
            raise ValueError(f"learning_rate: expected a finite number > 0, got {self.learning_rate!r}")
        std = self.count_noise_std
        if std is not None and not (_number(std) and 0 < std < math.inf):
            raise ValueError(f"count_noise_std: expected a finite number > 0 or None, got {std!r}")
        if not (_number(self.min_norm) and _number(self.max_norm) and 0 <= self.min_norm < self.max_norm):
            raise ValueError(
                f"min_norm, max_norm: expected 0 <= min_norm < max_norm, got {self.min_norm!r}, {self.max_norm!r}"
            )

    def count_std(self, expected_batch_size: float) -> float:
        return self.count_noise_std if self.count_noise_std is not None else expected_batch_size / 20

    def gradient_noise_multiplier(self, noise_multiplier: float, expected_batch_size: float) -> float:
        """The gradient's noise multiplier that, with the count's, spends ``noise_multiplier``."""
        if noise_multiplier == 0:
            return 0.0
        count = 2 * self.count_std(expected_batch_size)
        if count <= noise_multiplier:
            raise ValueError(
                f"count_noise_std: adaptive clipping needs 2 * count_noise_std > noise_multiplier, so that the "
                f"gradient keeps some of the privacy budget; got 2 * {count / 2!r} <= {noise_multiplier!r} "
                f"(raise count_noise_std, or the expected batch size it defaults from)"
            )
        return (noise_multiplier**-2 - count**-2) ** -0.5

    def check_start(self, threshold: float, name: str = "max_grad_norm") -> None:
        """A threshold to start from (DPSGD's ``max_grad_norm``, or a checkpoint's) lies within
        [min_norm, max_norm]: the updates clamp every later one there, so one outside would
        hold for a step alone."""
        if not self.min_norm <= threshold <= self.max_norm:
            raise ValueError(
                f"{name}: with adaptive clipping the threshold to start from must lie within "
                f"[min_norm, max_norm] = [{self.min_norm!r}, {self.max_norm!r}], got {threshold!r}"
            )

    def updated(self, threshold: float, noised_centred_count: float, expected_batch_size: float) -> float:
        """The next threshold from this step's ``sum_i (u_i - 1/2) + noise``."""
        unclipped = noised_centred_count / expected_batch_size + 0.5
        step = math.exp(-self.learning_rate * (unclipped - self.target_quantile))
        return min(max(threshold * step, self.min_norm), self.max_norm)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
