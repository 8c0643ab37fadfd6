"""Reducers of the hooks capture's factors, one layer at a time as its gradient arrives:
each a short call into the layer's rule. (The native capture forms the same three in C++,
csrc/mlp.cpp.)"""

from typing import Optional

import torch

from indivgrad_cuda.capture.layers import Layer
from indivgrad_cuda.layers import Factors


def materialise(layer: Layer, f: Optional[Factors], layout: str, results: dict[str, torch.Tensor], rows: slice) -> None:
    """Writes the layer's per-sample gradients into ``results[name][rows]`` (this chunk's rows)."""
    out = {attr: results[layer.names[attr]][rows] for attr in layer.trainable() if layer.names[attr] in results}
    if f is None:  # no gradient reached the layer
        for t in out.values():
            t.zero_()
    elif out:
        layer.rule.grads(layer.module, f, layout, out)


def squared_norms(layer: Layer, f: Optional[Factors], method: str, n: int, like: torch.Tensor) -> list[torch.Tensor]:
    """The squared per-sample norms [n] of the layer's trainable parameters, in order."""
    want = list(layer.trainable())
    got = {} if f is None else layer.rule.sq_norms(layer.module, f, want, method)
    return [got[attr] if attr in got else like.new_zeros(n) for attr in want]


def clip_coefficients(sq: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (||g_n|| + 1e-6)) per sample, from the squared norms [P, N]."""
    return (max_norm / (sq.sum(0).sqrt() + 1e-6)).clamp_max(1.0)


def clipped_sum(
    layer: Layer, f: Optional[Factors], coef: torch.Tensor, grads: dict[str, torch.Tensor], accumulate: bool
) -> None:
    """``grads[name] (+)= sum_n coef[n] * g_n`` for the layer's trainable parameters."""
    dst = {attr: grads[layer.names[attr]] for attr in layer.trainable()}
    if f is None:
        if not accumulate:
            for t in dst.values():
                t.zero_()
    elif dst:
        layer.rule.clipped_sum(layer.module, f, coef, dst, accumulate)


def norm_rows(layers: list[Layer]) -> list[list[int]]:
    """For each layer, the rows of its trainable parameters in the [P, N] squared-norm buffer."""
    rows, k = [], 0
    for layer in layers:
        count = len(layer.trainable())
        rows.append(list(range(k, k + count)))
        k += count
    return rows
