"""The methods bench/run.py compares. Each factory takes a Task (a float model, its inputs,
targets and loss) and max_norm, and returns a callable whose result is checked against the
float64 reference before it is timed: per-sample gradients {name: [N, *param.shape]}, norms
[N], or clipped sums {name: grad}. Competitors are optional: a factory raises Skip when its
package is absent or it does not apply to the model (the seed's bmm takes the seed's
nn.Sequential MLPs only; BackPACK the tasks with a backpack_loss, the seed's MLPs and the CNNs,
where it has a rule for every layer with parameters). Inputs are a tuple
(model(*inputs)) or, for Hugging Face models, a dict (model(**inputs))."""

import copy
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

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
    """One problem: model(*inputs) (model(**inputs) for a dict) and loss(output, target), the
    loss a mean over the batch; per_sample_loss is the same loss with reduction="none" (one
    loss per sample, [N])."""

    model: nn.Module
    inputs: "tuple | dict"
    target: torch.Tensor
    loss: Callable
    per_sample_loss: Callable
    mlp: bool = False  # the seed's nn.Sequential of Linear and ReLU layers, BCE-with-logits loss
    # The mean loss as a module BackPACK extends (the seed's MLPs: BCE-with-logits; the CNNs:
    # cross-entropy) for a model of one input; None: BackPACK is skipped.
    backpack_loss: Optional[nn.Module] = None
    # The same model with its tied weights untied (the same values, so the same forward), for
    # the methods in REFUSES_TIED; their results are checked against this model's reference.
    untied: Optional[nn.Module] = None

    @property
    def n(self):
        return next(iter(self._tensors())).shape[0]

    @property
    def engine_inputs(self):
        if isinstance(self.inputs, dict):
            return self.inputs
        return self.inputs[0] if len(self.inputs) == 1 else self.inputs

    def forward(self, model):
        return model(**self.inputs) if isinstance(self.inputs, dict) else model(*self.inputs)

    def rows(self, n0, n1):
        if isinstance(self.inputs, dict):
            return {k: t[n0:n1] for k, t in self.inputs.items()}, self.target[n0:n1]
        return tuple(t[n0:n1] for t in self.inputs), self.target[n0:n1]

    def forward_rows(self, model, n0, n1):
        """(model's output, target) of samples n0:n1."""
        inputs, target = self.rows(n0, n1)
        return (model(**inputs) if isinstance(inputs, dict) else model(*inputs)), target

    def _tensors(self):
        return self.inputs.values() if isinstance(self.inputs, dict) else self.inputs


def summed(task, **_):
    model = task.model
    params = dict(model.named_parameters())

    def run():
        model.zero_grad(set_to_none=True)
        task.loss(task.forward(model), task.target).backward()
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
            task.loss(*task.forward_rows(model, n, n + 1)).backward()
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
    """vmap of grad over single-sample batches. A model torch.func cannot trace (data-dependent
    control flow, an in-place op on a captured tensor) is skipped with torch's reason."""
    from torch.func import functional_call, grad, vmap

    model = task.model
    params = {k: p.detach() for k, p in model.named_parameters()}

    def sample_loss(p, xi, yi):
        if isinstance(xi, dict):
            return task.loss(functional_call(model, p, (), {k: t[None] for k, t in xi.items()}), yi[None])
        return task.loss(functional_call(model, p, tuple(t[None] for t in xi)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def run():
        try:
            return per_sample(params, task.inputs, task.target)
        except RuntimeError as e:  # vmap's refusals are RuntimeErrors that name the construct
            text = str(e)
            if "data-dependent control flow" in text or "vmap" in text or "functorch" in text:
                raise Skip(f"torch.func cannot run it: {text.splitlines()[0][:120]}") from e
            raise

    return run


def _opacus_copy(model):
    """A copy in train mode: Opacus's hooks record activations only of modules in training
    (the bench's models have no dropout, or dropout 0, so train mode computes the same)."""
    return copy.deepcopy(model).train()


def opacus_hooks(task, **_):
    _require("opacus", "opacus")
    from opacus import GradSampleModule

    gsm = GradSampleModule(_opacus_copy(task.model), loss_reduction="mean")
    params = dict(gsm._module.named_parameters())

    def run():
        gsm.zero_grad(set_to_none=True)
        for p in params.values():
            p.grad_sample = None
        task.loss(task.forward(gsm), task.target).backward()
        return {k: p.grad_sample for k, p in params.items()}

    return run


def opacus_ghost_clipping(task, max_norm, **_):
    """Opacus's fast gradient clipping with ghost norms: two backward passes, as its
    DPTensorFastGradientClipping.backward does. It refuses tied parameters ("Parameter tying
    is not supported with Ghost Clipping"): a task with tied weights gives it task.untied."""
    _require("opacus", "opacus")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = task.untied if task.untied is not None else task.model
    gsm = GradSampleModuleFastGradientClipping(
        _opacus_copy(model), loss_reduction="mean", max_grad_norm=max_norm, use_ghost_clipping=True
    )
    params = dict(gsm._module.named_parameters())

    def run():
        gsm.zero_grad(set_to_none=True)
        losses = task.per_sample_loss(task.forward(gsm), task.target).flatten()
        losses.mean().backward(retain_graph=True)
        coef = gsm.get_clipping_coef()
        gsm.zero_grad(set_to_none=True)
        gsm.disable_hooks()
        (coef * losses).sum().backward()
        gsm.enable_hooks()
        return {k: p.grad for k, p in params.items()}

    return run


def _backpack_unsupported(model, extension):
    """The names of the kinds of layers with parameters in model that extension has no rule
    for (BackPACK's first-order extensions only warn about them, and leave them without a
    result)."""
    rules = getattr(extension(), "_BackpropExtension__module_extensions", None)
    if rules is None:  # another BackPACK's layout: let it run, and fail as a row if it must
        return []
    with_params = (m for m in model.modules() if next(m.parameters(recurse=False), None) is not None)
    return sorted({type(m).__name__ for m in with_params if type(m) not in rules})


def _backpack(task, extension_name, result):
    """A BackPACK extension run on an extended copy of the model; result(params) reads its
    per-parameter outputs. BackPACK's are those of the mean loss's terms: 1/N-scaled."""
    if task.backpack_loss is None:
        raise Skip("the seed's MLPs and the CNNs only")
    _require("backpack", "backpack-for-pytorch")
    from backpack import backpack, extend, extensions

    extension = getattr(extensions, extension_name)
    unsupported = _backpack_unsupported(task.model, extension)
    if unsupported:
        raise Skip(f"BackPACK's {extension_name} has no rule for {', '.join(unsupported)}")
    (x,), y = task.inputs, task.target
    bp_model, bp_loss = extend(copy.deepcopy(task.model)), extend(copy.deepcopy(task.backpack_loss))
    params = dict(bp_model.named_parameters())

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


# the methods given Task.untied where the task has one (they refuse tied parameters)
REFUSES_TIED = {"opacus_ghost"}

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
