"""`make lint`'s hooks cover every kind of source file here: in a clone of the committed tree
they pass, and a violation planted in a Python file, a C++ source and header, a CUDA source
and header, and a shell script each makes them fail, naming the file. Skipped where pre-commit
is not installed (`make lint` and `make test` install it into the venv)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pre_commit") is None or not (ROOT / ".git").exists(),
    reason="needs pre-commit (make lint installs it) and a git checkout",
)

# file -> text appended: a formatting violation for clang-format, a lint and a format one for ruff
PLANTS = {
    "indivgrad_cuda/buffers.py": "\n\ndef _planted():\n    l = 1\n",  # E741 and F841: ruff cannot fix them
    "bench/common.py": "\nPLANTED = (  1,2)\n",  # ruff format rewrites it
    "csrc/checks.cpp": "\nint  planted( int x ){return x;}\n",
    "csrc/checks.h": "\nint  planted_h( int x ){return x;}\n",
    "csrc/outer_cuda.cu": "\nint  planted_cu( int x ){return x;}\n",
    "csrc/outer_kernel.cuh": "\nint  planted_cuh( int x ){return x;}\n",
    "bench/gpu_check.sh": '\necho "$planted_unset"\n',  # SC2154: referenced but not assigned
}


def run_hooks(clone):
    return subprocess.run(
        [sys.executable, "-m", "pre_commit", "run", "--all-files", "--show-diff-on-failure", "--color", "never"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_hooks_pass_on_the_tree_and_fail_on_each_kind_of_violation(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    clean = run_hooks(clone)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    for path, text in PLANTS.items():
        with (clone / path).open("a") as f:
            f.write(text)
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)  # so the diff shown is the hooks' own
    dirty = run_hooks(clone)
    out = dirty.stdout + dirty.stderr
    assert dirty.returncode != 0, out
    assert "E741" in out and "F841" in out  # reported, as ruff cannot fix them
    # each file reported: ruff's finding (--> path:line) or the diff of a hook's fix
    for path in PLANTS:
        reported = (f"--> {path}:", f"diff --git a/{path} ", f"In {path} line ")  # ruff, a fix, shellcheck
        assert any(r in out for r in reported), f"{path}: not reported\n{out}"
