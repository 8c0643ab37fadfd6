"""``torch.compile``'d models: the engine runs the module ``torch.compile`` wrapped, eagerly.

``torch.compile(model)`` returns an ``OptimizedModule`` whose forward runs ``model`` through
TorchDynamo; ``model`` is its submodule ``_orig_mod``, so its parameters are named
``_orig_mod.<name>``. The engine's captures run code of their own at every layer (forward
hooks, taps on the layers' outputs, per-layer rules, the native capture's C++ program), which
cannot run inside a Dynamo graph; so the engine serves ``_orig_mod`` eagerly, through a stand-in
that holds it under that same name: results and ``describe()`` are keyed like the compiled
module's ``named_parameters()``. The user's own calls of the compiled module stay compiled.
Modules compiled in place (``module.compile()``, the model or any submodule) keep their names;
the hooks capture runs its forward with TorchDynamo told to run them eagerly (:func:`stance`).
"""

import contextlib
import sys
from collections import OrderedDict

import torch
from torch import nn

PREFIX = "_orig_mod"  # OptimizedModule's name for the module it wraps


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile(module)`` wrapper (an ``OptimizedModule``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


class _Eager(nn.Module):
    """``module`` under the name ``_orig_mod``, called eagerly (the compiled wrapper, uncompiled);
    its train/eval mode is the wrapped module's."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._orig_mod = module

    @property
    def training(self) -> bool:
        return self._modules[PREFIX].training if PREFIX in self._modules else True

    @training.setter
    def training(self, mode: bool) -> None:  # nn.Module's __init__ and train() set it; train() recurses anyway
        pass

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def eager(model: nn.Module, sequential: bool = False) -> nn.Module:
    """``model`` itself, or where it is ``torch.compile``'d an eager stand-in with the same
    ``named_parameters()`` and ``named_modules()`` names. With ``sequential=True`` a compiled
    ``nn.Sequential`` stands in as an ``nn.Sequential`` holding it (what the native capture
    reads; it never calls the model's forward)."""
    if not is_compiled(model):
        return model
    inner = model._orig_mod
    if sequential and type(inner) is nn.Sequential:
        return nn.Sequential(OrderedDict([(PREFIX, inner)]))
    return _Eager(inner)


def compiled_in_place(model: nn.Module) -> bool:
    """Whether the model or a submodule was compiled in place (``module.compile()``)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def stance(in_place: bool):
    """The context of the engine's forward: for a model with modules compiled in place, Dynamo's
    ``force_eager`` stance (their forwards run eagerly, nothing is compiled for the engine's
    hooks); else nothing."""
    return torch.compiler.set_stance("force_eager") if in_place else contextlib.nullcontext()
