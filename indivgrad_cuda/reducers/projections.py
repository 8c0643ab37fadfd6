"""Each sample's gradient randomly projected (:mod:`indivgrad_cuda.projection`), layer by
layer from its factors (the layer rules' ``project``), never from per-sample gradients."""

import torch

from indivgrad_cuda.chunking import batch_size
from indivgrad_cuda.projection import Projection, build_projection
from indivgrad_cuda.reducers.inner_products import attribution_setup, factor_runner, parameters_dtype_device
from indivgrad_cuda.reducers.visits import LayerVisits


class ProjectionCache:
    """The engine's last projection, reused while its key (dim, seed, dtype, device and the
    trainable parameters of each layer) holds."""

    def __init__(self):
        self.key = self.projection = None

    def get(self, engine, dim, seed) -> Projection:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        layers = engine._layers()
        dtype, device = parameters_dtype_device(layers)
        key = (dim, seed, dtype, device, tuple((layer.path, tuple(layer.trainable())) for layer in layers))
        if self.key != key:
            self.projection = build_projection(layers, dim, seed, dtype, device)
            self.key = key
        return self.projection


def project(engine, inputs, target, loss_fn, dim, seed, reduction):
    proj = engine.projection(dim, seed=seed)
    _, device, _ = attribution_setup(engine, inputs, reduction, "inputs")
    n = batch_size(inputs)
    out = torch.zeros(n, proj.dim, dtype=proj.dtype, device=device)
    if n == 0:
        return out
    visits = None

    def visit(layers, i, f, n0, n1):
        nonlocal visits
        visits = visits or LayerVisits(layers)
        own, tied = visits.visit(i, f, n1 - n0)
        layer = layers[i]
        if f is not None and own:  # else no gradient reached the layer: zeros
            mats = {attr: proj.matrices[layer.names[attr]] for attr in own if layer.names[attr] in proj.matrices}
            for attr, v in layer.rule.project(layer.module, f, mats).items():
                out[n0:n1, proj.columns[layer.names[attr]]] = v
        for name, uses in tied:  # the projection is linear: each use adds its share
            for u in uses:
                out[n0:n1, proj.columns[name]] += u.rule.project(u.module, u.f, {u.attr: proj.matrices[name]})[u.attr]

    factor_runner(engine, loss_fn, reduction)(inputs, target, visit)
    return out
