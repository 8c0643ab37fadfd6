"""indivgrad_cuda: fast per-sample gradients, norms, clipped sums, inner products and
projections for PyTorch models.

See ``indivgrad_cuda.ops`` for the fused kernels and ``build_info()`` for how this copy
was built.
"""

from indivgrad_cuda._loader import load_extension as _load_extension
from indivgrad_cuda._version import __version__

_C, _BUILD_INFO = _load_extension()

from indivgrad_cuda import ops  # noqa: E402
from indivgrad_cuda.capture.layers import UnsupportedModuleError  # noqa: E402
from indivgrad_cuda.engine import (  # noqa: E402
    PerSampleGrads,
    clipped_grad_sum,
    per_sample_grad_norms,
    per_sample_grads,
)
from indivgrad_cuda.ops import act_outer, outer  # noqa: E402
from indivgrad_cuda.projection import Projection  # noqa: E402
from indivgrad_cuda.tracin import tracin_scores, tracin_self_influence  # noqa: E402

# submodules loaded on first use (as torch.distributed on torch): ig.privacy imports
# torch.distributed, ig.opacus imports Opacus; `import indivgrad_cuda` imports neither
_LAZY_SUBMODULES = ("opacus", "privacy")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # also sets the attribute: called once
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY_SUBMODULES])


def build_info() -> dict:
    """How this copy was built: package version, the torch and CUDA it was compiled
    against, the GPU architectures, and whether CUDA kernels were compiled in."""
    info = dict(_BUILD_INFO)
    info["cuda_kernels"] = bool(_C.compiled_with_cuda())  # ask the binary, not only the record
    return info


__all__ = [
    "PerSampleGrads",
    "Projection",
    "UnsupportedModuleError",
    "__version__",
    "act_outer",
    "build_info",
    "clipped_grad_sum",
    "ops",
    "outer",
    "per_sample_grad_norms",
    "per_sample_grads",
    "tracin_scores",
    "tracin_self_influence",
]
