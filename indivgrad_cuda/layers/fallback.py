"""The per-module fallback: a module with trainable parameters and no rule gets its own
parameters' per-sample gradients from torch.func, as Opacus's functorch fallback does.

Its forward hook keeps the call's arguments and outputs; when the gradients at the outputs
arrive, ``vmap`` over the batch of ``vjp`` of the module's forward alone (each sample as a
batch of one, the other parameters and submodules as they are) gives ``[N, *param.shape]``
for each of its trainable parameters, reduced as any small per-sample gradient is
(:class:`~indivgrad_cuda.layers.per_sample.PerSampleRule`). The outputs computed sample by
sample are compared with the batch's on the first call with each input signature: a
forward that mixes samples, or draws random numbers, is refused there, never silently wrong.

The replay runs under the autocast the call ran under (the caller's, if any), so its ops
compute in the dtypes of the batch's forward; the gradients come in the parameters' dtype.

Cost: one more forward and backward of that module, per sample but vectorised; memory: the
per-sample gradients of its parameters for a chunk (``max_chunk`` bounds it).
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from indivgrad_cuda.capture.precision import AutocastState, autocast_state, replay
from indivgrad_cuda.errors import UnsupportedModuleError
from indivgrad_cuda.layers.base import Factors
from indivgrad_cuda.layers.per_sample import PerSampleRule

# the largest difference between the per-sample outputs and the batch's allowed by the
# first-call check, relative to the output's largest magnitude (float rounding only)
OUTPUT_CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class FallbackCall:
    """One call of the module, as the fallback replays it."""

    leaves: list  # the leaves of (args, kwargs), tensors detached
    spec: Any  # their pytree structure
    in_dims: tuple  # per leaf: the batch dim to vmap over, or None (shared by every sample)
    unsqueeze: tuple  # per leaf: put back a batch dim of 1 inside vmap
    out_index: list[int]  # the output leaves whose gradients are recorded
    out_dims: tuple  # their batch dims
    reference: Optional[list] = None  # the batch's outputs (clones), on a call that is checked
    autocast: AutocastState = ()  # the autocast the call ran under, which its replays run under too


class FallbackRule(PerSampleRule):
    served_by = "fallback"
    matrix_projections = True

    def __init__(self, path: str = ""):
        self.path = path  # the module's name, for errors
        self.adopted: list[str] = []  # parameters below the module its forward uses without calling their owner

    def bind(self, path, module, fallback=True):
        return type(self)(path)

    def attrs(self, module):
        return [a for a, _ in module.named_parameters(recurse=self.owns_subtree)] + self.adopted

    # -------------------------------------------------------------- recording

    def batch_dims(self, module, args, kwargs, n) -> tuple[tuple, dict, list, list]:
        """(args, kwargs, in_dims, unsqueeze) for the leaves of (args, kwargs): a tensor whose
        dim 0 has the batch's n rows is split along it, any other value is shared."""
        leaves = tree_leaves((args, kwargs))
        dims = [0 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else None for v in leaves]
        return args, kwargs, dims, [d is not None for d in dims]

    def output_dims(self, module, outputs: list[torch.Tensor]) -> list[int]:
        return [0] * len(outputs)

    def taps(self, output):
        return [
            i
            for i, v in enumerate(tree_leaves(output))
            if isinstance(v, torch.Tensor) and v.requires_grad and v.is_floating_point()
        ]

    def record(self, module, args, kwargs, output, n, check=False):
        args, kwargs, in_dims, unsqueeze = self.batch_dims(module, args, kwargs, n)
        leaves, spec = tree_flatten((args, kwargs))
        leaves = [v.detach() if isinstance(v, torch.Tensor) else v for v in leaves]
        out_index = self.taps(output)
        flat = tree_leaves(output)
        outputs = [flat[i] for i in out_index]
        out_dims = self.output_dims(module, outputs)
        for i, (o, d) in enumerate(zip(outputs, out_dims)):
            if o.dim() <= d or o.shape[d] != n:
                raise UnsupportedModuleError(
                    f"'{self.path}' ({type(module).__name__}): the fallback needs dim {d} of each output to be the "
                    f"batch (N={n}), got output {i} of shape {list(o.shape)}; freeze its parameters, or give it a rule"
                )
        reference = [o.detach().clone() for o in outputs] if check else None
        return FallbackCall(
            leaves, spec, tuple(in_dims), tuple(unsqueeze), out_index, tuple(out_dims), reference, autocast_state()
        )

    def output_grad(self, module, grads):
        return list(grads)

    def combine(self, records, grads):
        return Factors(records, grads)

    # -------------------------------------------------------------- per-sample gradients

    def per_sample(self, module, f: Factors) -> dict[str, torch.Tensor]:
        params = {a: module.get_parameter(a) for a in self.attrs(module)}
        params = {a: p.detach() for a, p in params.items() if p.requires_grad}
        total = None
        for call, cots in zip(f.a, f.g):
            grads = self._call_grads(module, params, call, cots)
            total = grads if total is None else {a: total[a] + grads[a] for a in total}
        return total

    def _call_grads(self, module, params, call: FallbackCall, cots) -> dict[str, torch.Tensor]:
        def one(p, leaves, cot):
            leaves = [v.unsqueeze(d) if u else v for v, d, u in zip(leaves, call.in_dims, call.unsqueeze)]
            args, kwargs = tree_unflatten(leaves, call.spec)

            def forward(p):
                flat = tree_leaves(functional_call(module, p, args, kwargs))
                return tuple(flat[i] for i in call.out_index)

            outs, pull = vjp(forward, p)
            (grads,) = pull(tuple(c.unsqueeze(d) for c, d in zip(cot, call.out_dims)))
            return grads, tuple(o.squeeze(d) for o, d in zip(outs, call.out_dims))

        try:
            with replay(call.autocast):
                grads, outs = vmap(one, in_dims=(None, call.in_dims, call.out_dims), out_dims=(0, call.out_dims))(
                    params, tuple(call.leaves), tuple(cots)
                )
        except UnsupportedModuleError:
            raise
        except Exception as e:
            if "random" in str(e):
                raise UnsupportedModuleError(
                    f"'{self.path}' ({type(module).__name__}): its forward draws random numbers (Dropout in train mode "
                    f"with p > 0?), so replaying it sample by sample would not reproduce the batch's; put it in eval "
                    f"mode, or freeze its parameters"
                ) from e
            raise UnsupportedModuleError(
                f"'{self.path}' ({type(module).__name__}): the per-module fallback cannot run its forward sample by "
                f"sample under torch.func.vmap ({type(e).__name__}: {e}); freeze its parameters, or give it a rule"
            ) from e
        if call.reference is not None:
            self._check_outputs(module, call.reference, outs)
        return grads

    def _check_outputs(self, module, reference, outs):
        for i, (want, got) in enumerate(zip(reference, outs)):
            diff, scale = difference(got, want)
            if not diff <= OUTPUT_CHECK_TOL.get(want.dtype, 1e-4) * max(scale, 1e-30):
                raise UnsupportedModuleError(
                    f"'{self.path}' ({type(module).__name__}): its output {i} computed sample by sample differs from "
                    f"the batch's (max abs difference {diff:.3g} of max {scale:.3g}): its forward mixes samples (batch "
                    f"statistics) or draws random numbers (Dropout in train mode with p > 0). Put it in eval mode, or "
                    f"freeze its parameters"
                )


def difference(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(the largest |got - want|, the largest |want|): how close a replayed output comes."""
    if not want.numel():
        return 0.0, 0.0
    return (got - want).abs().max().item(), want.abs().max().item()
