"""DP-SGD's step: the sum of the per-sample gradients, each clipped (reducers/clipping.py), as ``p.grad``."""

import math
from typing import Callable, Optional

import torch

from indivgrad_cuda import randomness
from indivgrad_cuda.reducers.clipping import Clipping, resolve_groups
from indivgrad_cuda.reducers.norms import NormsReducer, squared_norm_buffer


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
    clip_fn="abadi",
    stability=0.01,
    clip_groups=None,
):
    cap, n = engine._begin(inputs, reduction, generator)
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier: expected a finite number >= 0, got {noise_multiplier!r}")
    layers, params = engine._params(cap, "out_in")
    clipping = clipping_of(params, max_norm, clip_fn, stability, clip_groups)
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


class ClippedSumReducer:
    """For the hooks capture: each layer's norms as it arrives (NormsReducer), and each
    group's clipped sums as soon as the norms of all its parameters are in: with one group
    (flat clipping) after the last layer, each layer's factors held until then; with a group
    per layer (or parameter) as each layer arrives, its factors freed at once. ``done(names)``,
    when given, is told each group's parameters once their sums for the chunk are in
    ``into``."""

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
                _add(layer.rule, layer.module, f, coef, {a: into[layer.names[a]] for a in attrs}, accumulate)
                continue
            uses, name = f, attrs
            if not uses and not accumulate:
                into[name].zero_()
            for j, u in enumerate(uses):
                u.rule.clipped_sum(u.module, u.f, coef, {u.attr: into[name]}, accumulate or j > 0)
        self.pending[k] = []
        if self.done is not None:
            self.done(self.clipping.groups[k])


def _add(rule, module, f, coef, dst, accumulate):
    """``dst[attr] (+)= sum_n coef[n] * g_n`` for a layer's own parameters."""
    if f is None:
        if not accumulate:
            for t in dst.values():
                t.zero_()
    elif dst:
        rule.clipped_sum(module, f, coef, dst, accumulate)


def _grad_tensor(p):
    if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
        p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
    return p.grad
