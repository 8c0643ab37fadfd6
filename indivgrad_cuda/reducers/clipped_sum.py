"""DP-SGD's step: the sum of the per-sample gradients, each clipped (reducers/clipping.py), as ``p.grad``."""

import math
import sys
from typing import Callable, Optional

import torch

from indivgrad_cuda import randomness
from indivgrad_cuda.reducers.clipping import Clipping, resolve_groups
from indivgrad_cuda.reducers.norms import NormsReducer, squared_norm_buffer


def is_sharded(p) -> bool:
    """A DTensor parameter (FSDP2's; no import: a DTensor exists only once its module is loaded)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(p, dtensor.DTensor)


def clipping_of(params, max_norm, clip_fn, stability, clip_groups) -> Clipping:
    """The call's clipping over the trainable parameters ``params`` (names in order)."""
    groups = None if clip_groups is None else resolve_groups(list(params), clip_groups)
    return Clipping(max_norm, clip_fn, stability, groups, list(params))


def clipped_grad_sum(
    engine,
    inputs,
    target,
    loss_fn,
    max_norm,
    reduction,
    noise_multiplier,
    generator,
    clip_fn,
    stability,
    clip_groups,
    sink: Optional[Callable[[dict], None]] = None,
):
    """``sink`` (a sharded model's DP-SGD step, privacy/sharding.py): instead of ``p.grad``,
    each layer's sums, of the parameters' full shapes, are handed to ``sink({name: sum})`` as
    soon as they are formed (in the order the layers arrived, the same on every process), and
    dropped after; the batch runs in one chunk, its
    forward and backward run even when it is empty (every process takes part in the
    model's collectives); no noise, no CUDA graphs."""
    cap, n = engine._begin(inputs, reduction, generator)
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier: expected a finite number >= 0, got {noise_multiplier!r}")
    layers, params = engine._params(cap, "out_in")
    clipping = clipping_of(params, max_norm, clip_fn, stability, clip_groups)
    if sink is not None:
        return _clipped_into_sink(engine, cap, layers, params, clipping, inputs, target, loss_fn, reduction, n, sink)
    grads = {name: _grad_tensor(p) for name, (p, _) in params.items()}
    sq = squared_norm_buffer(params, n, engine._device(), engine._kept)
    graphed = cap is engine._hooks and cap.graphable(layers, inputs, engine.max_chunk)
    into = grads
    if graphed:  # a graph writes the engine's kept buffers, copied into p.grad after (p.grad may move)
        into = {name: engine._kept.get(f"clipped {name}", g.shape, g.dtype, g.device) for name, g in grads.items()}
    if n == 0:
        for g in into.values():
            g.zero_()
    if cap is engine._native:
        cap.clipped_sum(inputs, target, loss_fn, reduction, generator, clipping, grads, sq)
    else:
        reducer = ClippedSumReducer(layers, params, sq, clipping, into, engine.norm_method)
        key = ("clipped", clipping.key(), engine.norm_method, sq.data_ptr(), *(t.data_ptr() for t in into.values()))
        cap.run(
            layers,
            inputs,
            target,
            loss_fn,
            reduction,
            generator,
            engine.max_chunk,
            reducer.visit,
            reducer.end_chunk,
            graph_key=key if graphed else None,
        )
        if graphed:
            torch._foreach_copy_(list(grads.values()), list(into.values()))
    if noise_multiplier > 0:
        randomness.add_noise(list(grads.values()), float(noise_multiplier) * clipping.max_norm, generator)
    return clipping.norms(sq)


def _clipped_into_sink(engine, cap, layers, params, clipping, inputs, target, loss_fn, reduction, n, sink):
    if cap is not engine._hooks or engine.max_chunk is not None:
        raise ValueError("a sharded model's clipped sum runs on the hooks capture, in one chunk (max_chunk=None)")
    sq = squared_norm_buffer(params, n, engine._device())
    into = _Transient({name: p for name, (p, _) in params.items()})

    def done(names):
        sink({name: into.pop(name) for name in names})

    reducer = ClippedSumReducer(layers, params, sq, clipping, into, engine.norm_method, done)
    cap.run(
        layers, inputs, target, loss_fn, reduction, None, None, reducer.visit, reducer.end_chunk, empty_forward=True
    )
    return clipping.norms(sq)


class _Transient(dict):
    """Each parameter's sum buffer (plain, of its full shape), allocated when the reducer
    first writes it, and dropped once handed to the sink: one layer's at a time."""

    def __init__(self, params):
        super().__init__()
        self.params = params

    def __missing__(self, name):
        p = self.params[name]
        buffer = self[name] = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        return buffer


class ClippedSumReducer:
    """For the hooks capture: each layer's norms as it arrives (NormsReducer), and each
    group's clipped sums as soon as the norms of all its parameters are in: with one group
    (flat clipping) after the last layer, each layer's factors held until then; with a group
    per layer (or parameter) as each layer arrives, its factors freed at once. ``done(names)``,
    when given, is told the parameters of each layer (or tied parameter) whose sums for the
    chunk are in ``into``, one layer after another, in the order the layers arrived."""

    def __init__(self, layers, params, sq, clipping: Clipping, into, method: str, done: Optional[Callable] = None):
        self.norms = NormsReducer(layers, params, sq, method)
        self.sq, self.clipping, self.into, self.done = sq, clipping, into, done
        self.sizes = [len(g) for g in clipping.groups]
        self.tied = self.norms.visits.tied
        self._start_chunk()

    def _start_chunk(self):
        self.left = list(self.sizes)  # parameters of each group whose norms are not in yet
        self.pending = [[] for _ in self.sizes]  # (layer, factors, attrs) or (None, uses, name) by group

    def visit(self, i, f, n0, n1):
        if f is not None:
            f.cache["clipping"] = True  # a rule may pick its norms' form for the clipped sum that follows
        own, tied = self.norms.visit(i, f, n0, n1)
        layer, group_of, touched = self.norms.layers[i], self.clipping.group_of, []
        for attr in own:
            k = group_of[layer.names[attr]]
            if k not in touched:
                touched.append(k)
                self.pending[k].append((layer, f, []))
            self.pending[k][-1][2].append(attr)
            self.left[k] -= 1
        for name, uses in tied:
            k = group_of[name]
            if k not in touched:
                touched.append(k)
            self.pending[k].append((None, uses, name))
            self.left[k] -= 1
        waiting = False
        for k in touched:
            if self.left[k] == 0 and self.pending[k]:
                self._flush(k, n0, n1)
            else:
                waiting = True
        if waiting and f is not None and not any(layer.names[a] in self.tied for a in layer.trainable()):
            layer.rule.release(layer.module, f)  # held until its group's norms are in: keep only what it needs

    def end_chunk(self, n0, n1):
        for k in range(len(self.sizes)):  # every layer has been visited: nothing waits (kept as a safeguard)
            if self.pending[k]:
                self._flush(k, n0, n1)
        self._start_chunk()

    def _flush(self, k, n0, n1):
        coef = self.clipping.group_coefficients(k, self.sq[:, n0:n1])
        into, accumulate = self.into, n0 > 0
        for layer, f, attrs in self.pending[k]:
            if layer is not None:
                names = [layer.names[a] for a in attrs]
                _add(layer.rule, layer.module, f, coef, {a: into[n] for a, n in zip(attrs, names)}, accumulate)
            else:
                uses, names = f, [attrs]
                if not uses and not accumulate:
                    into[attrs].zero_()
                for j, u in enumerate(uses):
                    u.rule.clipped_sum(u.module, u.f, coef, {u.attr: into[attrs]}, accumulate or j > 0)
            if self.done is not None:
                self.done(names)
        self.pending[k] = []


def _add(rule, module, f, coef, dst, accumulate):
    """``dst[attr] (+)= sum_n coef[n] * g_n`` for a layer's own parameters."""
    if f is None:
        if not accumulate:
            for t in dst.values():
                t.zero_()
    elif dst:
        rule.clipped_sum(module, f, coef, dst, accumulate)


def _grad_tensor(p):
    if is_sharded(p):
        raise ValueError(
            "model: its parameters are sharded (FSDP2's fully_shard), so a process cannot hold the sum of its own "
            "samples' clipped gradients in p.grad; use indivgrad_cuda.privacy.DPSGD, which reduce-scatters the "
            "sums of every process's samples into each process's shard"
        )
    if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
        p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
    return p.grad
