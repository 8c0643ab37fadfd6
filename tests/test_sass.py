"""Static properties of the compiled CUDA kernel, read from its sm_90 SASS by bench/sass.py (no GPU
needed, only nvcc and cuobjdump): every instantiation compiles without register spills, every
one has a 16-byte store loop, and each fast path's loop is shorter than its fallback's. The
exact counts, and what they predict, are in bench/NOTES.md."""
import sys
from pathlib import Path

import pytest

import indivgrad_cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sass  # noqa: E402

pytestmark = pytest.mark.skipif(
    not indivgrad_cuda.build_info()["cuda_kernels"] or None in (sass.find_tool("nvcc"), sass.find_tool("cuobjdump")),
    reason="needs nvcc and cuobjdump, and an extension built with CUDA kernels",
)


@pytest.fixture(scope="module")
def kernels():
    return {name: (regs, spill, loops) for name, regs, spill, loops in sass.analyse()}


def test_every_instantiation_is_found(kernels):
    # 4 dtypes x (fast plain, fast streaming, run)
    assert len(kernels) == 12, sorted(kernels)


@pytest.mark.parametrize("dtype", ["float", "double", "Half", "BFloat16"])
def test_no_spills_and_fast_loop_shorter_than_run_loop(kernels, dtype):
    variants = {v: kernels[f"outer_kernel<{dtype}, {v}>"] for v in ("fast, plain", "fast, streaming", "run, plain")}
    for variant, (regs, spill, loops) in variants.items():
        assert spill == 0, f"{dtype} {variant}: {spill} bytes of register spills"
        assert regs is not None and regs <= 64, f"{dtype} {variant}: {regs} registers"
        assert loops, f"{dtype} {variant}: no loop issuing 16-byte stores"
    fast = variants["fast, plain"][2][0][0]
    run = min(n for n, _ in variants["run, plain"][2])
    assert fast < run, f"{dtype}: fast loop {fast:.0f} instructions per store, run loop {run:.0f}"
