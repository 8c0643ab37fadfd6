"""nn.GroupNorm and nn.InstanceNorm1d/2d/3d with affine parameters, on inputs [N, C, *S].

Both normalise each sample on its own (over groups of channels and the positions, or each
channel over the positions) and scale each channel: sample n's gradients are
``sum over positions of x̂ ⊙ g`` (weight) and ``sum of g`` (bias), each [N, C], where
``x̂ = (x - mean) / std`` is the normalised input. The weight's is formed as ``(sum x·g -
mean · sum g) / std`` from the statistics, in float32 for half types (as the modules' own
backward computes), so x̂ is never formed; every reduction is then that of a small
per-sample gradient.

InstanceNorm with ``track_running_stats=True`` normalises with each sample's own
statistics in train mode (nothing mixes across samples; the running statistics are
updated by each forward the engine runs, one per chunk of the batch, as a normal forward
of that chunk would) and with the running statistics in eval mode; ``x̂`` follows the
mode the module is in when the gradients are reduced. The engine never updates them
itself.
"""

import math

import torch
from torch import nn

from indivgrad_cuda.layers.base import WholeCalls, acc_dtype, cast
from indivgrad_cuda.layers.per_sample import PerSampleRule

INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class ChannelAffineRule(WholeCalls, PerSampleRule):
    """A normalisation of each sample followed by a per-channel affine map (dim 1)."""

    matrix_projections = False

    def statistics(self, module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std), each [N, C] or broadcastable to it, in the accumulation dtype:
        x̂ = (x - mean) / std per sample and channel."""
        raise NotImplementedError

    def per_sample(self, module, f):
        # sum_s x̂ g = (sum_s x g - mean · sum_s g) / std per channel: two reductions of the
        # factors (x·g without a temporary), never x̂ itself
        weight = bias = None
        if f.g[0].shape[0] == 0:  # no statistics to take
            empty = f.g[0].new_zeros(f.g[0].shape[:2], dtype=module.weight.dtype)
            return {"weight": empty, "bias": empty.clone()}
        for x, g in zip(f.a, f.g):
            acc = acc_dtype(g.dtype)
            n, c, s = g.shape[0], g.shape[1], math.prod(g.shape[2:])  # explicit: an empty batch has no -1
            xs, gs = cast(x, acc).reshape(n, c, s), cast(g, acc).reshape(n, c, s)
            mean, rstd = self.statistics(module, xs)
            b = gs.sum(2)
            w = (torch.einsum("ncs,ncs->nc", xs, gs) - mean * b) * rstd
            weight, bias = (w, b) if weight is None else (weight + w, bias + b)
        dtype = module.weight.dtype
        return {"weight": weight.to(dtype), "bias": bias.to(dtype)}


def _group_statistics(xs: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) [N, C] of xs [N, C, S] over groups of channels and the positions, as
    torch's group norm takes them (its kernel: a fraction of var_mean's time on CPU)."""
    n, c, s = xs.shape
    _, mean, rstd = torch.native_group_norm(xs, None, None, n, c, s, groups, eps)
    per = c // groups  # each group's channels share its statistics
    return mean.repeat_interleave(per, 1), rstd.repeat_interleave(per, 1)


class GroupNormRule(ChannelAffineRule):
    module_type = nn.GroupNorm

    def statistics(self, module, xs):
        return _group_statistics(xs, module.num_groups, module.eps)


class InstanceNormRule(ChannelAffineRule):
    def matches(self, module):
        return any(isinstance(module, cls) and type(module).forward is cls.forward for cls in INSTANCE_NORMS)

    def statistics(self, module, xs):
        if module.training or not module.track_running_stats:  # each sample's own statistics: a group per channel
            return _group_statistics(xs, xs.shape[1], module.eps)
        return module.running_mean.to(xs.dtype), torch.rsqrt(module.running_var.to(xs.dtype) + module.eps)


GROUP_NORM = GroupNormRule()
INSTANCE_NORM = InstanceNormRule()
