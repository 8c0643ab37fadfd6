"""The engine's random draws: Dropout masks and DP-SGD noise, once per call for the whole
batch (masks first, in layer order, then the noise), so that results never depend on how
the batch is split into chunks."""

from typing import List, Optional, Sequence

import torch


def check_generator(generator, device: torch.device) -> None:
    """A generator must be a torch.Generator on the device the model computes on."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    got, want = _indexed(generator.device), _indexed(device)
    if got != want:
        raise ValueError(f"generator: expected a torch.Generator on {want} (the model's device), got one on {got}")


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current device>, so that devices compare (and print) by their index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def dropout_masks(plan, n: int, dtype: torch.dtype, device: torch.device, training: bool,
                  generator: Optional[torch.Generator]) -> List[Optional[torch.Tensor]]:
    """One scaled mask [N, width] per Dropout, as nn.Dropout: keep with probability 1 - p,
    scale kept values by 1 / (1 - p) (p = 1: all zero). None for each in eval mode."""
    if not training:
        return [None] * len(plan.dropout_ps)
    masks = []
    for p, width in zip(plan.dropout_ps, plan.dropout_widths):
        mask = torch.empty(n, width, dtype=dtype, device=device).bernoulli_(1 - p, generator=generator)
        masks.append(mask.mul_(1 / (1 - p) if p < 1 else 0.0))
    return masks


def add_noise(grads: Sequence[Optional[torch.Tensor]], std: float, generator: Optional[torch.Generator]) -> None:
    """Adds N(0, std²) noise to each gradient, in the order given."""
    for g in grads:
        if g is not None:
            g.add_(torch.normal(0.0, std, g.shape, generator=generator, dtype=g.dtype, device=g.device))
