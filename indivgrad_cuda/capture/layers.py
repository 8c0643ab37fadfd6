"""Which modules of a model the hooks capture serves: every module with trainable
parameters must be a supported layer (:data:`indivgrad_cuda.layers.RULES`). The model is
scanned once; each call re-reads only ``requires_grad`` and the parameters themselves."""

from dataclasses import dataclass
from typing import Optional

from torch import nn

from indivgrad_cuda.layers import LayerRule, rule_for, supported_names


class UnsupportedModuleError(TypeError):
    """The model contains a module the per-sample gradient engine cannot handle."""


@dataclass
class Layer:
    path: str  # the module's name in model.named_modules()
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]  # parameter attribute -> its name in model.named_parameters()
    # trainable() as read when this copy was made for one call (ModelScan.wanted_layers): the
    # reducers ask for it per layer and chunk, and reading the module each time cost a
    # noticeable share of a small model's call
    snapshot: Optional[dict[str, nn.Parameter]] = None

    def trainable(self) -> dict[str, nn.Parameter]:
        """The module's parameters that require grad now (or when the snapshot was taken), by attribute."""
        if self.snapshot is not None:
            return self.snapshot
        out = {}
        for attr in self.rule.params:
            p = getattr(self.module, attr, None)
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
        f"layers with trainable parameters: {supported_names()} (Linear on [N, *, D_in], LayerNorm with "
        f"elementwise affine, Embedding without max_norm or scale_grad_by_freq); parameter-free modules and "
        f"functional code anywhere; frozen parameters (requires_grad=False) anywhere"
    )


class ModelScan:
    """The supported layers that own parameters (in module order) and the modules with
    parameters the engine cannot serve, which are fine while those parameters are frozen."""

    def __init__(self, model: nn.Module):
        names = {id(p): n for n, p in model.named_parameters()}
        owners = {}
        self.layers: list[Layer] = []
        self.refused: list[_Refused] = []
        self.batch_norms: list[tuple[str, nn.Module]] = []
        self.dropouts: list[tuple[str, nn.Module]] = []
        for path, m in model.named_modules():
            path = path or "(the model)"
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.batch_norms.append((path, m))
            if type(m) is nn.Dropout:
                self.dropouts.append((path, m))
            direct = dict(m.named_parameters(recurse=False))
            if not direct:
                continue
            for a, p in direct.items():
                if id(p) in owners:
                    self.refused.append(
                        _Refused(
                            path,
                            m,
                            f"parameter '{a}' is also module '{owners[id(p)]}''s (shared between modules)",
                            (a,),
                        )
                    )
                owners.setdefault(id(p), path)
            rule = rule_for(m)
            if rule is None:
                self.refused.append(_Refused(path, m, _why_not(m), tuple(direct)))
                continue
            extra = tuple(a for a in direct if a not in rule.params)
            if extra:
                self.refused.append(_Refused(path, m, f"unknown parameters {list(extra)}", extra))
            why = rule.unsupported_setting(m)
            if why:
                self.refused.append(_Refused(path, m, why, tuple(direct)))
                continue
            self.layers.append(Layer(path, m, rule, {a: names[id(p)] for a, p in direct.items()}))

    def check(self) -> None:
        """Raises UnsupportedModuleError naming every refused module with a trainable parameter."""
        problems = [
            f"'{r.path}' ({type(r.module).__name__}): {r.why}"
            for r in self.refused
            if any(getattr(r.module, a).requires_grad for a in r.attrs)
        ]
        if problems:
            raise UnsupportedModuleError(
                "these modules have trainable parameters the engine cannot serve:\n  - "
                + "\n  - ".join(problems)
                + f"\nSupported: {supported_text()}. Freeze a module's parameters (requires_grad_(False)) to skip it."
            )

    def wanted_layers(self) -> list[Layer]:
        """The supported layers with trainable parameters now (after check()), each a copy
        holding those parameters for the call that asks."""
        out = []
        for layer in self.layers:
            now = layer.trainable()
            if now:
                out.append(Layer(layer.path, layer.module, layer.rule, layer.names, now))
        return out


def _why_not(module) -> str:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            "BatchNorm normalises with statistics of the whole batch in train mode, which mixes samples; "
            "freeze it, or use LayerNorm/GroupNorm"
        )
    return "no per-sample gradient rule for this type"
