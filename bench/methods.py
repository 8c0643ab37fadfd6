"""The methods bench/run.py compares. Each factory takes a Task (a float model, its inputs,
targets and loss) and max_norm, and returns a callable whose result is checked against the
float64 reference before it is timed: per-sample gradients {name: [N, *param.shape]}, norms
[N], or clipped sums {name: grad}. Competitors are optional: a factory raises Skip when its
package is absent or it does not apply to the model (the seed's bmm and BackPACK take the
seed's nn.Sequential MLPs, with its BCE-with-logits loss, only)."""

import copy
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import indivgrad_cuda as ig
from tests.reference import bmm_outer


class Skip(Exception):
    pass


def _require(module, pip_name):
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{pip_name} not installed (pip install -e .[bench])")


@dataclass
class Task:
    """One problem: model(*inputs) and loss(output, target), the loss a mean over the batch;
    per_sample_loss is the same loss with reduction="none"."""

    model: nn.Module
    inputs: tuple
    target: torch.Tensor
    loss: Callable
    per_sample_loss: Callable
    mlp: bool = False  # the seed's nn.Sequential of Linear and ReLU layers, BCE-with-logits loss

    @property
    def n(self):
        return self.inputs[0].shape[0]

    @property
    def engine_inputs(self):
        return self.inputs[0] if len(self.inputs) == 1 else self.inputs

    def rows(self, n0, n1):
        return tuple(t[n0:n1] for t in self.inputs), self.target[n0:n1]


def summed(task, **_):
    model = task.model
    params = dict(model.named_parameters())

    def run():
        model.zero_grad(set_to_none=True)
        task.loss(model(*task.inputs), task.target).backward()
        return {k: p.grad for k, p in params.items()}

    return run


def loop(task, **_):
    """One backward per sample."""
    model = task.model
    params = dict(model.named_parameters())

    def run():
        out = {k: torch.empty(task.n, *p.shape, dtype=p.dtype, device=p.device) for k, p in params.items()}
        for n in range(task.n):
            model.zero_grad(set_to_none=True)
            inputs, target = task.rows(n, n + 1)
            task.loss(model(*inputs), target).backward()
            for k, p in params.items():
                out[k][n] = p.grad
        return out

    return run


def seed_bmm(task, **_):
    """The seed's method: autograd to each layer's output, then torch.bmm per layer."""
    if not task.mlp:
        raise Skip("the seed's MLPs only")
    model, (x,), y = task.model, task.inputs, task.target
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
        gs = torch.autograd.grad(task.loss(h, y) * len(x), cs)
        out = {}
        for (name, m), xi, g in zip(linears, xs, gs):
            out[f"{name}.weight"] = bmm_outer(xi.detach(), g, layout="out_in")
            if m.bias is not None:
                out[f"{name}.bias"] = g
        return out

    return run


def indivgrad_grads(task, **_):
    engine = ig.PerSampleGrads(task.model)
    return lambda: engine(task.engine_inputs, task.target, task.loss)


def indivgrad_norms(task, **_):
    engine = ig.PerSampleGrads(task.model)
    return lambda: engine.norms(task.engine_inputs, task.target, task.loss)


def indivgrad_clipped(task, max_norm, **_):
    engine = ig.PerSampleGrads(task.model)
    params = dict(task.model.named_parameters())

    def run():
        engine.clipped_grad_sum(task.engine_inputs, task.target, task.loss, max_norm)
        return {k: p.grad for k, p in params.items()}

    return run


def torch_func(task, **_):
    from torch.func import functional_call, grad, vmap

    model = task.model
    params = {k: p.detach() for k, p in model.named_parameters()}

    def sample_loss(p, xi, yi):
        return task.loss(functional_call(model, p, tuple(t[None] for t in xi)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    return lambda: per_sample(params, task.inputs, task.target)


def opacus_hooks(task, **_):
    _require("opacus", "opacus")
    from opacus import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(task.model), loss_reduction="mean")
    params = dict(gsm._module.named_parameters())

    def run():
        gsm.zero_grad(set_to_none=True)
        for p in params.values():
            p.grad_sample = None
        task.loss(gsm(*task.inputs), task.target).backward()
        return {k: p.grad_sample for k, p in params.items()}

    return run


def opacus_ghost_clipping(task, max_norm, **_):
    """Opacus's fast gradient clipping with ghost norms: two backward passes, as its
    DPTensorFastGradientClipping.backward does."""
    _require("opacus", "opacus")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        copy.deepcopy(task.model), loss_reduction="mean", max_grad_norm=max_norm, use_ghost_clipping=True
    )
    params = dict(gsm._module.named_parameters())

    def run():
        gsm.zero_grad(set_to_none=True)
        losses = task.per_sample_loss(gsm(*task.inputs), task.target).flatten()
        losses.mean().backward(retain_graph=True)
        coef = gsm.get_clipping_coef()
        gsm.zero_grad(set_to_none=True)
        gsm.disable_hooks()
        (coef * losses).sum().backward()
        gsm.enable_hooks()
        return {k: p.grad for k, p in params.items()}

    return run


def _backpack(task, extension_name, result):
    """A BackPACK extension run on an extended copy of the model; result(params) reads its
    per-parameter outputs. BackPACK's are those of the mean loss's terms: 1/N-scaled."""
    if not task.mlp:
        raise Skip("the seed's MLPs only")
    _require("backpack", "backpack-for-pytorch")
    from backpack import backpack, extend, extensions

    (x,), y = task.inputs, task.target
    bp_model, bp_loss = extend(copy.deepcopy(task.model)), extend(nn.BCEWithLogitsLoss())
    params = dict(bp_model.named_parameters())
    extension = getattr(extensions, extension_name)

    def run():
        bp_model.zero_grad(set_to_none=True)
        with backpack(extension()):
            bp_loss(bp_model(x), y).backward()
        return result(params)

    return run


def backpack_batch_grad(task, **_):
    return _backpack(task, "BatchGrad", lambda ps: {k: p.grad_batch * task.n for k, p in ps.items()})


def backpack_batch_l2(task, **_):
    return _backpack(
        task, "BatchL2Grad", lambda ps: torch.stack([p.batch_l2 for p in ps.values()]).sum(0).sqrt() * task.n
    )


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
