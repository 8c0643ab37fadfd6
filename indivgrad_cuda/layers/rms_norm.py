"""RMS normalisations: ``nn.RMSNorm``, and the copies Hugging Face models carry.

Sample n's gradient of the gain is ``sum_t x̂_t ⊙ g_t`` ([N, *normalized_shape]), where
``x̂`` is the normalised input, so the reductions are those of any small per-sample
gradient. ``nn.RMSNorm`` forms ``x̂`` with ``F.rms_norm``.

The Llama family's copies (``LlamaRMSNorm`` and its copies in Mistral, Qwen2, ...; T5's
``T5LayerNorm``; Gemma's, which scales by ``1 + weight``) are recognised by name (a class
named ``*RMSNorm`` or ``T5LayerNorm`` with one parameter, a 1-D ``weight``), never by
importing transformers. Each computes ``s(w) ⊙ h(x)`` in its own precision, with ``s(w) =
w`` or ``1 + w``: so ``x̂ = h(x)`` is the module's own forward with the gain set to ones
(or zeros), and nothing of its arithmetic needs copying. On the first call the rule checks
that the module really is of that form (its output, and its output with a random gain,
match ``s(w) ⊙ h(x)``); a module that is not is served by the fallback from then on (or
refused with ``fallback=False``).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_unflatten

from indivgrad_cuda.capture.precision import replay
from indivgrad_cuda.errors import UnsupportedModuleError
from indivgrad_cuda.layers.base import WholeCalls, acc_dtype, cast
from indivgrad_cuda.layers.fallback import FallbackRule, difference
from indivgrad_cuda.layers.per_sample import PerSampleRule

# how close s(w) ⊙ h(x) must come to the module's output, relative to its largest magnitude:
# loose, as the modules compute in float32 whatever their dtype, and a module of another form
# misses by O(1) with a random gain
FORM_TOL = {torch.float16: 5e-2, torch.bfloat16: 5e-2}
FORM_TOL_DEFAULT = 1e-3


def _sum_positions(xhat: torch.Tensor, g: torch.Tensor, keep: int) -> torch.Tensor:
    """sum over the positions (dims 1 .. -keep-1) of x̂ ⊙ g, in the accumulation dtype: [N, *last keep dims]."""
    acc = acc_dtype(g.dtype)
    prod = cast(xhat, acc) * cast(g, acc)
    return prod.reshape(prod.shape[0], -1, *prod.shape[prod.dim() - keep :]).sum(1)


class RMSNormRule(WholeCalls, PerSampleRule):
    module_type = nn.RMSNorm
    params = ("weight",)
    matrix_projections = False

    def per_sample(self, module, f):
        keep = len(module.normalized_shape)
        total = None
        for a, g in zip(f.a, f.g):
            xhat = F.rms_norm(a, module.normalized_shape, None, module.eps)
            part = _sum_positions(xhat, g, keep)
            total = part if total is None else total + part
        return {"weight": total}


class ScaleNormRule(FallbackRule):
    """A module of the RMSNorm family recognised by name (see the module's docs); its form is
    checked on the first call, and the fallback serves it if the check fails."""

    @property
    def served_by(self):
        return "fallback" if self.offset is False else "rule"

    def __init__(self, path: str = "", fallback: bool = True):
        super().__init__(path)
        self.fallback = fallback
        self.offset = None  # 0.0 (w ⊙ h) or 1.0 ((1 + w) ⊙ h) once checked; False: not of the form

    def bind(self, path, module, fallback=True):
        return type(self)(path, fallback)

    def matches(self, module):
        name = type(module).__name__
        params = dict(module.named_parameters(recurse=False))
        return (
            (name.endswith("RMSNorm") or name == "T5LayerNorm")
            and list(params) == ["weight"]
            and params["weight"].dim() == 1
        )

    def attrs(self, module):
        return ["weight"]

    def per_sample(self, module, f):
        if self.offset is None:
            self.offset = self._form(module, f.a[0], f.g[0])
        if self.offset is False:
            return super().per_sample(module, f)
        total = None
        for call, (g,) in zip(f.a, f.g):
            part = _sum_positions(self._h(module, call, self.offset), g, 1)
            total = part if total is None else total + part
        return {"weight": total.to(module.weight.dtype)}

    @staticmethod
    def _run(module, call, weight):
        args, kwargs = tree_unflatten(call.leaves, call.spec)
        with torch.no_grad(), replay(call.autocast):  # in the precision of the recorded call
            return functional_call(module, {"weight": weight}, args, kwargs)

    def _h(self, module, call, offset):
        """h(x): the module's output with the gain s(w) = 1."""
        w = module.weight
        return self._run(module, call, torch.full_like(w, 1.0 - offset))

    def _form(self, module, call, cots):
        """The offset whose form the module has (checked), or False."""
        if len(call.out_index) != 1 or len(cots) != 1:
            return self._not_of_form(module, "it has more than one output")
        w = module.weight.detach()
        gen = torch.Generator().manual_seed(0)
        r = (torch.rand(w.shape, generator=gen, dtype=torch.float64) + 0.5).to(w.dtype).to(w.device)
        with_r = self._run(module, call, r)
        for offset in (0.0, 1.0):
            h = self._h(module, call, offset)
            if not isinstance(h, torch.Tensor) or h.shape[-1:] != w.shape:
                return self._not_of_form(module, "its output's last dim is not its weight's")
            checks = [(with_r, (offset + r) * h)]
            if call.reference is not None:
                checks.append((call.reference[0], (offset + w) * h))
            if all(_close(got, want) for got, want in checks):
                return offset
        return self._not_of_form(module, "its output is not weight ⊙ h(x) or (1 + weight) ⊙ h(x)")

    def _not_of_form(self, module, why):
        if not self.fallback:
            raise UnsupportedModuleError(
                f"'{self.path}' ({type(module).__name__}): named like an RMS norm, but {why}; pass fallback=True to "
                f"serve it by torch.func, or freeze it"
            )
        return False


def _close(got, want) -> bool:
    diff, scale = difference(got, want.to(got.dtype))
    return diff <= FORM_TOL.get(got.dtype, FORM_TOL_DEFAULT) * max(scale, 1e-30)


RULE = RMSNormRule()
FAMILY_RULE = ScaleNormRule()
