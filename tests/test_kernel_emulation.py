"""The CUDA kernels' logic, run on the host: tests/harness compiles csrc/outer_kernel.cuh and
csrc/gram_kernel.cuh (the very text the GPU build compiles) with g++ under AddressSanitizer and
UBSan, runs every block's threads as fibers split at each __syncthreads, and checks every
element (see tests/harness/*_harness.cpp for the cases). The mutants below plant the bugs a
kernel edit is likely to introduce in a copy of the header; the harness must catch every one,
which shows that a pass means something."""

import concurrent.futures
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "g++")
FLAGS = [
    "-std=c++20",
    "-O1",
    "-g",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
]
# Leak checking needs ptrace, which some containers forbid; leaks are not what this tests.
RUN_ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")

# (name, text in outer_kernel.cuh, its replacement, what the harness must report)
OUTER_MUTANTS = [
    (
        "tail_off_by_one",
        "for (int e = tail + threadIdx.x; e < len; e += blockDim.x)",
        "for (int e = tail + threadIdx.x; e < len - 1; e += blockDim.x)",
        "wrong elements",
    ),
    (
        "head_off_by_one",
        "const int head = min(len, (kVec - misalign) % kVec);",
        "const int head = min(len, (kVec - misalign + 1) % kVec);",
        "misaligned address",
    ),
    (
        "int_tile_offset",
        "T* region = out + b.q0 * p.C + b.c0;",
        "T* region = out + static_cast<int>(b.q0 * p.C) + b.c0;",
        "FAIL",
    ),
    (
        "fast_path_skips_last_row",
        "for (; r < b.nrows; r += step_rows) {",
        "for (; r < b.nrows - 1; r += step_rows) {",
        "wrong elements",
    ),
    (
        "bias_owner_off_by_one",
        "const bool owns_bias = bias_out != nullptr && n * p.R >= b.q0;",
        "const bool owns_bias = bias_out != nullptr && n * p.R > b.q0;",
        "bias_out",
    ),
    (
        "shared_memory_too_small",
        "p.max_samples * p.tile_cols * acc_size;",
        "(p.max_samples - 1) * p.tile_cols * acc_size;",
        "heap-buffer-overflow",
    ),
    ("missing_syncthreads", "  __syncthreads();\n", "\n", "wrong elements"),
]

# The same for gram_kernel.cuh.
GRAM_MUTANTS = [
    (
        "gram_depth_tail_dropped",
        "const bool in_k = k0 + k < d;",
        "const bool in_k = k0 + k < d - 1;",
        "wrong elements",
    ),
    (
        "gram_slab_overwritten_early",
        "    __syncthreads();  // the slab is overwritten next step\n",
        "\n",
        "wrong elements",
    ),
    ("gram_column_guard", "if (m < p.nb) out", "if (m <= p.nb) out", "heap-buffer-overflow"),
    ("gram_row_guard", "if (n >= p.na) continue;", "if (n > p.na) continue;", "heap-buffer-overflow"),
    ("gram_row_stride", "out[n * p.ld_out + m]", "out[n * p.nb + m]", "FAIL"),
    (
        "gram_shared_memory_too_small",
        "return 2 * int64_t{kGramTile} * kGramPad * acc_size;",
        "return (2 * int64_t{kGramTile} - 1) * kGramPad * acc_size;",
        "heap-buffer-overflow",
    ),
    # ghost_sq_norm_kernel (the per-sample form)
    ("ghost_off_diagonal_once", "(i == j ? acc_t(1) : acc_t(2))", "acc_t(1)", "wrong elements"),
    ("ghost_pair_decoding", "while (rest >= p.tiles - i)", "while (rest > p.tiles - i)", "FAIL"),
    (
        "ghost_reduction_barrier",
        "red[threadIdx.x] += red[threadIdx.x + half];\n    __syncthreads();",
        "red[threadIdx.x] += red[threadIdx.x + half];",
        "wrong elements",
    ),
    ("ghost_sample_offset", "g + sample * p.t * p.d_g;", "g + sample * p.t * p.d_x;", "FAIL"),
    ("ghost_last_block", "tiles, pairs, n * pairs};", "tiles, pairs, n * pairs - 1};", "wrong elements"),
]

# kernel -> (its header, its harness, its mutants, the fewest cases a full run must pass)
KERNELS = {
    "outer": ("outer_kernel.cuh", "outer_harness.cpp", OUTER_MUTANTS, 800),
    "gram": ("gram_kernel.cuh", "gram_harness.cpp", GRAM_MUTANTS, 440),
}
MUTANTS = [(kernel, *m) for kernel, (_, _, mutants, _) in KERNELS.items() for m in mutants]


def _build(source_dir, binary, harness):
    """g++ the harness with source_dir searched first for the kernel's header."""
    include = torch.utils.cpp_extension.include_paths()[0]  # c10's Half and BFloat16
    source = ROOT / "tests" / "harness" / harness
    cmd = [CXX, *FLAGS, "-I", str(source_dir), "-I", str(ROOT / "csrc"), "-I", include, str(source), "-o", str(binary)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the harness failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return binary


def _run(binary, *args):
    return subprocess.run([str(binary), *args], capture_output=True, text=True, env=RUN_ENV, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Builds each harness on its real kernel and on every mutant and runs each (the kernels
    on every case, the mutants on the quick set), all at once: name -> (binary, CompletedProcess)."""
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler {CXX!r} to build the kernel harness")
    root = tmp_path_factory.mktemp("harness")
    jobs = {kernel: (ROOT / "csrc", root / kernel, harness, ()) for kernel, (_, harness, _, _) in KERNELS.items()}
    for kernel, name, old, new, _ in MUTANTS:
        header, harness = KERNELS[kernel][:2]
        text = (ROOT / "csrc" / header).read_text()
        assert text.count(old) == 1, f"mutant {name}: {old!r} must occur once in {header}; update the mutant"
        (root / name).mkdir()
        (root / name / header).write_text(text.replace(old, new))
        jobs[name] = (root / name, root / f"{name}.bin", harness, ("--quick",))

    def build_and_run(source_dir, binary, harness, args):
        _build(source_dir, binary, harness)
        return binary, _run(binary, *args)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(build_and_run, *job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_passes_every_case(runs, kernel):
    proc = runs[kernel][1]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " 0 failed" in proc.stdout, output[-6000:]
    passed = int(proc.stdout.strip().splitlines()[-1].split()[0])
    assert passed >= KERNELS[kernel][3], f"only {passed} cases ran:\n{output[-2000:]}"


@pytest.mark.parametrize("name,expected", [(m[1], m[4]) for m in MUTANTS], ids=[m[1] for m in MUTANTS])
def test_harness_catches_planted_bug(runs, name, expected):
    proc = runs[name][1]
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"mutant {name} passed the harness:\n{output[-3000:]}"
    assert expected in output, f"mutant {name} failed, but not with {expected!r}:\n{output[-3000:]}"


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_harness_rejects_unknown_arguments(runs, kernel):
    proc = _run(runs[kernel][0], "--frobnicate")
    assert proc.returncode == 2 and "usage:" in proc.stderr
