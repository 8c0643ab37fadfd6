"""The CUDA kernel's logic, run on the host: tests/harness compiles csrc/outer_kernel.cuh (the
very text the GPU build compiles) with g++ under AddressSanitizer and UBSan, runs every block's
threads as fibers split at each __syncthreads, and checks every element bit for bit (see
tests/harness/outer_harness.cpp for the cases). The mutants below plant the bugs a kernel edit
is likely to introduce in a copy of the header; the harness must catch every one, which shows
that a pass means something."""

import concurrent.futures
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc" / "outer_kernel.cuh"
HARNESS = ROOT / "tests" / "harness" / "outer_harness.cpp"
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
MUTANTS = [
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


def _build(source_dir, binary):
    """g++ the harness with source_dir searched first for outer_kernel.cuh."""
    include = torch.utils.cpp_extension.include_paths()[0]  # c10's Half and BFloat16
    cmd = [CXX, *FLAGS, "-I", str(source_dir), "-I", str(ROOT / "csrc"), "-I", include, str(HARNESS), "-o", str(binary)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the harness failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return binary


def _run(binary, *args):
    return subprocess.run([str(binary), *args], capture_output=True, text=True, env=RUN_ENV, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Builds the harness on the real kernel and on every mutant and runs each (the kernel on
    every case, the mutants on the quick set), all at once: name -> (binary, CompletedProcess)."""
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler {CXX!r} to build the kernel harness")
    root = tmp_path_factory.mktemp("harness")
    text = KERNEL.read_text()
    jobs = {"kernel": (ROOT / "csrc", root / "kernel", ())}
    for name, old, new, _ in MUTANTS:
        assert text.count(old) == 1, f"mutant {name}: {old!r} must occur once in {KERNEL.name}; update the mutant"
        (root / name).mkdir()
        (root / name / KERNEL.name).write_text(text.replace(old, new))
        jobs[name] = (root / name, root / f"{name}.bin", ("--quick",))

    def build_and_run(source_dir, binary, args):
        _build(source_dir, binary)
        return binary, _run(binary, *args)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(build_and_run, *job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def test_kernel_passes_every_case(runs):
    proc = runs["kernel"][1]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " 0 failed" in proc.stdout, output[-6000:]
    passed = int(proc.stdout.strip().splitlines()[-1].split()[0])
    assert passed >= 800, f"only {passed} cases ran:\n{output[-2000:]}"


@pytest.mark.parametrize("name,expected", [(m[0], m[3]) for m in MUTANTS], ids=[m[0] for m in MUTANTS])
def test_harness_catches_planted_bug(runs, name, expected):
    proc = runs[name][1]
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"mutant {name} passed the harness:\n{output[-3000:]}"
    assert expected in output, f"mutant {name} failed, but not with {expected!r}:\n{output[-3000:]}"


def test_harness_rejects_unknown_arguments(runs):
    proc = _run(runs["kernel"][0], "--frobnicate")
    assert proc.returncode == 2 and "usage:" in proc.stderr
