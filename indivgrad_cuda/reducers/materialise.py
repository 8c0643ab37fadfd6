"""Per-sample gradients ``{name: [N, *shape]}``, written chunk by chunk into buffers the
engine keeps for the next call with the same shapes, in ``out_dtype`` (default: each
parameter's dtype): the layer rules form them from the factors in the buffer's dtype (the
products of half factors are exact in float32), or, where they are small, in float32, and
write each once."""

from typing import Optional

import torch

from indivgrad_cuda.buffers import allocate, check_out_buffers
from indivgrad_cuda.ops import LAYOUTS
from indivgrad_cuda.reducers.visits import LayerVisits

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ResultBuffers:
    """The engine's result buffers, reused by the next call with the same N, dtypes, devices,
    layout and set of the caller's ``out`` names."""

    def __init__(self):
        self.key = self.buffers = None

    def get(self, params, n, layout, out, out_dtype=None) -> dict[str, torch.Tensor]:
        specs = {name: ((n, *shape), out_dtype or p.dtype, p.device) for name, (p, shape) in params.items()}
        out = dict(out or {})
        check_out_buffers(out, specs, "the parameter's dtype" if out_dtype is None else "out_dtype")
        key = (tuple(specs.items()), layout, frozenset(out))
        if self.key != key:
            self.key, self.buffers = None, None  # free the old buffers first
            self.buffers = allocate({k: s for k, s in specs.items() if k not in out})
            self.key = key
        results = dict(self.buffers)
        results.update(out)
        return {name: results[name] for name in specs}  # in named_parameters() order


def per_sample_grads(engine, inputs, target, loss_fn, reduction, layout, into, out, generator, out_dtype=None):
    cap, n = engine._begin(inputs, reduction, generator)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if into not in (None, "grad_sample"):
        raise ValueError(f"into: expected None or 'grad_sample', got {into!r}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype: expected None or one of {OUT_DTYPES}, got {out_dtype!r}")
    layers, params = engine._params(cap, layout)
    if cap is engine._native and any(out_dtype not in (None, p.dtype) for p, _ in params.values()):
        # the native capture writes the parameters' dtype: the hooks capture writes any
        if engine._hooks is None:
            raise ValueError(
                f"out_dtype={out_dtype}: capture='native' writes per-sample gradients in the parameters' dtype; "
                f"use capture='auto' or 'hooks' for another"
            )
        cap = engine._hooks
        layers, params = engine._params(cap, layout)
    results = engine._results.get(params, n, layout, out, out_dtype)
    if cap is engine._native:
        cap.grads(inputs, target, loss_fn, reduction, generator, layout, results)
    else:
        visits = LayerVisits(layers)

        def visit(i, f, n0, n1):
            rows = slice(n0, n1)
            own, tied = visits.visit(i, f, n1 - n0)
            layer = layers[i]
            dst = {attr: results[layer.names[attr]][rows] for attr in own if layer.names[attr] in results}
            _write(layer.rule, layer.module, f, layout, dst)
            for name, uses in tied:
                if name in results:
                    _write_tied(uses, results[name][rows])

        graphed = cap.graphable(layers, inputs, engine.max_chunk)  # the results' addresses are in the key
        key = ("grads", layout, *(t.data_ptr() for t in results.values())) if graphed else None
        cap.run(layers, inputs, target, loss_fn, reduction, generator, engine.max_chunk, visit, graph_key=key)
    if into == "grad_sample":
        by_name = dict(engine.model.named_parameters())
        for name, t in results.items():
            by_name[name].grad_sample = t
    return results


def _write(rule, module, f, layout, dst: dict[str, torch.Tensor]) -> None:
    if f is None:  # no gradient reached the layer
        for t in dst.values():
            t.zero_()
    elif dst:
        rule.grads(module, f, layout, dst)


def _write_tied(uses, dst: torch.Tensor) -> None:
    """The sum of the uses' per-sample gradients, each in the parameter's own shape."""
    if not uses:
        dst.zero_()
    spare: Optional[torch.Tensor] = None
    for k, u in enumerate(uses):
        if k == 0:
            u.rule.grads(u.module, u.f, "out_in", {u.attr: dst})
            continue
        spare = torch.empty_like(dst) if spare is None else spare
        u.rule.grads(u.module, u.f, "out_in", {u.attr: spare})
        dst.add_(spare)
