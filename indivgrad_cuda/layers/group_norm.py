"""nn.GroupNorm and nn.InstanceNorm1d/2d/3d with affine parameters, on inputs [N, C, *S].

Both normalise each sample on its own (over groups of channels and the positions, or each
channel over the positions) and scale each channel: sample n's gradients are
``sum over positions of x̂ ⊙ g`` (weight) and ``sum of g`` (bias), each [N, C], where
``x̂`` is the normalised input, formed in float32 for half types (as the modules' own
backward forms it), so every reduction is that of a small per-sample gradient.

InstanceNorm with ``track_running_stats=True`` normalises with each sample's own
statistics in train mode (nothing mixes across samples; the running statistics are
updated by each forward the engine runs, one per chunk of the batch, as a normal forward
of that chunk would) and with the running statistics in eval mode; ``x̂`` follows the
mode the module is in when the gradients are reduced. The engine never updates them
itself.
"""

import torch
import torch.nn.functional as F
from torch import nn

from indivgrad_cuda.layers.base import Factors, acc_dtype
from indivgrad_cuda.layers.per_sample import PerSampleRule

INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class ChannelAffineRule(PerSampleRule):
    """A normalisation of each sample followed by a per-channel affine map (dim 1)."""

    matrix_projections = False

    def record(self, module, args, kwargs, output, n, check=False):
        return args[0].detach()

    def output_grad(self, module, grads):
        return grads[0]

    def combine(self, records, grads):
        return Factors(list(records), list(grads))  # calls of any sizes: each reduced on its own

    def normalised(self, module, x: torch.Tensor) -> torch.Tensor:
        """x̂ [N, C, *S] in the accumulation dtype."""
        raise NotImplementedError

    def per_sample(self, module, f):
        weight = bias = None
        for x, g in zip(f.a, f.g):
            g = g.to(acc_dtype(g.dtype))
            n, c = g.shape[:2]
            w = (self.normalised(module, x) * g).reshape(n, c, -1).sum(2)  # [N, C, *S] or [N, C]
            b = g.reshape(n, c, -1).sum(2)
            weight, bias = (w, b) if weight is None else (weight + w, bias + b)
        dtype = module.weight.dtype
        return {"weight": weight.to(dtype), "bias": bias.to(dtype)}


class GroupNormRule(ChannelAffineRule):
    module_type = nn.GroupNorm

    def normalised(self, module, x):
        return F.group_norm(x.to(acc_dtype(x.dtype)), module.num_groups, None, None, module.eps)


class InstanceNormRule(ChannelAffineRule):
    def matches(self, module):
        return any(isinstance(module, cls) and type(module).forward is cls.forward for cls in INSTANCE_NORMS)

    def normalised(self, module, x):
        acc = acc_dtype(x.dtype)
        own = module.training or not module.track_running_stats
        if own:  # no running statistics passed: nothing is updated
            return F.instance_norm(x.to(acc), None, None, None, None, True, 0.0, module.eps)
        mean = module.running_mean.to(acc).view(1, -1, *([1] * (x.dim() - 2)))
        var = module.running_var.to(acc).view(1, -1, *([1] * (x.dim() - 2)))
        return (x.to(acc) - mean) * torch.rsqrt(var + module.eps)


GROUP_NORM = GroupNormRule()
INSTANCE_NORM = InstanceNormRule()
