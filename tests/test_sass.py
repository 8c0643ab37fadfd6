"""Static properties of the compiled CUDA kernel, read from its sm_90 SASS by bench/sass.py (no GPU
needed, only nvcc and cuobjdump): every instantiation compiles without register spills, every
one has a loop of wide stores, and each fast path's loop costs fewer instructions per byte
than the run path's. The exact counts, and what they predict, are in bench/NOTES.md."""

import sys
from pathlib import Path

import pytest

import indivgrad_cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sass

pytestmark = pytest.mark.skipif(
    not indivgrad_cuda.build_info()["cuda_kernels"] or None in (sass.find_tool("nvcc"), sass.find_tool("cuobjdump")),
    reason="needs nvcc and cuobjdump, and an extension built with CUDA kernels",
)


@pytest.fixture(scope="module")
def kernels():
    return {name: (regs, spill, loops) for name, regs, spill, loops in sass.analyse()}


def test_every_instantiation_is_found(kernels):
    # 4 dtypes x (fast16 plain, fast16 streaming, run) + 2 two-byte dtypes x (fast8 plain, streaming)
    assert len(kernels) == 16, sorted(kernels)


@pytest.mark.parametrize("dtype", ["float", "double", "Half", "BFloat16"])
def test_no_spills_and_fast_loops_cheaper_per_byte_than_the_run_loop(kernels, dtype):
    paths = ["fast16", "run"] + (["fast8"] if dtype in ("Half", "BFloat16") else [])
    variants = {
        f"{path}, {stores}": kernels[f"outer_kernel<{dtype}, {path}, {stores}>"]
        for path in paths
        for stores in (("plain",) if path == "run" else ("plain", "streaming"))
    }
    for variant, (regs, spill, loops) in variants.items():
        assert spill == 0, f"{dtype} {variant}: {spill} bytes of register spills"
        assert regs is not None and regs <= 64, f"{dtype} {variant}: {regs} registers"
        assert loops, f"{dtype} {variant}: no loop issuing its wide stores"
    run = min(n for n, _ in variants["run, plain"][2])  # per 16-byte store
    for path, store_bytes in (("fast16", 16), ("fast8", 8)):
        if path in paths:
            fast = variants[f"{path}, plain"][2][0][0] * 16 / store_bytes
            assert fast < run, f"{dtype}: {path} loop {fast:.0f} instructions per 16 bytes, run loop {run:.0f}"


def test_gram_kernel_has_no_spills(tmp_path):
    """csrc/gram_cuda.cu's kernels (the Gram kernel and its per-sample ghost-norm form), every
    dtype: registers only (64 for 4-byte accumulators, so 4 blocks of 256 threads fit an SM;
    bench/NOTES.md)."""
    _, log = sass.compile_cubin(sass.ROOT / "csrc", "sm_90", tmp_path, "gram_cuda.cu")
    regs = {sass.demangle([k])[k]: v for k, v in sass.registers(log).items()}
    assert len(regs) == 8 and {k.split("<")[0] for k in regs} == {
        "void indivgrad::gram_kernel",
        "void indivgrad::ghost_sq_norm_kernel",
    }, regs
    for kernel, (count, spill) in regs.items():
        assert spill == 0 and 0 < count <= (128 if "<double, double>" in kernel else 64), (kernel, count, spill)
