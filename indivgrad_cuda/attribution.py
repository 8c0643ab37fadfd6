"""Reducers for data attribution: inner products between two sets' per-sample gradients,
and their random projections, both from each layer's factors (the layer rules' ``gram`` and
``project``), never from per-sample gradients of the whole model."""

import functools
from typing import Callable, Optional

import torch

from indivgrad_cuda.capture.layers import Layer
from indivgrad_cuda.chunking import batch_size, split_batch
from indivgrad_cuda.layers import Factors
from indivgrad_cuda.projection import Projection


def check_same_structure(inputs_a, inputs_b) -> None:
    """inputs_b must hold tensors where inputs_a does, of the same dtypes, devices and
    number of dims (dim 0, and a sequence's length, may differ)."""

    def parts(inputs):
        if isinstance(inputs, torch.Tensor):
            return "a Tensor", {"": inputs}
        if isinstance(inputs, tuple):
            return f"a tuple of {len(inputs)}", {f"[{i}]": v for i, v in enumerate(inputs)}
        if isinstance(inputs, dict):
            return f"a dict with keys {sorted(inputs)}", {f"[{k!r}]": v for k, v in inputs.items()}
        return type(inputs).__name__, {}

    kind_a, items_a = parts(inputs_a)
    kind_b, items_b = parts(inputs_b)
    if kind_a != kind_b:
        raise ValueError(f"inputs_b: expected the structure of inputs_a ({kind_a}), got {kind_b}")
    for where, a in items_a.items():
        b = items_b[where]
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            raise ValueError(
                f"inputs_b{where}: expected {'a Tensor' if isinstance(a, torch.Tensor) else type(a).__name__} "
                f"(as inputs_a{where}), got {type(b).__name__}"
            )
        if isinstance(a, torch.Tensor) and (a.dtype, a.device, a.dim()) != (b.dtype, b.device, b.dim()):
            raise ValueError(
                f"inputs_b{where}: expected a {a.dim()}-D {a.dtype} tensor on {a.device} (as inputs_a{where}), "
                f"got a {b.dim()}-D {b.dtype} tensor on {b.device}"
            )


def inner_products(
    run: Callable, a: tuple, b: tuple, layers: list[Layer], per_param: bool, block: Optional[int], dtype, device
):
    """``K [N_a, N_b]`` (and ``{name: [N_a, N_b]}`` when per_param) in ``dtype``. ``run(inputs,
    target, visit)`` runs one set's forward and backward, chunk by chunk, handing each of
    ``layers``' factors to visit. Set b goes in blocks of ``block`` samples (all at once
    when None), each block's factors kept while set a streams past them."""
    (inputs_a, target_a), (inputs_b, target_b) = a, b
    na, nb = batch_size(inputs_a), batch_size(inputs_b)
    total = torch.zeros(na, nb, dtype=dtype, device=device)
    names = [layer.names[attr] for layer in layers for attr in layer.trainable()]
    per = {name: torch.zeros_like(total) for name in names} if per_param else {}
    for m0, m1, chunk_b, tb in split_batch(inputs_b, target_b, nb, max(1, nb if block is None else block)):
        if na == 0:
            break
        held: dict[str, Factors] = {}
        run(chunk_b, tb, functools.partial(_hold, held))
        run(inputs_a, target_a, functools.partial(_against_held, held, slice(m0, m1), total, per))
    return (total, per) if per_param else total


def _hold(held, layer, f, n0, n1):
    if f is not None:
        held[layer.path] = f


def _against_held(held, cols, total, per, layer, f, n0, n1):
    """Adds the Grams of set a's rows n0..n1 against the held block of b (columns cols)."""
    fb = held.get(layer.path)
    if f is None or fb is None:  # no gradient reached the layer on one side: zeros
        return
    for attrs, k in layer.rule.gram(layer.module, f, fb, list(layer.trainable()), bool(per)).items():
        total[n0:n1, cols] += k
        if per:
            per[layer.names[attrs[0]]][n0:n1, cols] = k


def project(run: Callable, inputs, target, proj: Projection, device):
    """``[N, D_proj]``: each sample's gradient projected by ``proj``, layer by layer. ``run``
    as :func:`inner_products` takes it."""
    n = batch_size(inputs)
    out = torch.zeros(n, proj.dim, dtype=proj.dtype, device=device)
    if n == 0:
        return out

    def visit(layer, f, n0, n1):
        if f is None:  # no gradient reached the layer: zeros
            return
        mats = {attr: proj.matrices[name] for attr, name in layer.names.items() if name in proj.matrices}
        for attr, v in layer.rule.project(layer.module, f, mats).items():
            out[n0:n1, proj.columns[layer.names[attr]]] = v

    run(inputs, target, visit)
    return out
