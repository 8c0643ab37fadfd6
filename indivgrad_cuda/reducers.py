"""Reducers of the hooks capture's factors, one chunk at a time: each a short loop over the
layers' rules. (The native capture forms the same three in C++, csrc/mlp.cpp.)"""

from typing import Dict, List, Optional

import torch

from indivgrad_cuda.capture.layers import Layer
from indivgrad_cuda.layers import Factors


def materialise(layers: List[Layer], factors: List[Optional[Factors]], layout: str,
                results: Dict[str, torch.Tensor]) -> None:
    """Writes each trainable parameter's per-sample gradients into ``results[name]`` (this
    chunk's rows)."""
    for layer, f in zip(layers, factors):
        out = {attr: results[layer.names[attr]] for attr in layer.trainable() if layer.names[attr] in results}
        if f is None:  # not called in this forward: no gradient
            for t in out.values():
                t.zero_()
        elif out:
            layer.rule.grads(layer.module, f, layout, out)


def squared_norms(layers: List[Layer], factors: List[Optional[Factors]], method: str, n: int,
                  like: torch.Tensor) -> torch.Tensor:
    """[P, n]: the squared per-sample norms of the P trainable parameters, in params() order."""
    rows = []
    for layer, f in zip(layers, factors):
        want = list(layer.trainable())
        got = {} if f is None else layer.rule.sq_norms(layer.module, f, want, method)
        rows += [got[attr] if attr in got else like.new_zeros(n) for attr in want]
    return torch.stack(rows) if rows else like.new_zeros(0, n)


def clip_coefficients(sq: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (||g_n|| + 1e-6)) per sample, from the squared norms [P, N]."""
    return (max_norm / (sq.sum(0).sqrt() + 1e-6)).clamp_max(1.0)


def clipped_sum(layers: List[Layer], factors: List[Optional[Factors]], coef: torch.Tensor,
                grads: Dict[str, torch.Tensor], accumulate: bool) -> None:
    """``grads[name] (+)= sum_n coef[n] * g_n`` for every trainable parameter."""
    for layer, f in zip(layers, factors):
        dst = {attr: grads[layer.names[attr]] for attr in layer.trainable()}
        if f is None:
            if not accumulate:
                for t in dst.values():
                    t.zero_()
        elif dst:
            layer.rule.clipped_sum(layer.module, f, coef, dst, accumulate)
