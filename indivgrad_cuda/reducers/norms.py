"""Per-sample gradient norms, never forming the per-sample gradients of all samples at once."""

import torch

from indivgrad_cuda.layers import ties
from indivgrad_cuda.reducers.visits import LayerVisits


def squared_norm_buffer(params, n, device, kept=None) -> torch.Tensor:
    """[P, N] for the squared norms of the P parameters that require grad (float32 for half
    types); the engine's kept one (``kept``, a buffers.Kept) when given."""
    acc = torch.float32
    dtypes = {p.dtype for p, _ in params.values()}
    if dtypes and not dtypes & {torch.float16, torch.bfloat16}:
        acc = torch.float64 if torch.float64 in dtypes else torch.float32
    if params:
        device = next(iter(params.values()))[0].device
    if kept is not None:
        return kept.get("squared norms", (len(params), n), acc, device)
    return torch.empty(len(params), n, dtype=acc, device=device)


class NormsReducer:
    """For the hooks capture: ``visit(i, f, n0, n1)`` writes layer i's squared norms into
    their rows of sq (a tied parameter's once its last use arrives, cross terms included),
    one op per layer where its rows follow one another (the rule's write_sq_norms), and
    returns the layer's split (own attrs, tied groups) for a caller that reduces more."""

    def __init__(self, layers, params, sq: torch.Tensor, method: str):
        self.layers, self.sq, self.method = layers, sq, method
        self.rows = {name: i for i, name in enumerate(params)}  # sq's rows: params' order
        self.visits = LayerVisits(layers)

    def visit(self, i, f, n0, n1):
        layer, sq = self.layers[i], self.sq
        own, tied = self.visits.visit(i, f, n1 - n0)
        if own:
            rows = [self.rows[layer.names[a]] for a in own]
            r0, k = rows[0], len(rows)
            if f is None:
                for r in rows:
                    sq[r, n0:n1].zero_()
            elif rows == list(range(r0, r0 + k)):
                layer.rule.write_sq_norms(layer.module, f, own, self.method, sq[r0 : r0 + k, n0:n1])
            else:
                got = layer.rule.sq_norms(layer.module, f, own, self.method)
                for a, r in zip(own, rows):
                    _write(sq[r, n0:n1], got.get(a))
        for name, uses in tied:
            _write(sq[self.rows[name], n0:n1], ties.sq_norms(uses, self.method) if uses else None)
        return own, tied


def _write(row: torch.Tensor, value) -> None:
    """A parameter's squared norms into its row of sq (zeros where none: no gradient reached it)."""
    if value is None:
        row.zero_()
    else:
        row.copy_(value)


def norms(engine, inputs, target, loss_fn, reduction, per_param, generator):
    cap, n = engine._begin(inputs, reduction, generator)
    layers, params = engine._params(cap, "out_in")
    sq = squared_norm_buffer(params, n, engine._device(), engine._kept)
    if cap is engine._native:
        cap.norms(inputs, target, loss_fn, reduction, generator, sq)
    else:
        reducer = NormsReducer(layers, params, sq, engine.norm_method)
        graphed = cap.graphable(layers, inputs, engine.max_chunk)
        cap.run(
            layers,
            inputs,
            target,
            loss_fn,
            reduction,
            generator,
            engine.max_chunk,
            reducer.visit,
            graph_key=("norms", engine.norm_method, sq.data_ptr()) if graphed else None,
        )
    total = sq.sum(0).sqrt()
    if per_param:
        return total, dict(zip(params, sq.sqrt().unbind(0)))
    return total
