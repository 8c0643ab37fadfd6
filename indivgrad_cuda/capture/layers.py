"""Which modules of a model the hooks capture serves, and how: every module with trainable
parameters gets a layer rule (:data:`indivgrad_cuda.layers.RULES`), else the per-module
fallback (``fallback=True``), else it is refused. A parameter shared by several modules (tied
weights) belongs to each of their layers, under its ``named_parameters()`` name. The model
is scanned once; each call re-reads only ``requires_grad`` and the parameters themselves."""

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from torch import nn

from indivgrad_cuda.errors import UnsupportedModuleError
from indivgrad_cuda.layers import FallbackRule, LayerRule, rule_for, supported_names


@dataclass
class Layer:
    path: str  # the module's name in model.named_modules()
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]  # parameter attribute (dotted below the module for a subtree) -> its named_parameters() name
    # trainable() as read when this copy was made for one call (ModelScan.wanted_layers): the
    # reducers ask for it per layer and chunk, and reading the module each time cost a
    # noticeable share of a small model's call
    snapshot: Optional[dict[str, nn.Parameter]] = None

    def trainable(self) -> dict[str, nn.Parameter]:
        """The served parameters that require grad now (or when the snapshot was taken), by attribute."""
        if self.snapshot is not None:
            return self.snapshot
        out = {}
        for attr in self.names:
            p = self.module._parameters.get(attr) if "." not in attr else self.module.get_parameter(attr)
            if p is not None and p.requires_grad:
                out[attr] = p
        return out

    def wanted(self) -> bool:
        return bool(self.trainable())


@dataclass
class _Refused:
    path: str
    module: nn.Module
    why: str
    attrs: tuple[str, ...]  # the parameters whose requires_grad makes it a problem


def supported_text() -> str:
    return (
        f"layers with trainable parameters: {supported_names()}; any other module by the per-module fallback "
        f"(fallback=True) when torch.func can run its forward sample by sample; parameter-free modules and "
        f"functional code anywhere; frozen parameters (requires_grad=False) anywhere"
    )


class ModelScan:
    """The layers that own trainable parameters (in module order, each with its rule) and the
    modules the engine cannot serve, which are fine while their parameters are frozen."""

    def __init__(self, model: nn.Module, fallback: bool = True):
        self.model = model
        self.fallback = fallback
        names = {id(p): n for n, p in model.named_parameters()}
        self.order = {n: i for i, n in enumerate(names.values())}  # named_parameters() order
        self.layers: list[Layer] = []
        self.refused: list[_Refused] = []
        self.batch_norms: list[tuple[str, nn.Module]] = []
        self.dropouts: list[tuple[str, nn.Module]] = []
        owners = []  # paths of modules whose rule serves their whole subtree
        for path, m in model.named_modules():
            label = path or "(the model)"
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.batch_norms.append((label, m))
            if type(m) is nn.Dropout:
                self.dropouts.append((label, m))
            if any(o == "" or path.startswith(o + ".") for o in owners):
                continue  # its parameters are its owner's
            direct = dict(m.named_parameters(recurse=False))
            rule = rule_for(m, label, fallback)
            if rule is not None and rule.owns_subtree:
                owners.append(path)
                direct = dict(m.named_parameters())
            if not direct:
                continue
            if rule is None:
                self.refused.append(_Refused(label, m, _why_not(m), tuple(direct)))
                continue
            why = rule.unsupported_setting(m)
            if why:
                self.refused.append(_Refused(label, m, why, tuple(direct)))
                continue
            attrs = rule.attrs(m)
            extra = tuple(a for a in direct if a not in attrs)
            if extra and fallback:  # a subclass with parameters its type's rule does not know
                rule, attrs = rule_for(nn.Module(), label, True), list(direct)
            elif extra:
                self.refused.append(_Refused(label, m, f"unknown parameters {list(extra)}", extra))
                continue
            self.layers.append(Layer(label, m, rule, {a: names[id(direct[a])] for a in attrs}))
        self._inside_fallbacks_once()
        self._wanted_key = self._wanted = None  # wanted_layers()'s last answer

    def _inside_fallbacks_once(self) -> None:
        """A fallback replays its module's forward with its parameters replaced wherever the
        forward reaches them (torch.func.functional_call ties them): a parameter it shares with
        a layer below it is then served by the fallback alone, not twice."""
        for outer in self.layers:
            if not isinstance(outer.rule, FallbackRule):
                continue
            prefix = "" if outer.path == "(the model)" else outer.path + "."
            shared = set(outer.names.values())
            for inner in self.layers:
                if inner is not outer and inner.path.startswith(prefix) and inner.path != "(the model)":
                    inner.names = {a: n for a, n in inner.names.items() if n not in shared}
        self.layers = [layer for layer in self.layers if layer.names]

    def check(self) -> None:
        """Raises UnsupportedModuleError naming every refused module with a trainable parameter."""
        problems = [
            f"'{r.path}' ({type(r.module).__name__}): {r.why}"
            for r in self.refused
            if any(r.module.get_parameter(a).requires_grad for a in r.attrs)
        ]
        if problems:
            raise UnsupportedModuleError(
                "these modules have trainable parameters the engine cannot serve:\n  - "
                + "\n  - ".join(problems)
                + f"\nSupported: {supported_text()}. Freeze a module's parameters (requires_grad_(False)) to skip it."
            )

    def wanted_layers(self) -> list[Layer]:
        """The layers with trainable parameters now (after check()), each a copy holding those
        parameters for the call that asks. The same list while they stay the same Parameter
        objects with the same requires_grad (so what a call builds per list is built once)."""
        now = [layer.trainable() for layer in self.layers]
        key = [tuple(map(id, t.values())) for t in now]  # the snapshots hold the Parameters: no id is reused
        if key != self._wanted_key:
            self._wanted = [
                Layer(layer.path, layer.module, layer.rule, layer.names, t) for layer, t in zip(self.layers, now) if t
            ]
            self._wanted_key = key
        return self._wanted

    def adopt(self, name: str, path: str, module: nn.Module, attr: str) -> None:
        """Parameter ``name`` (``attr`` below ``module``) is served by the fallback of the module
        at ``path`` from now on, and by no other layer."""
        for layer in self.layers:
            if layer.module is not module:
                layer.names = {a: n for a, n in layer.names.items() if n != name}
        self.layers = [layer for layer in self.layers if layer.names]
        holder = next((layer for layer in self.layers if layer.module is module), None)
        if holder is None:
            holder = Layer(path, module, rule_for(nn.Module(), path, True), {})
            self.layers.append(holder)
        holder.rule.adopted.append(attr)
        holder.names[attr] = name
        self._wanted_key = None

    def describe(self) -> dict[str, str]:
        """How each parameter is served, by its named_parameters() name."""
        uses = defaultdict(list)
        for layer in self.layers:
            for name in layer.names.values():
                uses[name].append(f"{layer.rule.served_by} ({type(layer.module).__name__} '{layer.path}')")
        refused = {}
        for r in self.refused:
            for a in r.attrs:
                refused[id(r.module.get_parameter(a))] = f"refused ({type(r.module).__name__} '{r.path}': {r.why})"
        out = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                out[name] = "frozen"
            elif id(p) in refused:
                out[name] = refused[id(p)]
            elif len(uses[name]) > 1:
                out[name] = "tied: " + " + ".join(uses[name])
            else:
                out[name] = uses[name][0] if uses[name] else "unserved"
        return out


def tied_names(layers: list[Layer]) -> dict[str, int]:
    """{name: number of layers using it} of the trainable parameters several layers share."""
    count = defaultdict(int)
    for layer in layers:
        for attr in layer.trainable():
            count[layer.names[attr]] += 1
    return {name: k for name, k in count.items() if k > 1}


def _why_not(module) -> str:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            "BatchNorm normalises with statistics of the whole batch in train mode, which mixes samples; "
            "freeze it, or use GroupNorm/LayerNorm (opacus.validators.ModuleValidator.fix(model) swaps BatchNorm "
            "for GroupNorm), or pass fallback=True to serve it in eval mode"
        )
    return "no per-sample gradient rule for this type (fallback=True serves it by torch.func)"
