"""The Opacus backend: the same per-sample gradients and ghost norms as Opacus's own
samplers, in float64, with our sampler really in use; on CPU and, where a GPU is usable,
with the model and data on CUDA."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

opacus = pytest.importorskip("opacus", reason="Opacus is not installed (pip install -e .[opacus])")
from opacus import GradSampleModule  # noqa: E402
from opacus.grad_sample import GradSampleHooks, GradSampleModuleFastGradientClipping  # noqa: E402
from opacus.grad_sample.linear import compute_linear_grad_sample  # noqa: E402

import indivgrad_cuda.opacus as ig_opacus  # noqa: E402


@pytest.fixture(autouse=True)
def _restore():
    yield
    ig_opacus.uninstall()


def grad_samples(model, x, y, loss_reduction, backend, batch_first=True):
    ctx = ig_opacus.installed() if backend else _nothing()
    with ctx:
        gsm = GradSampleModule(copy.deepcopy(model), loss_reduction=loss_reduction, batch_first=batch_first)
        loss = nn.functional.mse_loss(gsm(x), y, reduction=loss_reduction)
        loss.backward()
        out = {k: p.grad_sample.clone() for k, p in gsm._module.named_parameters() if p.requires_grad}
        gsm._close()
    return out


class _nothing:
    def __enter__(self):
        ig_opacus.uninstall()

    def __exit__(self, *exc):
        pass


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of our per-sample product, so a test can tell that our path ran."""
    count = {"n": 0}
    real = ig_opacus.seq_outer

    def spy(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ig_opacus, "seq_outer", spy)
    return count


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_grad_samples_agree(loss_reduction, bias, calls, device):
    model = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias)).double().to(device)
    x, y = torch.randn(7, 6, dtype=torch.float64, device=device), torch.randn(7, 3, dtype=torch.float64, device=device)
    ours = grad_samples(model, x, y, loss_reduction, backend=True)
    assert calls["n"] == 2
    assert all(g.device == x.device for g in ours.values())
    assert_same(ours, grad_samples(model, x, y, loss_reduction, backend=False))


def test_mixed_model_keeps_opacus_samplers_for_other_layers(calls, device):
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4)).double().to(device)
    x, y = torch.randn(5, 6, dtype=torch.float64, device=device), torch.randn(5, 4, dtype=torch.float64, device=device)
    ours = grad_samples(model, x, y, "mean", backend=True)
    assert calls["n"] == 2 and {"1.weight", "1.bias"} <= set(ours)
    assert_same(ours, grad_samples(model, x, y, "mean", backend=False))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("middle", [(3,), (2, 3)])
def test_sequence_inputs_go_through_our_sampler(batch_first, middle, calls, device):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double().to(device)
    shape = (4, *middle, 6) if batch_first else (middle[0], 4, *middle[1:], 6)  # [N, *, D] or [T, N, *, D]
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    y = torch.randn(*shape[:-1], 2, dtype=torch.float64, device=device)
    ours = grad_samples(model, x, y, "sum", backend=True, batch_first=batch_first)
    assert calls["n"] == 2
    assert_same(ours, grad_samples(model, x, y, "sum", backend=False, batch_first=batch_first))
    assert ours["0.weight"].shape == (4, 5, 6)


def ghost_norms(model, x, y, backend):
    with ig_opacus.installed() if backend else _nothing():
        gsm = GradSampleModuleFastGradientClipping(
            copy.deepcopy(model), loss_reduction="mean", max_grad_norm=1.0, use_ghost_clipping=True
        )
        nn.functional.mse_loss(gsm(x), y).backward()
        norms = gsm.get_norm_sample().clone()
        gsm._close()
    return norms


@pytest.mark.parametrize("middle", [(), (2,), (40,)])  # 2-D; sequences taking the ghost, then the direct norm
def test_ghost_clipping_norms_agree(device, middle):
    model = nn.Sequential(nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 2)).double().to(device)
    x = torch.randn(8, *middle, 6, dtype=torch.float64, device=device)
    y = torch.randn(8, *middle, 2, dtype=torch.float64, device=device)
    ours = ghost_norms(model, x, y, backend=True)
    torch.testing.assert_close(ours, ghost_norms(model, x, y, backend=False), rtol=1e-12, atol=1e-12)
    per_sample = grad_samples(model, x, y, "mean", backend=False)
    torch.testing.assert_close(ours, torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0))


def test_install_uninstall_and_context_manager():
    assert GradSampleHooks.GRAD_SAMPLERS[nn.Linear] is compute_linear_grad_sample
    ig_opacus.install()
    ig_opacus.install()  # idempotent
    assert GradSampleHooks.GRAD_SAMPLERS[nn.Linear] is ig_opacus.linear_grad_sample
    assert GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Linear] is ig_opacus.linear_norm_sample
    ig_opacus.uninstall()
    assert GradSampleHooks.GRAD_SAMPLERS[nn.Linear] is compute_linear_grad_sample
    assert GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Linear] is not ig_opacus.linear_norm_sample
    with ig_opacus.installed():
        assert ig_opacus.is_installed()
    assert not ig_opacus.is_installed()


def test_missing_opacus_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ig_opacus, "_IMPORT_ERROR", ImportError("No module named 'opacus'"))
    with pytest.raises(ImportError, match=r"needs Opacus: pip install 'opacus>=1\.5'"):
        ig_opacus.install()


def test_the_package_does_not_import_opacus():
    code = "import sys, indivgrad_cuda; assert 'opacus' not in sys.modules, 'opacus was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("model", ["mlp", "sequence"])
def test_dp_sgd_example_runs(device, model, tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "bench" / "dp_sgd_digits.py"),
            "--epochs",
            "1",
            "--device",
            device,
            "--model",
            model,
            "--quiet",
            "--results-dir",
            str(tmp_path),  # not bench/results
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""  # no progress bar with --quiet, and Opacus's known warnings silenced
    assert "max relative difference" in proc.stdout and "opacus + indivgrad backend" in proc.stdout
    eps = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith(("  opacus", "  indivgrad engine"))]
    assert len(eps) == 3 and len(set(eps)) == 1  # the same epsilon for the same noise, sampling and steps
