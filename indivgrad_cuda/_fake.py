"""Fake (meta) implementations: output shapes for torch.compile and FakeTensor tracing."""

import torch


def _outer_shape(x, g, layout):
    return (x.shape[0], x.shape[1], g.shape[1]) if layout == "in_out" else (x.shape[0], g.shape[1], x.shape[1])


@torch.library.register_fake("indivgrad_cuda::outer")
def _outer_fake(x, g, layout="in_out"):
    return x.new_empty(_outer_shape(x, g, layout))


@torch.library.register_fake("indivgrad_cuda::outer_out")
def _outer_out_fake(x, g, layout, out):
    return None


@torch.library.register_fake("indivgrad_cuda::act_outer")
def _act_outer_fake(x, upstream, pre, activation="relu", layout="in_out", negative_slope=0.01, alpha=1.0,
                    beta=1.0, threshold=20.0):
    return x.new_empty(_outer_shape(x, upstream, layout)), upstream.new_empty(upstream.shape)


@torch.library.register_fake("indivgrad_cuda::act_outer_out")
def _act_outer_out_fake(x, upstream, pre, activation, layout, negative_slope, alpha, beta, threshold, out,
                        bias_out):
    return None
