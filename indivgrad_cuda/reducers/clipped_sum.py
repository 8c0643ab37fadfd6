"""DP-SGD's step: the sum of the per-sample gradients, each clipped to a norm, as ``p.grad``."""

import math

import torch

from indivgrad_cuda import randomness
from indivgrad_cuda.reducers.norms import NormsReducer, squared_norm_buffer


def clip_coefficients(sq: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (||g_n|| + 1e-6)) per sample, from the squared norms [P, N]."""
    return (max_norm / (sq.sum(0).sqrt() + 1e-6)).clamp_max(1.0)


def clipped_grad_sum(engine, inputs, target, loss_fn, max_norm, reduction, noise_multiplier, generator):
    cap, n = engine._begin(inputs, reduction, generator)
    if not (isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm: expected a positive finite number, got {max_norm!r}")
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier: expected a number >= 0, got {noise_multiplier!r}")
    max_norm = float(max_norm)
    layers, params = engine._params(cap, "out_in")
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
        cap.clipped_sum(inputs, target, loss_fn, reduction, generator, max_norm, grads, sq)
    else:
        reducer = NormsReducer(layers, params, sq, engine.norm_method)
        pending = []  # (layer, factors, own attrs, tied groups) of the chunk: the GEMMs wait for every layer's norms

        def visit(i, f, n0, n1):
            if f is not None:
                f.cache["clipping"] = True  # a rule may pick its norms' form for the clipped sum that follows
            own, tied = reducer.visit(i, f, n0, n1)
            layer = layers[i]
            if f is not None and not any(layer.names[a] in reducer.visits.tied for a in layer.trainable()):
                layer.rule.release(layer.module, f)  # held until every layer's norms are in: keep only what it needs
            pending.append((layer, f, own, tied))

        def end_chunk(n0, n1):
            coef = clip_coefficients(sq[:, n0:n1], max_norm)
            for layer, f, own, tied in pending:
                dst = {attr: into[layer.names[attr]] for attr in own}
                _add(layer.rule, layer.module, f, coef, dst, n0 > 0)
                for name, uses in tied:
                    if not uses and n0 == 0:
                        into[name].zero_()
                    for k, u in enumerate(uses):
                        u.rule.clipped_sum(u.module, u.f, coef, {u.attr: into[name]}, n0 > 0 or k > 0)
            pending.clear()

        key = ("clipped", max_norm, engine.norm_method, sq.data_ptr(), *(t.data_ptr() for t in into.values()))
        cap.run(
            layers,
            inputs,
            target,
            loss_fn,
            reduction,
            generator,
            engine.max_chunk,
            visit,
            end_chunk,
            graph_key=key if graphed else None,
        )
        if graphed:
            torch._foreach_copy_(list(grads.values()), list(into.values()))
    if noise_multiplier > 0:
        randomness.add_noise(list(grads.values()), float(noise_multiplier) * max_norm, generator)
    return sq.sum(0).sqrt()


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
