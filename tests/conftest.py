import pytest
import torch

import indivgrad_cuda

CUDA_OK = torch.cuda.is_available() and indivgrad_cuda.build_info()["cuda_kernels"]
CUDA_SKIP_REASON = (
    "no GPU visible" if not torch.cuda.is_available() else "indivgrad_cuda was built without CUDA kernels"
)

# A test that needs a GPU carries the `cuda` marker (directly, or by a "cuda" param of DEVICES):
# it is skipped where CUDA_OK is false, and bench/gpu_check.sh selects the GPU tests by `-m cuda`.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Tolerances against a float64 reference computed from the same (rounded) inputs: the
# result is computed in at least float32 and rounded once to its dtype.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}


# The activations' parameters for the op tests: non-defaults, so each is exercised.
PARAMS = dict(negative_slope=0.2, alpha=0.7, beta=1.5, threshold=3.0)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a GPU and the CUDA kernels (skipped without them)")


def pytest_collection_modifyitems(config, items):
    if CUDA_OK:
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
