"""From ``loss_fn`` to the gradient that starts the per-sample backward, scaled so that
sample n's part is the gradient of sample n's own loss (see PerSampleGrads's docs)."""

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._pytree import tree_unflatten

# (loss, n) of every loss_fn call while losses_tallied() is active (the DP-SGD step reports
# the batch's loss without a second forward); None otherwise.
_TALLY: ContextVar[Optional[list]] = ContextVar("indivgrad_loss_tally", default=None)


@contextlib.contextmanager
def losses_tallied():
    """Collects ``(detached loss, n)`` of every ``loss_fn`` call (one per chunk) in the block."""
    tally = []
    token = _TALLY.set(tally)
    try:
        yield tally
    finally:
        _TALLY.reset(token)


def per_sample_loss_sum(tally: list, reduction: str) -> Optional[torch.Tensor]:
    """The sum of the per-sample losses of a tally (a scalar ``"mean"`` loss of n samples
    stands for n times itself); None when no loss_fn call was made."""
    parts = [loss.sum() if loss.dim() else (loss * n if reduction == "mean" else loss) for loss, n in tally]
    return torch.stack(parts).sum() if parts else None


@dataclass
class LossSeed:
    loss: torch.Tensor  # what loss_fn returned: a scalar or [N]
    grad: torch.Tensor  # the grad_outputs to backpropagate it with


def run_loss(output, target, loss_fn, n: int) -> torch.Tensor:
    """Runs ``loss_fn`` (in the caller's autocast context) and checks what it returns: a
    scalar or per-sample losses [n]."""
    with torch.enable_grad():
        loss = loss_fn(output) if target is None else loss_fn(output, target)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn: expected it to return a Tensor, got {type(loss).__name__}")
    if loss.dim() != 0 and loss.shape != (n,):
        raise ValueError(
            f"loss_fn: expected a scalar or per-sample losses of shape [{n}], got shape {list(loss.shape)}"
        )
    tally = _TALLY.get()
    if tally is not None:
        tally.append((loss.detach(), n))
    return loss


def loss_grad_seed(output, target, loss_fn, reduction: str, n: int) -> LossSeed:
    """The loss and the gradient that starts its backward."""
    loss = run_loss(output, target, loss_fn, n)
    if loss.dim() == 0:
        return LossSeed(loss, torch.full((), n if reduction == "mean" else 1, dtype=loss.dtype, device=loss.device))
    return LossSeed(loss, torch.ones_like(loss))


def grad_of_output(output: torch.Tensor, target, loss_fn, reduction: str) -> torch.Tensor:
    """dL/d(output) alone (the native capture's backward starts there)."""
    (grad,) = grads_of_leaves([output], None, target, loss_fn, reduction, output.shape[0], [True])
    return grad


def grads_of_leaves(leaves: list, spec, target, loss_fn, reduction: str, n: int, wanted=None) -> list:
    """dL/d(leaf) for each tensor leaf of an output given as pytree leaves and spec (None: the
    one leaf is the output), zeros where the loss does not reach it; None for the leaves not
    ``wanted`` (default: those that are not floating-point tensors requiring grad)."""
    if wanted is None:
        wanted = [isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point() for t in leaves]
    detached = [t.detach().requires_grad_(True) if w else t for t, w in zip(leaves, wanted)]
    output = detached[0] if spec is None else tree_unflatten(detached, spec)
    loss = run_loss(output, target, loss_fn, n)
    seed = torch.full((), n if reduction == "mean" else 1, dtype=loss.dtype, device=loss.device)
    roots = [t for t, w in zip(detached, wanted) if w]
    got = iter(
        torch.autograd.grad(
            loss, roots, grad_outputs=seed if loss.dim() == 0 else torch.ones_like(loss), allow_unused=True
        )
    )
    out = []
    for t, w in zip(detached, wanted):
        g = next(got) if w else None
        out.append(torch.zeros_like(t) if w and g is None else g)
    return out
