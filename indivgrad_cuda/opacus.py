"""Opacus backend: one call makes Opacus compute the per-sample gradients of nn.Linear,
nn.Conv1d/2d/3d, nn.GroupNorm and nn.InstanceNorm1d/2d/3d (and the ghost-clipping norms of
nn.Linear and the convolutions) with indivgrad_cuda.

    import indivgrad_cuda.opacus
    indivgrad_cuda.opacus.install()      # or: with indivgrad_cuda.opacus.installed(): ...

Opacus calls a layer's grad sampler (and, with ghost clipping, its norm sampler) with the
activations and backprops its hooks captured, already rearranged to batch-first and scaled
for ``loss_reduction``; ours replace only the samplers, so both conventions are Opacus's
own, and every sampler takes an empty batch (N = 0). :data:`SAMPLERS` is the one table of
what we serve, ``type -> (grad sampler, norm sampler or None)``; ``install()`` registers it
in the tables of Opacus's hooks classes and ``uninstall()`` restores what it replaced.

- nn.Linear: activations [N, *, in] (2-D, or sequences with any middle dims, flattened into
  T) go through :func:`indivgrad_cuda.ops.seq_outer` straight into the [N, out, in] buffer
  (the fused outer-product kernel when T = 1), the norms through
  :func:`indivgrad_cuda.ops.linear_sq_norms` (the ghost or the direct norm, whichever
  costs less).
- nn.Conv1d/2d/3d (any stride, padding, padding_mode, dilation, groups): the convolution
  rule (:mod:`indivgrad_cuda.layers.conv`), the per-sample gradients from unfolded patches
  or by a convolution grouped over the batch, whichever its cost rule picks; the norms by
  the ghost norm from unfolded patches where that is cheaper, else from the per-sample
  gradients of a block of samples at a time (never all of them at once). Opacus has no
  norm sampler for convolutions; with ours registered, ghost clipping serves them too,
  and so refuses a convolution called twice in one forward ("Parameter tying is not
  supported with Ghost Clipping"), as it does for nn.Linear.
- nn.GroupNorm, nn.InstanceNorm1d/2d/3d: the rules of :mod:`indivgrad_cuda.layers.group_norm`
  ([N, C] gradients of weight and bias): Opacus's arithmetic with a cheaper reduction
  (a sum over flattened positions, not an einsum). Timed against Opacus's samplers on CPU
  (CPU time per call, medians of interleaved calls, one thread, 8 shapes of 2 K to 1 M
  elements), ours took 0.98-0.99x their time on inputs of 0.1-1 M elements and ~0.92x on
  tiny ones, never more, so they are served.
"""

import contextlib
import math

from torch import nn

from indivgrad_cuda.layers import conv as _conv
from indivgrad_cuda.layers import group_norm as _group_norm
from indivgrad_cuda.layers.base import Factors
from indivgrad_cuda.ops import linear_sq_norms, seq_outer

try:
    import opacus.grad_sample as _grad_sample

    # Opacus's own samplers, registered on import and restored by uninstall()
    import opacus.grad_sample.conv
    import opacus.grad_sample.group_norm
    import opacus.grad_sample.instance_norm
    import opacus.grad_sample.linear  # noqa: F401
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

_REGISTRIES = ("GRAD_SAMPLERS", "NORM_SAMPLERS")  # Opacus's table names, in the order of SAMPLERS' pairs
_MISSING = object()  # a table had no entry for the type: uninstall() removes ours
_saved = None  # {(hooks class, registry, module type): what install() replaced}, restored by uninstall()


def _require_opacus():
    if _IMPORT_ERROR is not None:
        raise ImportError(
            "indivgrad_cuda.opacus needs Opacus: pip install 'opacus>=1.5' (or pip install -e .[opacus] from the "
            f"source tree); importing it failed with: {_IMPORT_ERROR}"
        ) from _IMPORT_ERROR


def _trainable(layer, names=("weight", "bias")):
    """[(attr, parameter)] of the layer's parameters among ``names`` that require grad."""
    return [(name, p) for name in names if (p := getattr(layer, name, None)) is not None and p.requires_grad]


# ---------------------------------------------------------------- nn.Linear


def _factors(activations, backprops):
    """[N, T, in] and [N, T, out] views (T = 1 for 2-D), in the backprops' dtype as Opacus's own.
    The sizes are explicit: an empty batch [0, *, D] has no -1 to infer."""
    a = activations[0].to(backprops.dtype)
    n, t = backprops.shape[0], math.prod(backprops.shape[1:-1])
    return a.reshape(n, t, a.shape[-1]), backprops.reshape(n, t, backprops.shape[-1])


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


# ---------------------------------------------------------------- nn.Conv1d/2d/3d


def _empty(want, backprops, per_sample=True):
    """An empty batch's results, {param: [0, *param.shape]} (or norms [0]), without the rules."""
    return {p: backprops.new_zeros((0, *p.shape) if per_sample else (0,)) for _, p in want}


def _conv_factors(layer, activations, backprops, dtype):
    """The convolution rule for the layer, and its factors: the input [N, C_in, *S] and the
    backprops [N, C_out, *S_out], both in ``dtype``."""
    return _conv.RULE, Factors([activations[0].to(dtype)], [backprops.to(dtype)])


def conv_grad_sample(layer, activations, backprops):
    """Opacus grad sampler for nn.Conv1d/2d/3d: {param: per-sample gradient [N, *param.shape]},
    in the backprops' dtype (the input cast to it, as Opacus's own)."""
    want = _trainable(layer)
    n = backprops.shape[0]
    if not want or n == 0:
        return _empty(want, backprops)
    rule, f = _conv_factors(layer, activations, backprops, backprops.dtype)
    out = {name: backprops.new_empty((n, *p.shape)) for name, p in want}
    rule.grads(layer, f, "out_in", out)
    return {p: out[name] for name, p in want}


def conv_norm_sample(layer, activations, backprops):
    """Opacus ghost-clipping norm sampler for nn.Conv1d/2d/3d: {param: per-sample norm [N]}
    (in the backprops' dtype), without forming every sample's gradient at once. The rule
    reduces in the weight's dtype: under autocast (float32 weights and input, half
    backprops) the backprops are cast up."""
    want = _trainable(layer)
    if not want or backprops.shape[0] == 0:
        return _empty(want, backprops, per_sample=False)
    rule, f = _conv_factors(layer, activations, backprops, layer.weight.dtype)
    sq = rule.sq_norms(layer, f, [name for name, _ in want], "auto")
    return {p: sq[name].sqrt().to(backprops.dtype) for name, p in want}


# ---------------------------------------------------------------- nn.GroupNorm, nn.InstanceNorm1d/2d/3d


def _channel_affine_grad_sample(rule, layer, activations, backprops):
    want = _trainable(layer)
    if not want or backprops.shape[0] == 0:
        return _empty(want, backprops)
    per_sample = rule.per_sample(layer, Factors([activations[0]], [backprops]))
    return {p: per_sample[name] for name, p in want}


def group_norm_grad_sample(layer, activations, backprops):
    """Opacus grad sampler for nn.GroupNorm: {param: per-sample gradient [N, C]}."""
    return _channel_affine_grad_sample(_group_norm.GROUP_NORM, layer, activations, backprops)


def instance_norm_grad_sample(layer, activations, backprops):
    """Opacus grad sampler for nn.InstanceNorm1d/2d/3d: {param: per-sample gradient [N, C]}."""
    return _channel_affine_grad_sample(_group_norm.INSTANCE_NORM, layer, activations, backprops)


# ---------------------------------------------------------------- what we serve, and installing it

# The one table of the module types we serve: type -> (grad sampler, norm sampler or None:
# Opacus's own, if any, stays). Opacus looks samplers up by the exact type of a module.
SAMPLERS = {
    nn.Linear: (linear_grad_sample, linear_norm_sample),
    nn.Conv1d: (conv_grad_sample, conv_norm_sample),
    nn.Conv2d: (conv_grad_sample, conv_norm_sample),
    nn.Conv3d: (conv_grad_sample, conv_norm_sample),
    nn.GroupNorm: (group_norm_grad_sample, None),
    nn.InstanceNorm1d: (instance_norm_grad_sample, None),
    nn.InstanceNorm2d: (instance_norm_grad_sample, None),
    nn.InstanceNorm3d: (instance_norm_grad_sample, None),
}


def _tables():
    """(hooks class, registry name, table) for each sampler table, each table once (a class's
    own table: a subclass that defines none shares its parent's)."""
    for hooks in _HOOK_CLASSES:
        for registry in _REGISTRIES:
            if registry in vars(hooks):
                yield hooks, registry, vars(hooks)[registry]


def install():
    """Register our samplers (:data:`SAMPLERS`) with Opacus (idempotent)."""
    global _saved
    _require_opacus()
    if _saved is not None:
        return
    saved = {}
    for hooks, registry, table in _tables():
        for module_type, samplers in SAMPLERS.items():
            ours = samplers[_REGISTRIES.index(registry)]
            if ours is not None:
                saved[(hooks, registry, module_type)] = table.get(module_type, _MISSING)
                table[module_type] = ours
    _saved = saved


def uninstall():
    """Restore the samplers install() replaced (Opacus's own), and remove the entries it added
    (idempotent)."""
    global _saved
    _require_opacus()
    if _saved is None:
        return
    for (hooks, registry, module_type), previous in _saved.items():
        table = vars(hooks)[registry]
        if previous is _MISSING:
            table.pop(module_type, None)
        else:
            table[module_type] = previous
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
