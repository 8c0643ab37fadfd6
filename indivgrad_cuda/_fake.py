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
def _act_outer_fake(
    x, upstream, pre, activation="relu", layout="in_out", negative_slope=0.01, alpha=1.0, beta=1.0, threshold=20.0
):
    return x.new_empty(_outer_shape(x, upstream, layout)), upstream.new_empty(upstream.shape)


@torch.library.register_fake("indivgrad_cuda::act_outer_out")
def _act_outer_out_fake(x, upstream, pre, activation, layout, negative_slope, alpha, beta, threshold, out, bias_out):
    return None


def _acc(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("indivgrad_cuda::seq_outer")
def _seq_outer_fake(x, g, layout="in_out"):
    return x.new_empty(_outer_shape(x[:, 0], g[:, 0], layout))


@torch.library.register_fake("indivgrad_cuda::seq_outer_out")
def _seq_outer_out_fake(x, g, layout, out):
    return None


@torch.library.register_fake("indivgrad_cuda::linear_sq_norms")
def _linear_sq_norms_fake(x, g, method="auto"):
    return x.new_empty(x.shape[:1], dtype=_acc(x.dtype))


@torch.library.register_fake("indivgrad_cuda::embedding_grads")
def _embedding_grads_fake(ids, g, num_embeddings, padding_idx=None):
    return g.new_empty((g.shape[0], num_embeddings, g.shape[2]))


@torch.library.register_fake("indivgrad_cuda::embedding_grads_out")
def _embedding_grads_out_fake(ids, g, padding_idx, out):
    return None


@torch.library.register_fake("indivgrad_cuda::embedding_sq_norms")
def _embedding_sq_norms_fake(ids, g, padding_idx=None, method="auto"):
    return g.new_empty(g.shape[:1], dtype=_acc(g.dtype))


@torch.library.register_fake("indivgrad_cuda::layer_norm_grads")
def _layer_norm_grads_fake(x, g, normalized_shape, eps):
    shape = (x.shape[0], *normalized_shape)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.register_fake("indivgrad_cuda::linear_layer_sq_norms")
def _linear_layer_sq_norms_fake(x, g, method, weight, bias, out):
    return None


@torch.library.register_fake("indivgrad_cuda::layer_norm_sq_norms")
def _layer_norm_sq_norms_fake(x, g, normalized_shape, eps, weight, bias, out):
    return None


@torch.library.register_fake("indivgrad_cuda::linear_gram")
def _linear_gram_fake(xa, ga, xb, gb, bias=0.0, method="auto"):
    return xa.new_empty((xa.shape[0], xb.shape[0]), dtype=_acc(xa.dtype))


@torch.library.register_fake("indivgrad_cuda::embedding_gram")
def _embedding_gram_fake(ids_a, ga, ids_b, gb, padding_idx=None):
    return ga.new_empty((ids_a.shape[0], ids_b.shape[0]), dtype=_acc(ga.dtype))
