"""The passes the attribution estimators make over a set: its samples in blocks, each block
one forward and one backward through the engine's capture, each layer's factors handed to a
visitor (never a per-sample gradient of the whole model)."""

from typing import Callable

import torch

from indivgrad_cuda.capture.layers import tied_names
from indivgrad_cuda.chunking import batch_size, split_batch
from indivgrad_cuda.layers import acc_dtype
from indivgrad_cuda.reducers.inner_products import attribution_setup, factor_runner


def check_block_size(block_size, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: expected a positive int, got {block_size!r}")
    return block_size


def check_untied(layers) -> None:
    tied = sorted(tied_names(layers))
    if tied:
        raise NotImplementedError(
            f"parameters {tied} are shared by several modules (tied weights): the attribution estimators do not "
            f"serve them yet; freeze them (requires_grad=False) or untie them"
        )


def each_block(engine, inputs, target, fn: Callable, block_size: int, name: str, reduction: str = "sum"):
    """For each block of at most block_size samples: one forward and backward with ``fn`` as
    the loss (per-sample values [B], or a scalar reduced by ``reduction``), calling
    ``visit(layers, i, factors or None, n0, n1)`` (rows of the whole set) for every layer.
    Returns (that function taking the visitor, the capture's layers, the device, N)."""
    layers, device, _ = attribution_setup(engine, inputs, reduction, name)
    check_untied(layers)
    n = batch_size(inputs)
    run = factor_runner(engine, fn, reduction)

    def over(visit):
        for b0, _, xb, tb in split_batch(inputs, target, n, block_size):
            run(xb, tb, lambda layers, i, f, n0, n1, b0=b0: visit(layers, i, f, b0 + n0, b0 + n1))

    return over, layers, device, n


def sampled_loss(loss_fn: Callable) -> Callable:
    """The true Fisher's loss: ``loss_fn(output, y)`` at labels y drawn from softmax(output)
    by inverse transform of the uniform ``u`` passed as the target (one per sample, drawn for
    the whole set up front, so the labels do not depend on the blocks)."""

    def loss(output, u):
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            raise ValueError(
                f"fisher='true' samples labels from a classifier's logits [N, C]; the model's output is "
                f"{list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}: "
                f"use fisher='empirical' (the loss at the targets)"
            )
        probs = torch.softmax(output.detach().to(acc_dtype(output.dtype)), -1)
        cdf = probs.cumsum(-1)
        y = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None]).squeeze(-1)
        return loss_fn(output, y.clamp_(max=output.shape[-1] - 1))

    return loss
