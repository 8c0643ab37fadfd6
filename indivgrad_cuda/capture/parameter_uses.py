"""Which module's forward uses each trainable parameter, from the autograd graph of the
first call with each input signature: every use must fall inside a call of a layer serving
the parameter. With the fallback, a parameter used elsewhere moves to the fallback of the
innermost module whose calls hold all its uses (and the call runs again); else it is
refused by name."""

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from indivgrad_cuda.capture.layers import Layer, ModelScan
from indivgrad_cuda.errors import UnsupportedModuleError
from indivgrad_cuda.layers import FallbackRule


def check(scan: ModelScan, recorder, modules: "ModuleUses", loss: torch.Tensor, fallback: bool) -> None:
    """Every use of a trainable parameter in the loss's graph must be inside a call of a
    layer serving it. With the fallback, a parameter used elsewhere (by functional code in
    a parent's forward, by a parent that never calls the submodule owning it) moves to the
    fallback of the innermost called module whose forward holds all its uses, and the call
    starts again (:class:`Replanned`); what no module holds is refused, every one named."""
    total = recorder.served_edges(param_edges([loss.grad_fn], set()))
    outside = recorder.params_used_outside(total)
    if not outside:
        return
    moves, refused = [], []
    for pid, (name, layer) in outside.items():
        holder = modules.holder(pid, total[pid]) if fallback else None
        if holder is None:
            refused.append(f"parameter '{name}' (of '{layer.path}', {type(layer.module).__name__})")
        else:
            moves.append((name, *holder))
    if refused:
        raise UnsupportedModuleError(
            "these parameters are used outside the forward of every module that owns them (by functional code, "
            "or by a parent module's forward that never calls the module), so their per-sample gradients would "
            "miss those uses:\n  - "
            + "\n  - ".join(refused)
            + "\nCall the module instead, compute the use inside a module (the fallback then serves it), untie "
            "it, or freeze it"
        )
    for name, path, module, attr in moves:
        scan.adopt(name, path, module, attr)
    raise Replanned()


class Replanned(Exception):
    """The first call moved parameters to a fallback: the engine runs the call again."""


class ModuleUses:
    """On a checked call, forward hooks on every module that is not a layer: which were called,
    and the autograd edges into each parameter inside their calls."""

    def __init__(self, model: nn.Module, layers: list[Layer]):
        served = {id(layer.module) for layer in layers if not isinstance(layer.rule, FallbackRule)}
        self.modules = [(path, m) for path, m in model.named_modules() if id(m) not in served]
        self.depth = {id(m): path.count(".") + bool(path) for path, m in self.modules}
        self.uses: dict[int, dict[int, int]] = {}  # id(module) -> id(param) -> edges
        self.handles = []

    def __enter__(self):
        for _, m in self.modules:
            self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, module, args, kwargs, output):
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        stop = {t.grad_fn for t in inputs if t.grad_fn is not None}
        counts = self.uses.setdefault(id(module), {})
        for pid, k in param_edges([t.grad_fn for t in outputs], stop).items():
            counts[pid] = counts.get(pid, 0) + k

    def holder(self, pid: int, total: int):
        """(path, module, the parameter's name below it) of the innermost called module whose
        calls hold all `total` uses of the parameter and own it, or None."""
        best = None
        for path, m in self.modules:
            if self.uses.get(id(m), {}).get(pid, 0) != total:
                continue
            attr = next((a for a, p in m.named_parameters() if id(p) == pid), None)
            if attr is not None and (best is None or self.depth[id(m)] > self.depth[id(best[1])]):
                best = (path or "(the model)", m, attr)
        return best


def param_edges(roots, stop) -> dict[int, int]:
    """id(parameter) -> number of autograd edges into its AccumulateGrad node, over the graph
    reachable from `roots` without entering the nodes in `stop`."""
    counts, seen, todo = {}, set(stop), [r for r in roots if r is not None]
    seen.update(todo)
    while todo:
        node = todo.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                counts[id(var)] = counts.get(id(var), 0) + 1
            elif nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return counts
