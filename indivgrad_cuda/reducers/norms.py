"""Per-sample gradient norms, never forming the per-sample gradients of all samples at once."""

import torch

from indivgrad_cuda.layers import ties
from indivgrad_cuda.reducers.visits import LayerVisits


def squared_norm_buffer(params, n, device) -> torch.Tensor:
    """[P, N] for the squared norms of the P parameters that require grad (float32 for half types)."""
    acc = torch.float32
    dtypes = {p.dtype for p, _ in params.values()}
    if dtypes and not dtypes & {torch.float16, torch.bfloat16}:
        acc = torch.float64 if torch.float64 in dtypes else torch.float32
    if params:
        device = next(iter(params.values()))[0].device
    return torch.empty(len(params), n, dtype=acc, device=device)


class NormsReducer:
    """For the hooks capture: ``visit(i, f, n0, n1)`` keeps layer i's squared norms (a tied
    parameter's once its last use arrives, cross terms included) and returns the layer's
    split (own attrs, tied groups) for a caller that reduces more; ``end_chunk(n0, n1)``
    writes the chunk's into sq's columns in one copy (one per parameter cost a launch each
    on a GPU, where small models are bound by launches)."""

    def __init__(self, layers, params, sq: torch.Tensor, method: str):
        self.layers, self.sq, self.method = layers, sq, method
        self.rows = {name: i for i, name in enumerate(params)}  # sq's rows: params' order
        self.visits = LayerVisits(layers)
        self.got = [None] * sq.shape[0]

    def visit(self, i, f, n0, n1):
        layer, n = self.layers[i], n1 - n0
        own, tied = self.visits.visit(i, f, n)
        got = {} if f is None or not own else layer.rule.sq_norms(layer.module, f, own, self.method)
        for attr in own:
            self.got[self.rows[layer.names[attr]]] = got[attr] if attr in got else self.sq.new_zeros(n)
        for name, uses in tied:
            self.got[self.rows[name]] = ties.sq_norms(uses, self.method) if uses else self.sq.new_zeros(n)
        return own, tied

    def end_chunk(self, n0, n1):
        if self.got:
            self.sq[:, n0:n1] = torch.stack(self.got)
            self.got = [None] * len(self.got)


def norms(engine, inputs, target, loss_fn, reduction, per_param, generator):
    cap, n = engine._begin(inputs, reduction, generator)
    layers, params = engine._params(cap, "out_in")
    sq = squared_norm_buffer(params, n, engine._device())
    if cap is engine._native:
        cap.norms(inputs, target, loss_fn, reduction, generator, sq)
    else:
        reducer = NormsReducer(layers, params, sq, engine.norm_method)
        cap.run(
            layers, inputs, target, loss_fn, reduction, generator, engine.max_chunk, reducer.visit, reducer.end_chunk
        )
    total = sq.sum(0).sqrt()
    if per_param:
        return total, dict(zip(params, sq.sqrt().unbind(0)))
    return total
