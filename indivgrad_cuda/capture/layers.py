"""Which modules of a model the hooks capture serves: every module with trainable
parameters must be a supported layer (:data:`indivgrad_cuda.layers.RULES`)."""

from dataclasses import dataclass
from typing import Dict, List

from torch import nn

from indivgrad_cuda.layers import LayerRule, rule_for, supported_names


class UnsupportedModuleError(TypeError):
    """The model contains a module the per-sample gradient engine cannot handle."""


@dataclass
class Layer:
    path: str  # the module's name in model.named_modules()
    module: nn.Module
    rule: LayerRule
    names: Dict[str, str]  # parameter attribute -> its name in model.named_parameters()

    def trainable(self) -> Dict[str, nn.Parameter]:
        """The module's parameters that require grad now, by attribute."""
        out = {}
        for attr in self.rule.params:
            p = getattr(self.module, attr, None)
            if p is not None and p.requires_grad:
                out[attr] = p
        return out

    def wanted(self) -> bool:
        return bool(self.trainable())


def supported_text() -> str:
    return (f"layers with trainable parameters: {supported_names()} (Linear on [N, *, D_in], LayerNorm with "
            f"elementwise affine, Embedding without max_norm or scale_grad_by_freq); parameter-free modules and "
            f"functional code anywhere; frozen parameters (requires_grad=False) anywhere")


def find_layers(model: nn.Module) -> List[Layer]:
    """The supported layers that own parameters, in module order. Raises
    UnsupportedModuleError naming every module with trainable parameters that cannot be served."""
    names = {id(p): n for n, p in model.named_parameters()}
    owners, layers, problems = {}, [], []
    for path, m in model.named_modules():
        path = path or "(the model)"
        direct = dict(m.named_parameters(recurse=False))
        if not direct:
            continue
        trainable = [a for a, p in direct.items() if p.requires_grad]
        for a, p in direct.items():
            if id(p) in owners and p.requires_grad:
                problems.append(f"'{path}' ({type(m).__name__}): parameter '{a}' is also module "
                                f"'{owners[id(p)]}''s (shared between modules)")
            owners.setdefault(id(p), path)
        rule = rule_for(m)
        if rule is None:
            if trainable:
                problems.append(f"'{path}' ({type(m).__name__}): {_why_not(m)}")
            continue
        extra = [a for a in trainable if a not in rule.params]
        why = rule.unsupported_setting(m)
        if trainable and (extra or why):
            problems.append(f"'{path}' ({type(m).__name__}): " + (why or f"unknown trainable parameters {extra}"))
            continue
        layers.append(Layer(path, m, rule, {a: names[id(p)] for a, p in direct.items()}))
    if problems:
        raise UnsupportedModuleError(
            "these modules have trainable parameters the engine cannot serve:\n  - " + "\n  - ".join(problems)
            + f"\nSupported: {supported_text()}. Freeze a module's parameters (requires_grad_(False)) to skip it.")
    return layers


def _why_not(module) -> str:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return ("BatchNorm normalises with statistics of the whole batch in train mode, which mixes samples; "
                "freeze it, or use LayerNorm/GroupNorm")
    return "no per-sample gradient rule for this type"
