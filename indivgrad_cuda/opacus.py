"""Opacus backend: one call makes Opacus compute nn.Linear per-sample gradients (and its
ghost-clipping norms) with indivgrad_cuda.

    import indivgrad_cuda.opacus
    indivgrad_cuda.opacus.install()      # or: with indivgrad_cuda.opacus.installed(): ...

Opacus calls a layer's grad sampler with the activations and backprops its hooks captured,
already rearranged to batch-first and scaled for ``loss_reduction``; ours replaces only the
sampler, so both conventions are Opacus's own. Activations [N, *, in] (2-D, or sequences
with any middle dims, flattened into T) go through :func:`indivgrad_cuda.ops.seq_outer`
straight into the [N, out, in] buffer (the fused outer-product kernel when T = 1), and the
ghost-clipping norms through :func:`indivgrad_cuda.ops.linear_sq_norms` (the ghost or the
direct norm, whichever costs less). ``uninstall()`` restores Opacus's samplers.
"""

import contextlib

from indivgrad_cuda.ops import linear_sq_norms, seq_outer

try:
    import opacus.grad_sample as _grad_sample
    import opacus.grad_sample.linear  # noqa: F401  (Opacus's own samplers, restored by uninstall())
except ImportError as e:  # keep this module importable; say how to get Opacus when asked for it
    _IMPORT_ERROR = e
    _HOOK_CLASSES = ()
else:
    _IMPORT_ERROR = None
    # The classes whose sampler tables Opacus's hooks read (named *Hooks since Opacus 1.6,
    # *Module before); a subclass shares its parent's table unless it defines its own.
    _HOOK_CLASSES = tuple(
        getattr(_grad_sample, name)
        for name in (
            "GradSampleHooks",
            "GradSampleModule",
            "GradSampleHooksFastGradientClipping",
            "GradSampleModuleFastGradientClipping",
        )
        if hasattr(_grad_sample, name)
    )

_REGISTRIES = ("GRAD_SAMPLERS", "NORM_SAMPLERS")
_saved = None  # the samplers install() replaced, restored by uninstall()


def _require_opacus():
    if _IMPORT_ERROR is not None:
        raise ImportError(
            "indivgrad_cuda.opacus needs Opacus: pip install 'opacus>=1.5' (or pip install -e .[opacus] from the "
            f"source tree); importing it failed with: {_IMPORT_ERROR}"
        ) from _IMPORT_ERROR


def _factors(activations, backprops):
    """[N, T, in] and [N, T, out] views (T = 1 for 2-D), in the backprops' dtype as Opacus's own."""
    a = activations[0].to(backprops.dtype)
    return a.reshape(a.shape[0], -1, a.shape[-1]), backprops.reshape(backprops.shape[0], -1, backprops.shape[-1])


def linear_grad_sample(layer, activations, backprops):
    """Opacus grad sampler for nn.Linear: {param: per-sample gradient [N, *param.shape]}."""
    a, g = _factors(activations, backprops)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = seq_outer(a, g, layout="out_in")
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g[:, 0] if g.shape[1] == 1 else g.sum(1)
    return ret


def linear_norm_sample(layer, activations, backprops):
    """Opacus ghost-clipping norm sampler for nn.Linear: {param: per-sample norm [N]}."""
    a, g = _factors(activations, backprops)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = linear_sq_norms(a, g).sqrt().to(g.dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = (g[:, 0] if g.shape[1] == 1 else g.sum(1)).norm(dim=1)
    return ret


def install():
    """Register our nn.Linear grad and norm samplers with Opacus (idempotent)."""
    global _saved
    _require_opacus()
    import torch.nn as nn

    if _saved is not None:
        return
    _saved = {}
    ours = {"GRAD_SAMPLERS": linear_grad_sample, "NORM_SAMPLERS": linear_norm_sample}
    for hooks in _HOOK_CLASSES:
        for registry in _REGISTRIES:
            if registry in vars(hooks):  # this class's own table, each table once
                table = vars(hooks)[registry]
                _saved[(hooks, registry)] = table.get(nn.Linear)
                table[nn.Linear] = ours[registry]


def uninstall():
    """Restore Opacus's own nn.Linear samplers."""
    global _saved
    _require_opacus()
    import torch.nn as nn

    if _saved is None:
        return
    for (hooks, registry), previous in _saved.items():
        table = getattr(hooks, registry)
        if previous is None:
            table.pop(nn.Linear, None)
        else:
            table[nn.Linear] = previous
    _saved = None


def is_installed() -> bool:
    return _saved is not None


@contextlib.contextmanager
def installed():
    """Context manager: our samplers inside the block, Opacus's own after it."""
    was = is_installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
