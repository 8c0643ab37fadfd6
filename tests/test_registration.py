"""Dispatcher registration (opcheck), torch.compile, and the build/import diagnostics."""

import json
import subprocess
import sys

import pytest
import torch

import indivgrad_cuda as ig
from indivgrad_cuda import _loader
from tests.reference import act_outer_ref, outer_ref

ops = torch.ops.indivgrad_cuda


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_opcheck(device, layout):
    x = torch.randn(4, 6, device=device)
    up, pre = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    shape = (4, 6, 3) if layout == "in_out" else (4, 3, 6)
    torch.library.opcheck(ops.outer.default, (x, up, layout))
    torch.library.opcheck(ops.outer_out.default, (x, up, layout, torch.empty(shape, device=device)))
    act_args = (x, up, pre, "gelu", layout, 0.01, 1.0, 1.0, 20.0)
    torch.library.opcheck(ops.act_outer.default, act_args)
    torch.library.opcheck(
        ops.act_outer_out.default, (*act_args, torch.empty(shape, device=device), torch.empty(4, 3, device=device))
    )


def test_torch_compile_fullgraph(device):
    def step(x, up, pre):
        w, b = ig.act_outer(x, up, pre, "softplus", layout="out_in")
        return w, b, ig.outer(x, b)

    compiled = torch.compile(step, fullgraph=True)
    x, up, pre = torch.randn(5, 7, device=device), torch.randn(5, 3, device=device), torch.randn(5, 3, device=device)
    w, b, o = compiled(x, up, pre)
    w_ref, b_ref = act_outer_ref(x, up, pre, "softplus", "out_in")
    torch.testing.assert_close(w.double(), w_ref)
    torch.testing.assert_close(b.double(), b_ref)
    torch.testing.assert_close(o.double(), outer_ref(x, b))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, up = torch.empty(8, 5), torch.empty(8, 3)
        assert ig.outer(x, up, layout="out_in").shape == (8, 3, 5)
        w, b = ig.act_outer(x, up, torch.empty(8, 3), "relu")
        assert w.shape == (8, 5, 3) and b.shape == (8, 3)


def test_build_info_and_main():
    info = ig.build_info()
    assert info["version"] == ig.__version__
    assert info["torch"] == torch.__version__
    accel = f"cu{torch.version.cuda.replace('.', '')}" if info["cuda_kernels"] else "cpu"
    assert info["build_version"] == f"{ig.__version__}+pt{torch.__version__.split('+')[0]}{accel}"
    assert isinstance(info["cuda_kernels"], bool)
    out = subprocess.run([sys.executable, "-m", "indivgrad_cuda"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"indivgrad_cuda {info['build_version']}\n")
    assert f"built with torch: {torch.__version__}" in out and "GPU:" in out


def test_cpp_errors_reach_python_in_a_fresh_process():
    """An error raised in C++ comes back as a Python exception. Run apart from this process, so
    that a crash is a failure here rather than the end of the test run: on the lent H200 (its
    /opt/gcc build, torch 2.11) this call segfaulted; bench/NOTES.md has what is known."""
    code = "import torch, indivgrad_cuda as ig\nig.outer(torch.randn(12), torch.randn(3, 5))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1, f"exit {proc.returncode} (a negative one is a signal):\n{proc.stderr[-2000:]}"
    assert "ValueError: x: expected a 2-D tensor [N, D_in], got shape [12]" in proc.stderr


def test_import_refuses_a_build_for_another_torch(tmp_path, monkeypatch):
    info = dict(ig.build_info(), torch="1.0.0")
    fake = tmp_path / "_build_info.json"
    fake.write_text(json.dumps(info))
    monkeypatch.setattr(_loader, "_INFO_PATH", fake)
    with pytest.raises(ImportError, match=r"built for torch 1\.0\.0 .* but torch .* is installed\. Rebuild"):
        _loader.load_extension()


def test_import_explains_a_missing_build(tmp_path, monkeypatch):
    monkeypatch.setattr(_loader, "_INFO_PATH", tmp_path / "_build_info.json")
    with pytest.raises(ImportError, match=r"compiled extension is missing.*pip install --no-build-isolation -e \."):
        _loader.load_extension()
