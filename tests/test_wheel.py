"""A built wheel, installed into a fresh virtual environment: its name and metadata say which
torch it was built for, pip refuses it beside another torch, and it imports and computes
there. Skipped unless INDIVGRAD_WHEEL names the wheel (`make wheel-test` builds one and sets
it); the fresh venv downloads or copies the pinned torch (about 30 s from pip's cache).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import indivgrad_cuda as ig

WHEEL = os.environ.get("INDIVGRAD_WHEEL")
pytestmark = pytest.mark.skipif(
    not WHEEL, reason="set INDIVGRAD_WHEEL to a built wheel to test it in a fresh venv (make wheel-test does)"
)

RELEASE = torch.__version__.split("+")[0]
# The wheel is built against this venv's torch, like the checkout's own build, whose version
# test_registration.py checks: 0.2.0+pt2.14.1cu130.
VERSION = ig.build_info()["build_version"]

# Run inside the fresh venv, from a directory outside the checkout: one op against the
# explicit product, in float64 on fresh random data.
SMOKE = """
import sys, torch, indivgrad_cuda as ig
x, g = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
ref = x[:, None, :] * g[:, :, None]
got = ig.outer(x, g, layout="out_in")
assert got.shape == (7, 3, 5), got.shape
torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
print(ig.__file__)
print(ig.build_info()["build_version"])
"""


@pytest.fixture(scope="module")
def wheel():
    path = Path(WHEEL)
    assert path.is_file(), f"INDIVGRAD_WHEEL={WHEEL}: no such file"
    return path


@pytest.fixture(scope="module")
def venv():
    root = Path(tempfile.mkdtemp(prefix="indivgrad-wheel-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        yield root / "bin" / "python"
    finally:
        shutil.rmtree(root, ignore_errors=True)  # a CUDA torch is ~5 GB


def pip(python, *args, check=True):
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True, check=check
    )


def test_name_and_metadata_name_the_torch_it_was_built_for(wheel):
    assert wheel.name.startswith(f"indivgrad_cuda-{VERSION}-"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(f"indivgrad_cuda-{VERSION}.dist-info/METADATA").decode()
    assert f"Version: {VERSION}" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires == [f"Requires-Dist: torch=={RELEASE}"], requires
    assert any(re.fullmatch(r"indivgrad_cuda/_C\..*\.so", n) for n in names), names
    assert "indivgrad_cuda/_build_info.json" in names
    assert not any(n.startswith(("tests/", "bench/", "csrc/")) for n in names)


def test_pip_refuses_it_beside_another_torch(wheel, venv):
    other = "2.13.0" if RELEASE != "2.13.0" else "2.14.1"
    proc = pip(venv, "install", "--dry-run", str(wheel), f"torch=={other}", check=False)
    assert proc.returncode != 0
    assert f"depends on torch=={RELEASE}" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_installs_imports_and_computes_in_a_fresh_venv(wheel, venv, tmp_path):
    proc = pip(venv, "install", "-q", str(wheel), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = subprocess.run([str(venv), "-c", SMOKE], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    where, version = run.stdout.split()
    assert Path(where).is_relative_to(venv.parent.parent), where  # the installed copy, not the checkout
    assert version == VERSION
