"""Inner products between two sets' per-sample gradients, from each layer's factors (the
layer rules' ``gram``), never from per-sample gradients of the whole model."""

from typing import Optional

import torch
from torch import nn

from indivgrad_cuda.chunking import batch_size, named_tensors, split_batch
from indivgrad_cuda.layers import acc_dtype, ties
from indivgrad_cuda.reducers.visits import LayerVisits


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


def attribution_setup(engine, inputs, reduction, name):
    """Checks one set of the attribution methods; returns its capture's layers, the model's
    device and its parameters' dtype."""
    cap, _ = engine._begin(inputs, reduction, None)
    device = cap.device()
    for where, t in named_tensors(inputs):
        if t.device != device:
            raise ValueError(f"{name}{where}: expected a tensor on {device} (the model's), got {t.device}")
    training = [
        path for path, m in engine.model.named_modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0
    ]
    if training:
        raise ValueError(
            f"modules {training} (Dropout) are in train mode: attribution needs each sample's gradient to be "
            f"deterministic; call model.eval() first"
        )
    layers = cap.layers()
    return layers, device, parameters_dtype_device(layers)[0]


def parameters_dtype_device(layers) -> tuple[torch.dtype, torch.device]:
    """The trainable parameters' dtype and device (float32 on the CPU when there are none)."""
    for layer in layers:
        for p in layer.trainable().values():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def factor_runner(engine, loss_fn, reduction):
    """run(inputs, target, visit): one set's forward and backward, each layer's factors to
    visit(layers, i, factors or None, n0, n1)."""

    def run(inputs, target, visit):
        cap, _ = engine._begin(inputs, reduction, None)
        layers = cap.layers()
        cap.run(
            layers,
            inputs,
            target,
            loss_fn,
            reduction,
            None,
            engine.max_chunk,
            lambda i, f, n0, n1: visit(layers, i, f, n0, n1),
        )

    return run


def inner_products(engine, inputs_a, target_a, inputs_b, target_b, loss_fn, reduction, per_param):
    if not isinstance(per_param, bool):
        raise TypeError(f"per_param: expected True or False, got {per_param!r}")
    check_same_structure(inputs_a, inputs_b)
    layers, device, dtype = attribution_setup(engine, inputs_a, reduction, "inputs_a")
    attribution_setup(engine, inputs_b, reduction, "inputs_b")
    run = factor_runner(engine, loss_fn, reduction)
    block: Optional[int] = engine.max_chunk
    na, nb = batch_size(inputs_a), batch_size(inputs_b)
    total = torch.zeros(na, nb, dtype=acc_dtype(dtype), device=device)
    names = list(dict.fromkeys(layer.names[attr] for layer in layers for attr in layer.trainable()))
    per = {name: torch.zeros_like(total) for name in names} if per_param else {}
    for m0, m1, chunk_b, tb in split_batch(inputs_b, target_b, nb, max(1, nb if block is None else block)):
        if na == 0:
            break
        held = _Held()
        run(chunk_b, tb, held.visit)
        run(inputs_a, target_a, _Against(held, slice(m0, m1), total, per).visit)
    return (total, per) if per_param else total


class _Held:
    """Set b's block: each layer's factors, and each tied parameter's merged uses."""

    def __init__(self):
        self.factors, self.tied, self.visits = {}, {}, None

    def visit(self, layers, i, f, n0, n1):
        self.visits = self.visits or LayerVisits(layers)
        _, tied = self.visits.visit(i, f, n1 - n0)
        if f is not None:
            self.factors[layers[i].path] = f
        self.tied.update(tied)


class _Against:
    """Adds the Grams of set a's rows n0..n1 against the held block of b (columns cols)."""

    def __init__(self, held, cols, total, per):
        self.held, self.cols, self.total, self.per = held, cols, total, per
        self.visits = None

    def visit(self, layers, i, f, n0, n1):
        self.visits = self.visits or LayerVisits(layers)
        own, tied = self.visits.visit(i, f, n1 - n0)
        layer = layers[i]
        fb = self.held.factors.get(layer.path)
        if f is not None and fb is not None and own:  # else no gradient reached the layer on one side: zeros
            for attrs, k in layer.rule.gram(layer.module, f, fb, own, bool(self.per)).items():
                self._add(layer.names[attrs[0]], k, n0, n1)
        for name, uses in tied:
            for ua in uses:
                for ub in self.held.tied.get(name, []):
                    self._add(name, ties.gram(ua, ub), n0, n1)

    def _add(self, name, k, n0, n1):
        self.total[n0:n1, self.cols] += k
        if self.per:
            self.per[name][n0:n1, self.cols] += k
