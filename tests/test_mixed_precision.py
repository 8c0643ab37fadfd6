"""Mixed precision: the engine under the caller's ``torch.autocast`` (CPU bfloat16 here, CUDA
bfloat16/float16 with the ``cuda`` marker).

Low-precision results are judged as flash-attention judges its own: against a float64
reference (the model in float64, torch.func per sample), relative to the error autocast's
own gradients make on the same inputs, ``err(engine) <= K * err(autocast) + TINY`` per
parameter, where autocast's own are the plain autocast step's summed ``.grad`` (for sums)
and a loop of autocast steps on one sample each (for per-sample gradients, their norms and
their clipped sum).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indivgrad_cuda
from tests.models import TinyEncoder, opacus_cifar_cnn, token_batch
from tests.reference import clipped_sum_ref, func_module_grads, loop_module_grads

K = 3.0  # the engine's error may be this many times autocast's own
TINY = 1e-5  # relative: float32 rounding, where autocast's own error is (nearly) zero
HUGE = 1e30  # a clipping threshold no sample reaches

CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.cuda),
]


class Scaled(nn.Module):
    """No rule serves it: the per-module fallback (torch.func), whose matmul autocast casts."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):
        return x @ self.w


def conv_group_norm():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def _case(name, device, gen):
    """(model, inputs, target, classes) on device, fresh seeded data."""
    n = 8
    if name == "encoder":
        model = TinyEncoder(vocab=50, d_model=16, heads=2, layers=2, classes=4)
        ids, mask, y = token_batch(n, 12, 50, 4, generator=gen)
        inputs = (ids.to(device), mask.to(device))
    elif name == "cnn":
        model = opacus_cifar_cnn(classes=10)
        inputs = torch.randn(n, 3, 16, 16, generator=gen).to(device)
        y = torch.randint(0, 10, (n,), generator=gen)
    elif name == "conv_gn":
        model = conv_group_norm()
        inputs = torch.randn(n, 3, 10, 10, generator=gen).to(device)
        y = torch.randint(0, 5, (n,), generator=gen)
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6))
        inputs = torch.randn(n, 20, generator=gen).to(device)
        y = torch.randint(0, 6, (n,), generator=gen)
    else:  # fallback
        model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), Scaled(16), nn.LayerNorm(16), nn.Linear(16, 3))
        inputs = torch.randn(n, 12, generator=gen).to(device)
        y = torch.randint(0, 3, (n,), generator=gen)
    return model.to(device), inputs, y.to(device)


def _double(inputs):
    if isinstance(inputs, tuple):
        return tuple(_double(t) for t in inputs)
    return inputs.double() if inputs.is_floating_point() else inputs


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def _judge(what, got, ref, base):
    """Per parameter: the engine's relative error within K times autocast's own (+ TINY)."""
    for name in ref:
        err, err_autocast = _rel(got[name], ref[name]), _rel(base[name], ref[name])
        assert err <= K * err_autocast + TINY, (
            f"{what} '{name}': relative error {err:.3g}, autocast's own {err_autocast:.3g}"
        )


def _sum_loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("model_name", ["encoder", "cnn", "conv_gn", "mlp", "fallback"])
@pytest.mark.parametrize("device, dtype", CASES)
def test_autocast_matches_float64_as_closely_as_autocast(model_name, device, dtype):
    gen = torch.Generator().manual_seed(1234)
    model, inputs, y = _case(model_name, device, gen)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    n = y.shape[0]
    engine = indivgrad_cuda.PerSampleGrads(model)
    autocast = torch.autocast(device, dtype=dtype)

    # float64 references: per-sample gradients, their norms, clipped sum and sum
    model64 = copy.deepcopy(model).double()
    ref = {k: v.detach() for k, v in func_module_grads(model64, _double(inputs), y, F.cross_entropy).items()}
    ref_norms = torch.stack([g.flatten(1).norm(dim=1) for g in ref.values()]).norm(dim=0)
    max_norm = ref_norms.median().item()  # about half the samples are clipped
    ref_clipped, _ = clipped_sum_ref(ref, max_norm)
    ref_sum = {k: v.sum(0) for k, v in ref.items()}

    # autocast's own: a loop of one-sample steps (per sample) and the plain batch step (sum)
    with autocast:
        loop = loop_module_grads(model, inputs, y, F.cross_entropy)
    loop_norms = torch.stack([g.double().flatten(1).norm(dim=1) for g in loop.values()]).norm(dim=0)
    loop_clipped, _ = clipped_sum_ref(loop, max_norm)
    model.zero_grad(set_to_none=True)
    seen = {}
    with autocast:
        out_step = model(*args)
        loss = _sum_loss(out_step, y)
    loss.backward()
    step = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    def loss_fn(out, t):
        seen["out"] = out.detach().clone()
        return F.cross_entropy(out, t)

    with autocast:
        grads = engine(inputs, y, loss_fn)
        grads = {k: v.clone() for k, v in grads.items()}
        # the forward is a plain autocast forward: same ops, same dtypes, same values
        assert seen["out"].dtype == out_step.dtype
        assert torch.equal(seen["out"], out_step.detach())
        grads_low = engine(inputs, y, F.cross_entropy, out_dtype=dtype)
        norms = engine.norms(inputs, y, F.cross_entropy)
        engine.clipped_grad_sum(inputs, y, F.cross_entropy, max_norm)
        clipped = {k: p.grad.clone() for k, p in model.named_parameters()}
        engine.clipped_grad_sum(inputs, y, _sum_loss, HUGE, reduction="sum")
        summed = {k: p.grad.clone() for k, p in model.named_parameters()}

    params = dict(model.named_parameters())
    for k, g in grads.items():
        assert g.dtype == params[k].dtype and grads_low[k].dtype == dtype
        assert clipped[k].dtype == summed[k].dtype == params[k].dtype
    assert norms.dtype == torch.float32

    _judge("per-sample gradients", grads, ref, loop)
    _judge("per-sample gradients in out_dtype", grads_low, ref, loop)
    _judge("sum of the per-sample gradients", {k: v.sum(0) for k, v in grads.items()}, ref_sum, step)
    _judge("norms", {"norms": norms}, {"norms": ref_norms}, {"norms": loop_norms})
    _judge("clipped sum", clipped, ref_clipped, loop_clipped)
    # with no sample clipped and the same reduction, the clipped sum is the autocast step's gradient
    _judge("clipped sum (no clipping)", summed, ref_sum, step)
    for k in summed:
        diff = _rel(summed[k], step[k].double())
        assert diff <= (K + 1) * _rel(step[k], ref_sum[k]) + TINY, f"'{k}': {diff:.3g} from the autocast step's"
    assert n == norms.shape[0]


@pytest.mark.parametrize("device, dtype", CASES)
def test_mlp_under_autocast_takes_the_hooks_capture(device, dtype):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    x, y = torch.randn(5, 6, device=device), torch.randint(0, 3, (5,), device=device)
    auto = indivgrad_cuda.PerSampleGrads(model)
    assert auto._native is not None and auto._native.applies(x)
    with torch.autocast(device, dtype=dtype):
        assert not auto._native.applies(x)  # the hooks capture runs the autocast forward
        got = auto(x, y, F.cross_entropy)
        forced = indivgrad_cuda.PerSampleGrads(model, capture="native")
        with pytest.raises(ValueError, match=r"capture='native' does not run under torch\.autocast"):
            forced(x, y, F.cross_entropy)
    assert all(g.dtype == torch.float32 for g in got.values())


def test_out_dtype():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    full = {k: v.clone() for k, v in indivgrad_cuda.per_sample_grads(model, x, y, F.cross_entropy).items()}
    for capture in ("auto", "hooks"):
        low = indivgrad_cuda.per_sample_grads(model, x, y, F.cross_entropy, capture=capture, out_dtype=torch.bfloat16)
        for k, v in low.items():
            assert v.dtype == torch.bfloat16
            torch.testing.assert_close(v.float(), full[k], rtol=2e-2, atol=1e-4)
    with pytest.raises(ValueError, match="capture='native'"):
        indivgrad_cuda.per_sample_grads(model, x, y, F.cross_entropy, capture="native", out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        indivgrad_cuda.per_sample_grads(model, x, y, F.cross_entropy, out_dtype=torch.int32)
    engine = indivgrad_cuda.PerSampleGrads(model)
    with pytest.raises(TypeError, match="out_dtype"):
        engine(x, y, F.cross_entropy, out={"0.weight": torch.empty(5, 8, 6)}, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("device, dtype", CASES)
def test_engine_arithmetic_runs_without_autocast(device, dtype):
    """Norms and clipped sums are reductions of the per-sample gradients the factors give,
    computed in float32: under autocast (which the backward runs in) they must still agree
    with those gradients to float32 rounding, not to autocast's."""
    gen = torch.Generator().manual_seed(5)
    model, inputs, y = _case("encoder", device, gen)
    engine = indivgrad_cuda.PerSampleGrads(model)
    with torch.autocast(device, dtype=dtype):
        grads = {k: v.double() for k, v in engine(inputs, y, F.cross_entropy).items()}
        norms = engine.norms(inputs, y, F.cross_entropy)
        max_norm = norms.median().item()
        engine.clipped_grad_sum(inputs, y, F.cross_entropy, max_norm)
    want_sum, want_norms = clipped_sum_ref(grads, max_norm)
    torch.testing.assert_close(norms.double(), want_norms, rtol=1e-5, atol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), want_sum[k], rtol=1e-4, atol=1e-6 * want_sum[k].abs().max().item())
