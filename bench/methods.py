"""The methods bench/run.py compares. Each factory takes (model, x, y) — a float model, a
batch, binary targets; the loss is mean BCE-with-logits as in the seed — and returns a
callable whose result is checked against the float64 reference before it is timed:
per-sample gradients {name: [N, out, in]}, norms [N], or clipped sums {name: grad}.
Competitors are optional: a factory raises MissingDependency when its package is absent."""

import copy
import importlib.util

import torch
from torch import nn

import indivgrad_cuda as ig
from tests.reference import bmm_outer

LOSS = nn.BCEWithLogitsLoss()  # mean over the batch, as in the seed


class MissingDependency(Exception):
    pass


def _require(module, pip_name):
    if importlib.util.find_spec(module) is None:
        raise MissingDependency(f"{pip_name} not installed (pip install -e .[bench])")


def summed(model, x, y, **_):
    params = dict(model.named_parameters())

    def run():
        model.zero_grad(set_to_none=True)
        LOSS(model(x), y).backward()
        return {k: p.grad for k, p in params.items()}
    return run


def loop(model, x, y, **_):
    """One backward per sample."""
    params = dict(model.named_parameters())

    def run():
        out = {k: torch.empty(len(x), *p.shape, dtype=p.dtype, device=p.device) for k, p in params.items()}
        for n in range(len(x)):
            model.zero_grad(set_to_none=True)
            LOSS(model(x[n:n + 1]), y[n:n + 1]).backward()
            for k, p in params.items():
                out[k][n] = p.grad
        return out
    return run


def seed_bmm(model, x, y, **_):
    """The seed's method: autograd to each layer's output, then torch.bmm per layer."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]

    def run():
        xs, cs, h = [], [], x
        for m in model:
            if isinstance(m, nn.Linear):
                xs.append(h)
                h = m(h)
                cs.append(h)
            else:
                h = m(h)
        gs = torch.autograd.grad(LOSS(h, y) * len(x), cs)
        out = {}
        for (name, m), xi, g in zip(linears, xs, gs):
            out[f"{name}.weight"] = bmm_outer(xi.detach(), g, layout="out_in")
            if m.bias is not None:
                out[f"{name}.bias"] = g
        return out
    return run


def indivgrad_grads(model, x, y, **_):
    engine = ig.PerSampleGrads(model)
    return lambda: engine(x, y, LOSS)


def indivgrad_norms(model, x, y, **_):
    engine = ig.PerSampleGrads(model)
    return lambda: engine.norms(x, y, LOSS)


def indivgrad_clipped(model, x, y, max_norm, **_):
    engine = ig.PerSampleGrads(model)
    params = dict(model.named_parameters())

    def run():
        engine.clipped_grad_sum(x, y, LOSS, max_norm)
        return {k: p.grad for k, p in params.items()}
    return run


def torch_func(model, x, y, **_):
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in model.named_parameters()}

    def sample_loss(p, xi, yi):
        return LOSS(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    return lambda: per_sample(params, x, y)


def opacus_hooks(model, x, y, **_):
    _require("opacus", "opacus")
    from opacus import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
    params = dict(gsm._module.named_parameters())

    def run():
        gsm.zero_grad(set_to_none=True)
        for p in params.values():
            p.grad_sample = None
        LOSS(gsm(x), y).backward()
        return {k: p.grad_sample for k, p in params.items()}
    return run


def opacus_ghost_clipping(model, x, y, max_norm, **_):
    """Opacus's fast gradient clipping with ghost norms: two backward passes, as its
    DPTensorFastGradientClipping.backward does."""
    _require("opacus", "opacus")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), loss_reduction="mean", max_grad_norm=max_norm,
                                               use_ghost_clipping=True)
    params = dict(gsm._module.named_parameters())
    per_sample_loss = nn.BCEWithLogitsLoss(reduction="none")

    def run():
        gsm.zero_grad(set_to_none=True)
        losses = per_sample_loss(gsm(x), y).flatten()
        losses.mean().backward(retain_graph=True)
        coef = gsm.get_clipping_coef()
        gsm.zero_grad(set_to_none=True)
        gsm.disable_hooks()
        (coef * losses).sum().backward()
        gsm.enable_hooks()
        return {k: p.grad for k, p in params.items()}
    return run


def _backpack(model, x, y, extension_name, result):
    """A BackPACK extension run on an extended copy of the model; result(params) reads its
    per-parameter outputs. BackPACK's are those of the mean loss's terms: 1/N-scaled."""
    _require("backpack", "backpack-for-pytorch")
    from backpack import backpack, extend, extensions

    bp_model, bp_loss = extend(copy.deepcopy(model)), extend(nn.BCEWithLogitsLoss())
    params = dict(bp_model.named_parameters())
    extension = getattr(extensions, extension_name)

    def run():
        bp_model.zero_grad(set_to_none=True)
        with backpack(extension()):
            bp_loss(bp_model(x), y).backward()
        return result(params)
    return run


def backpack_batch_grad(model, x, y, **_):
    return _backpack(model, x, y, "BatchGrad", lambda ps: {k: p.grad_batch * len(x) for k, p in ps.items()})


def backpack_batch_l2(model, x, y, **_):
    return _backpack(model, x, y, "BatchL2Grad",
                     lambda ps: torch.stack([p.batch_l2 for p in ps.values()]).sum(0).sqrt() * len(x))


# name -> (factory, what it returns: "mean_grad" | "grads" | "norms" | "clipped")
METHODS = {
    "summed": (summed, "mean_grad"),
    "loop": (loop, "grads"),
    "seed_bmm": (seed_bmm, "grads"),
    "indivgrad": (indivgrad_grads, "grads"),
    "torch_func": (torch_func, "grads"),
    "opacus": (opacus_hooks, "grads"),
    "backpack": (backpack_batch_grad, "grads"),
    "indivgrad_norms": (indivgrad_norms, "norms"),
    "backpack_l2": (backpack_batch_l2, "norms"),
    "indivgrad_clipped": (indivgrad_clipped, "clipped"),
    "opacus_ghost": (opacus_ghost_clipping, "clipped"),
}
