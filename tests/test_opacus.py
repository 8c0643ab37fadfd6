"""The Opacus backend: the same per-sample gradients and ghost norms as Opacus's own
samplers and as float64 torch.func references, with our samplers really in use; whole
PrivacyEngine steps the same with and without it; empty batches; on CPU and, where a GPU
is usable, with the model and data on CUDA. (Opacus's own tests of these layers run with
the backend installed in test_opacus_suite.py.)"""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

opacus = pytest.importorskip("opacus", reason="Opacus is not installed (pip install -e .[opacus])")
from opacus import GradSampleModule, PrivacyEngine  # noqa: E402
from opacus.grad_sample import GradSampleHooks, GradSampleModuleFastGradientClipping  # noqa: E402
from opacus.grad_sample.conv import compute_conv_grad_sample  # noqa: E402
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample  # noqa: E402
from opacus.grad_sample.instance_norm import compute_instance_norm_grad_sample  # noqa: E402
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import indivgrad_cuda.opacus as ig_opacus  # noqa: E402
from indivgrad_cuda.layers import conv as conv_layers  # noqa: E402


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
    grad_before = dict(GradSampleHooks.GRAD_SAMPLERS)
    norm_before = dict(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
    assert nn.Conv2d not in norm_before  # Opacus has no norm sampler for convolutions: ours is added, then removed
    ig_opacus.install()
    ig_opacus.install()  # idempotent
    for module_type, (grad_sampler, norm_sampler) in ig_opacus.SAMPLERS.items():
        assert GradSampleHooks.GRAD_SAMPLERS[module_type] is grad_sampler
        assert GradSampleModule.GRAD_SAMPLERS[module_type] is grad_sampler  # the tables the subclasses share
        if norm_sampler is not None:
            assert GradSampleModuleFastGradientClipping.NORM_SAMPLERS[module_type] is norm_sampler
        else:
            assert GradSampleModuleFastGradientClipping.NORM_SAMPLERS.get(module_type) is norm_before.get(module_type)
    assert {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm3d} <= set(
        ig_opacus.SAMPLERS
    )
    ig_opacus.uninstall()
    ig_opacus.uninstall()  # idempotent
    assert grad_before == GradSampleHooks.GRAD_SAMPLERS
    assert norm_before == GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    assert GradSampleHooks.GRAD_SAMPLERS[nn.Conv2d] is compute_conv_grad_sample
    assert GradSampleHooks.GRAD_SAMPLERS[nn.GroupNorm] is compute_group_norm_grad_sample
    with ig_opacus.installed():
        assert ig_opacus.is_installed()
        with ig_opacus.installed():  # nested: the outer block's stays
            pass
        assert GradSampleHooks.GRAD_SAMPLERS[nn.Conv3d] is ig_opacus.conv_grad_sample
    assert not ig_opacus.is_installed()
    assert grad_before == GradSampleHooks.GRAD_SAMPLERS


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


# ---------------------------------------------------------------- convolutions, GroupNorm, InstanceNorm


@pytest.fixture
def served(monkeypatch):
    """Counts the calls of each of our samplers ("Conv2d.grad", "Linear.norm", ...): wraps the
    entries of the backend's table, which install() then registers."""
    count = {}

    def counting(fn, key):
        def sampler(*args, **kwargs):
            count[key] = count.get(key, 0) + 1
            return fn(*args, **kwargs)

        return sampler

    for module_type, (grad_sampler, norm_sampler) in list(ig_opacus.SAMPLERS.items()):
        name = module_type.__name__
        wrapped = (counting(grad_sampler, f"{name}.grad"), norm_sampler and counting(norm_sampler, f"{name}.norm"))
        monkeypatch.setitem(ig_opacus.SAMPLERS, module_type, wrapped)
    return count


def reference(layer, x, gout):
    """Per-sample gradients {attr: [N, *shape]} of sum(layer(x_n) * gout_n), by torch.func."""
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in layer.named_parameters() if not v.requires_grad}

    def loss(p, xn, gn):
        return (functional_call(layer, {**p, **frozen}, (xn[None],))[0] * gn).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, gout)


def by_name(layer, out):
    names = {p: k for k, p in layer.named_parameters()}
    return {names[p]: v for p, v in out.items()}


# (conv type, constructor kwargs, input spatial size): every option, in 1, 2 and 3 dims
GHOST = (nn.Conv1d, dict(in_channels=16, out_channels=24, kernel_size=3, stride=3), (9,))  # 3 positions: the ghost norm
# 256 positions, 32 x 32 channels: the sizes at which the per-sample gradients are formed by a grouped convolution
GROUPED = (nn.Conv2d, dict(in_channels=32, out_channels=32, kernel_size=3, padding=1), (16, 16))
CONVS = [
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3), (11,)),
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2), (12,)),
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", dilation=2), (10,)),
    (nn.Conv1d, dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, bias=False), (9,)),
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, padding_mode="circular"), (9,)),
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"), (9,)),
    GHOST,
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)), (9, 8)),
    (nn.Conv2d, dict(in_channels=16, out_channels=16, kernel_size=3, stride=2, groups=2), (5, 5)),  # ghost
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(2, 4), padding="same"), (7, 8)),  # asymmetric
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid", dilation=(2, 1)), (9, 8)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, groups=2, bias=False), (9, 9)),
    (nn.Conv2d, dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4), (6, 7)),  # depthwise
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"), (6, 7)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=2, padding=(1, 2), padding_mode="replicate"), (5, 6)),
    (
        nn.Conv2d,
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, padding_mode="circular", groups=2),
        (6, 5),
    ),
    GROUPED,
    (nn.Conv3d, dict(in_channels=2, out_channels=4, kernel_size=2), (4, 5, 4)),
    (
        nn.Conv3d,
        dict(
            in_channels=2,
            out_channels=4,
            kernel_size=(1, 2, 3),
            stride=(1, 2, 3),
            padding=(1, 2, 3),
            dilation=(1, 2, 2),
            groups=2,
        ),
        (5, 7, 6),
    ),
    (nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", bias=False), (4, 4, 5)),
    (
        nn.Conv3d,
        dict(in_channels=2, out_channels=4, kernel_size=2, padding=1, padding_mode="circular", groups=2),
        (3, 4, 4),
    ),
]
CONV_IDS = [
    f"{cls.__name__}-" + "-".join(f"{k}={v}" for k, v in kw.items() if k not in ("in_channels", "out_channels"))
    for cls, kw, _ in CONVS
]


def make_conv(case, device, n=3):
    cls, kwargs, size = case
    layer = cls(**kwargs).double().to(device)
    x = torch.randn(n, kwargs["in_channels"], *size, dtype=torch.float64, device=device)
    gout = torch.randn_like(layer(x))
    return layer, x, gout


@pytest.mark.parametrize("method", conv_layers.GRAD_FORMS)  # the rule's forms of per-sample gradients
@pytest.mark.parametrize("case", CONVS, ids=CONV_IDS)
def test_conv_grad_samples_match_reference_and_opacus(case, method, device, monkeypatch):
    monkeypatch.setattr(conv_layers.ConvRule, "grad_method", method)
    layer, x, gout = make_conv(case, device)
    ours = by_name(layer, ig_opacus.conv_grad_sample(layer, [x], gout))
    ref = reference(layer, x, gout)
    assert_same(ours, ref)
    if layer.padding_mode == "zeros":  # Opacus's own sampler pads with zeros whatever the padding_mode
        assert_same(ours, by_name(layer, compute_conv_grad_sample(layer, [x], gout)))


def test_opacus_conv_sampler_ignores_padding_mode_ours_does_not():
    """Why the comparison with Opacus's sampler is limited to zero padding: Opacus's pads with zeros."""
    layer, x, gout = make_conv(next(c for c in CONVS if c[1].get("padding_mode") == "reflect"), "cpu")
    ref = reference(layer, x, gout)["weight"]
    torch.testing.assert_close(ig_opacus.conv_grad_sample(layer, [x], gout)[layer.weight], ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(compute_conv_grad_sample(layer, [x], gout)[layer.weight], ref)


@pytest.mark.parametrize("case", CONVS, ids=CONV_IDS)
def test_conv_norm_samples_match_reference(case, device):
    layer, x, gout = make_conv(case, device)
    ours = by_name(layer, ig_opacus.conv_norm_sample(layer, [x], gout))
    ref = {k: g.flatten(1).norm(dim=1) for k, g in reference(layer, x, gout).items()}
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == torch.float64
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-10, atol=1e-12)


def test_conv_norms_take_the_ghost_and_the_direct_form():
    """Both forms of the rule's weight norm are among the cases above: the ghost norm for few
    positions, the per-sample gradients' for many."""
    from indivgrad_cuda import ops

    picks = set()
    for cls, kwargs, size in CONVS:
        layer = cls(**kwargs)
        geo = conv_layers._Geometry(layer, torch.empty(1, kwargs["in_channels"], *size))
        picks.add(ops.linear_norm_uses_ghost(geo.t, geo.d_in, geo.d_out))
    assert picks == {True, False}
    for n in (1, 2, 5):  # and the ghost norm with several samples is per sample (the Grams' blocks)
        layer, x, gout = make_conv(GHOST, "cpu", n=n)
        ref = reference(layer, x, gout)["weight"].flatten(1).norm(dim=1)
        torch.testing.assert_close(ig_opacus.conv_norm_sample(layer, [x], gout)[layer.weight], ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CONVS[0], GHOST, GROUPED], ids=["unfold", "ghost", "grouped"])
def test_conv_samplers_with_half_backprops(case, dtype):
    """Opacus under autocast: float32 weights and input, half backprops. The gradients come in
    the backprops' dtype (as Opacus's own), the norms too, reduced in float32."""
    layer, x, gout = make_conv(case, "cpu")
    g = gout.to(dtype)
    ref = reference(layer, x, g.double())
    layer, x = layer.float(), x.float()
    tol = 3e-2 if dtype == torch.bfloat16 else 3e-3
    grads = by_name(layer, ig_opacus.conv_grad_sample(layer, [x], g))
    norms = by_name(layer, ig_opacus.conv_norm_sample(layer, [x], g))
    for k, r in ref.items():
        assert grads[k].dtype == norms[k].dtype == dtype
        torch.testing.assert_close(grads[k].double(), r, rtol=tol, atol=tol * r.abs().max().item())
        torch.testing.assert_close(norms[k].double(), r.flatten(1).norm(dim=1), rtol=tol, atol=0)


def test_frozen_parameters_get_no_samples():
    layer, x, gout = make_conv(CONVS[0], "cpu")
    layer.bias.requires_grad_(False)
    assert set(ig_opacus.conv_grad_sample(layer, [x], gout)) == {layer.weight}
    assert set(ig_opacus.conv_norm_sample(layer, [x], gout)) == {layer.weight}
    layer.weight.requires_grad_(False)
    assert ig_opacus.conv_grad_sample(layer, [x], gout) == {} == ig_opacus.conv_norm_sample(layer, [x], gout)
    gn = nn.GroupNorm(2, 4).double()
    gn.weight.requires_grad_(False)
    xg = torch.randn(3, 4, 5, dtype=torch.float64)
    assert set(ig_opacus.group_norm_grad_sample(gn, [xg], torch.randn_like(xg))) == {gn.bias}


NORMS = [
    (nn.GroupNorm(1, 6), (6, 5)),
    (nn.GroupNorm(3, 6), (4, 5)),
    (nn.GroupNorm(6, 6), (7,)),
    (nn.GroupNorm(2, 4, eps=1e-3), (3, 4, 2)),
    (nn.InstanceNorm1d(5, affine=True), (9,)),
    (nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (5, 6)),  # train mode: each sample's own statistics
    (nn.InstanceNorm3d(2, affine=True, eps=1e-3), (3, 4, 5)),
]
NORM_IDS = [f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(NORMS)]


@pytest.mark.parametrize("case", NORMS, ids=NORM_IDS)
def test_norm_layer_grad_samples_match_reference_and_opacus(case, device):
    layer, size = copy.deepcopy(case[0]).double().to(device), case[1]
    with torch.no_grad():  # not the identity affine map
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(4, layer.weight.shape[0], *size, dtype=torch.float64, device=device)
    gout = torch.randn_like(x)
    ours = ig_opacus.SAMPLERS[type(layer)][0](layer, [x], gout)
    theirs = (compute_group_norm_grad_sample if isinstance(layer, nn.GroupNorm) else compute_instance_norm_grad_sample)(
        layer, [x], gout
    )
    assert_same(by_name(layer, ours), by_name(layer, theirs))
    if not getattr(layer, "track_running_stats", False):  # functional_call would update the running statistics
        assert_same(by_name(layer, ours), reference(layer, x, gout))


def small_cnn(instance_norms=True):
    """Every layer type the backend serves, in one model Opacus accepts (no BatchNorm); without
    the InstanceNorms (torch's affine InstanceNorm refuses an empty batch), Identity in their place."""
    norm = (lambda m: m) if instance_norms else (lambda m: nn.Identity())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.gn = nn.GroupNorm(4, 8)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
            self.in2 = norm(nn.InstanceNorm2d(8, affine=True))
            self.conv1d = nn.Conv1d(8, 6, 3, padding="same")
            self.in1 = norm(nn.InstanceNorm1d(6, affine=True))
            self.conv3d = nn.Conv3d(1, 2, 2)
            self.in3 = norm(nn.InstanceNorm3d(2, affine=True))
            self.fc = nn.Linear(6 * 16 + 2 * 27, 5)

        def forward(self, x):
            h = torch.relu(self.gn(self.conv1(x)))
            h = torch.relu(self.in2(self.conv2(h)))  # [N, 8, 4, 4]
            h = torch.tanh(self.in1(self.conv1d(h.flatten(2))))  # [N, 6, 16]
            v = self.in3(self.conv3d(x[:, :1, :4, :4, None].expand(-1, -1, -1, -1, 4)))  # [N, 2, 3, 3, 3]
            return self.fc(torch.cat([h.flatten(1), v.flatten(1)], 1))

    return Net()


def dp_steps(model, x, y, device, mode, backend, steps=2, autocast=None):
    """Two DP-SGD steps through PrivacyEngine (clipping active, noise from a seeded generator);
    ``autocast``: the forward under torch.autocast to that dtype (mixed precision)."""
    model = copy.deepcopy(model)
    with ig_opacus.installed() if backend else _nothing():
        engine = PrivacyEngine()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        common = dict(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=0.3,
            max_grad_norm=0.05,  # below every sample's gradient norm: every sample is clipped
            poisson_sampling=False,
            noise_generator=torch.Generator(device=device).manual_seed(1),
            grad_sample_mode=mode,
        )
        if mode == "ghost":
            private, optimizer, criterion, loader = engine.make_private(criterion=nn.CrossEntropyLoss(), **common)
        else:
            private, optimizer, loader = engine.make_private(**common)
            criterion = nn.CrossEntropyLoss()
        for _ in range(steps):
            for xb, yb in loader:
                optimizer.zero_grad()
                with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
                    out = private(xb)
                criterion(out.float(), yb).backward()
                optimizer.step()
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        private._close() if hasattr(private, "_close") else None
    return params


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_privacy_engine_steps_are_the_same_with_the_backend(mode, served, device):
    model = small_cnn().double().to(device)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, device=device)
    y = torch.randint(0, 5, (6,), device=device)
    ours = dp_steps(model, x, y, device, mode, backend=True)
    expected = {
        "hooks": {"Conv1d.grad", "Conv2d.grad", "Conv3d.grad", "GroupNorm.grad", "InstanceNorm1d.grad"},
        "ghost": {"Conv1d.norm", "Conv2d.norm", "Conv3d.norm", "Linear.norm", "GroupNorm.grad", "InstanceNorm3d.grad"},
    }[mode]
    assert expected <= set(served), served
    if mode == "ghost":  # ghost clipping takes the norms, never the per-sample gradients, of what has a norm sampler
        assert not {"Conv1d.grad", "Conv2d.grad", "Conv3d.grad", "Linear.grad"} & set(served)
    theirs = dp_steps(model, x, y, device, mode, backend=False)
    start = dict(model.named_parameters())
    for k in theirs:
        assert not torch.equal(theirs[k], start[k])  # the step moved every parameter
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_privacy_engine_steps_under_autocast(mode, served, device):
    """Mixed precision (float32 weights, bfloat16 convolutions and Linear layers, so half
    backprops): the same step within bfloat16's rounding (ours reduce the norms in float32)."""
    model = small_cnn().to(device)
    x, y = torch.randn(6, 3, 8, 8, device=device), torch.randint(0, 5, (6,), device=device)
    ours = dp_steps(model, x, y, device, mode, backend=True, autocast=torch.bfloat16)
    assert {"Conv2d.norm", "Linear.norm"} <= set(served) if mode == "ghost" else {"Conv2d.grad"} <= set(served)
    theirs = dp_steps(model, x, y, device, mode, backend=False, autocast=torch.bfloat16)
    start = dict(model.named_parameters())
    step = max((theirs[k] - start[k]).abs().max().item() for k in theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=2e-2 * step, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------- empty batches


def empty_inputs():
    """(layer, input) with N = 0 for every type we serve (and Linear with sequence dims)."""
    return [
        (nn.Linear(5, 3), (0, 5)),
        (nn.Linear(5, 3), (0, 4, 5)),
        (nn.Linear(5, 3), (0, 2, 3, 5)),
        (nn.Conv1d(4, 6, 3, padding=1), (0, 4, 7)),
        (nn.Conv2d(4, 6, 3, groups=2, padding_mode="reflect", padding=1), (0, 4, 6, 6)),
        (nn.Conv3d(2, 4, 2), (0, 2, 3, 3, 3)),
        (nn.GroupNorm(2, 4), (0, 4, 5, 5)),
        (nn.InstanceNorm1d(4, affine=True), (0, 4, 6)),
        (nn.InstanceNorm2d(4, affine=True), (0, 4, 3, 3)),
        (nn.InstanceNorm3d(4, affine=True), (0, 4, 2, 3, 3)),
    ]


@pytest.mark.parametrize("case", range(len(empty_inputs())))
def test_empty_batch_samplers(case, device):
    layer, shape = empty_inputs()[case]
    layer = layer.double().to(device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    # torch's own affine InstanceNorm refuses an empty batch in its forward; its sampler takes one all the same
    gout = torch.randn(x.shape if "InstanceNorm" in type(layer).__name__ else layer(x).shape).to(x)
    grad_sampler, norm_sampler = ig_opacus.SAMPLERS[type(layer)]
    grads = grad_sampler(layer, [x], gout)
    assert {p: tuple(g.shape) for p, g in grads.items()} == {p: (0, *p.shape) for p in layer.parameters()}
    if norm_sampler is not None:
        norms = norm_sampler(layer, [x], gout)
        assert {p: tuple(v.shape) for p, v in norms.items()} == dict.fromkeys(layer.parameters(), (0,))


@pytest.mark.parametrize("batch_first", [True, False])
def test_empty_batch_through_grad_sample_module(batch_first, served, device):
    model = small_cnn(instance_norms=False).double().to(device)
    x = torch.randn(0, 3, 8, 8, dtype=torch.float64, device=device)
    y = torch.randn(0, 5, dtype=torch.float64, device=device)
    ours = grad_samples(model, x, y, "sum", backend=True)
    assert {"Conv1d.grad", "Conv2d.grad", "Conv3d.grad", "GroupNorm.grad", "Linear.grad"} <= set(served)
    theirs = grad_samples(model, x, y, "sum", backend=False)
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].shape == theirs[k].shape == (0, *dict(model.named_parameters())[k].shape)
    # sequences: [0, T, D], or [T, 0, D] with the batch second (the case of Opacus's test_input_bias)
    lin = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double().to(device)
    shape = (0, 3, 6) if batch_first else (3, 0, 6)
    xs = torch.randn(*shape, dtype=torch.float64, device=device)
    ys = torch.randn(*shape[:-1], 2, dtype=torch.float64, device=device)
    ours = grad_samples(lin, xs, ys, "sum", backend=True, batch_first=batch_first)
    theirs = grad_samples(lin, xs, ys, "sum", backend=False, batch_first=batch_first)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ours["0.weight"].shape == (0, 5, 6)


def test_empty_batch_ghost_norms():
    lin = nn.Linear(5, 3).double()
    for shape in [(0, 5), (0, 4, 5), (0, 2, 3, 5)]:
        x = torch.randn(shape, dtype=torch.float64)
        g = torch.randn(*shape[:-1], 3, dtype=torch.float64)
        ours = ig_opacus.linear_norm_sample(lin, [x], g)
        assert all(v.shape == (0,) for v in ours.values())
        if len(shape) < 4:  # Opacus's own takes 2-D and 3-D backprops only
            assert {p: v.shape for p, v in compute_linear_norm_sample(lin, [x], g).items()} == {
                p: v.shape for p, v in ours.items()
            }
