"""Results that must not depend on how the engine runs: chunking with Dropout and DP-SGD
noise, the automatic chunk budget, and autocast. References: torch.func with the masks
tests/reference.py draws from the same seed, in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indivgrad_cuda as ig
from indivgrad_cuda import chunking
from tests.conftest import TOL
from tests.reference import clipped_sum_ref, dropout_masks, func_per_sample_grads

N = 11
SEED = 1234


def dropout_mlp(device):
    model = nn.Sequential(
        nn.Dropout(0.25),
        nn.Linear(6, 9),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(9, 7, bias=False),
        nn.Dropout(0.3),
        nn.GELU(),
        nn.Linear(7, 3),
    )
    return model.double().to(device).train()


def generator(device):
    return torch.Generator(device).manual_seed(SEED)


def noise_ref(model, x, device, std):
    """The noise the engine adds: drawn after the masks from the same generator, one draw
    per parameter in named_parameters() order."""
    gen = generator(device)
    dropout_masks(model, x, gen)
    params = dict(model.named_parameters())
    return {n: torch.normal(0.0, std, p.shape, generator=gen, dtype=p.dtype, device=device) for n, p in params.items()}


@pytest.mark.parametrize("chunk", [1, 3, N])
def test_dropout_and_noise_do_not_depend_on_chunking(device, chunk):
    model = dropout_mlp(device)
    x = torch.randn(N, 6, dtype=torch.float64, device=device)
    t = torch.randn(N, 3, dtype=torch.float64, device=device)
    masks = dropout_masks(model, x, generator(device))
    assert all((m == 0).any() and (m != 0).any() for m in masks)
    ref = func_per_sample_grads(model, x, t, F.mse_loss, masks)
    whole = ig.PerSampleGrads(model)  # N samples fit one chunk
    engine = ig.PerSampleGrads(model, max_chunk=chunk)

    got = {k: v.clone() for k, v in engine(x, t, F.mse_loss, generator=generator(device)).items()}
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **TOL[torch.float64], msg=name)
    for name, g in whole(x, t, F.mse_loss, generator=generator(device)).items():
        torch.testing.assert_close(got[name], g, **TOL[torch.float64], msg=name)

    ref_sum, ref_norms = clipped_sum_ref(ref, 1.0)
    norms, per_param = engine.norms(x, t, F.mse_loss, per_param=True, generator=generator(device))
    torch.testing.assert_close(norms, ref_norms, **TOL[torch.float64])
    for name in ref:
        torch.testing.assert_close(per_param[name], ref[name].flatten(1).norm(dim=1), **TOL[torch.float64], msg=name)

    max_norm = ref_norms.median().item()  # both branches of min(1, max_norm / norm)
    ref_sum, _ = clipped_sum_ref(ref, max_norm)
    noise = noise_ref(model, x, device, std=0.7 * max_norm)
    norms = engine.clipped_grad_sum(x, t, F.mse_loss, max_norm, noise_multiplier=0.7, generator=generator(device))
    torch.testing.assert_close(norms, ref_norms, **TOL[torch.float64])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_sum[name] + noise[name], **TOL[torch.float64], msg=name)
        assert (p.grad - ref_sum[name]).abs().max() > 0.1 * max_norm  # the noise is there


def test_dropout_before_flatten_gets_the_reference_masks(device):
    model = (
        nn.Sequential(nn.Dropout(0.3), nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 2))
        .double()
        .to(device)
        .train()
    )
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64, device=device)
    t = torch.randn(10, 2, dtype=torch.float64, device=device)
    masks = dropout_masks(model, x, generator(device))
    ref = func_per_sample_grads(model, x, t, F.mse_loss, masks)
    got = ig.PerSampleGrads(model, max_chunk=4)(x, t, F.mse_loss, generator=generator(device))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **TOL[torch.float64], msg=name)


def test_chunk_budget_counts_memory_the_allocator_holds_unused(monkeypatch):
    gib = 1 << 30
    asked = []

    def query(value):
        def f(device=None):
            asked.append(device)
            return value

        return f

    monkeypatch.setattr(torch.cuda, "mem_get_info", query((2 * gib, 80 * gib)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", query(30 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", query(6 * gib))
    dev = torch.device("cuda", 1)
    budget = (2 + 30 - 6) * gib // 4
    assert chunking.chunk_budget(dev) == budget
    assert asked == [dev, dev, dev]
    per_sample = 4000
    assert chunking.chunk_size(10**7, per_sample, dev) == budget // per_sample
    assert chunking.chunk_size(1000, per_sample, dev) == 1000  # small: no query
    assert chunking.chunk_size(10**7, per_sample, dev, max_chunk=7) == 7
    asked.clear()
    assert chunking.chunk_budget(torch.device("cpu")) == chunking.CPU_CHUNK_BUDGET
    assert chunking.chunk_size(10**7, 1024, torch.device("cpu")) == chunking.CPU_CHUNK_BUDGET // 1024
    assert asked == []  # no CUDA query for a CPU batch


def test_autocast_reaches_loss_fn_and_chunking_changes_nothing():
    """Under the caller's autocast the MLP takes the hooks capture (the native one does not
    run under autocast), loss_fn runs under it, and chunks give the unchunked results (the
    precision itself: tests/test_mixed_precision.py)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, t = torch.randn(12, 8), torch.randn(12, 4)
    in_autocast = []

    def loss(out, target):  # runs in the caller's context
        in_autocast.append(torch.is_autocast_enabled("cpu"))
        return F.mse_loss(out, target)

    def run(engine):
        grads = {k: v.clone() for k, v in engine(x, t, loss).items()}
        norms = engine.norms(x, t, loss)
        clipped_norms = engine.clipped_grad_sum(x, t, loss, 0.5)
        return grads, norms, clipped_norms, [p.grad.clone() for p in model.parameters()]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ig.PerSampleGrads(model)._native.applies(x)
        chunked = run(ig.PerSampleGrads(model, max_chunk=5))
        assert in_autocast == [True] * 9  # 3 chunks x 3 calls
        whole = run(ig.PerSampleGrads(model))
    close = dict(rtol=1e-5, atol=1e-6)
    for name in whole[0]:
        assert chunked[0][name].dtype == torch.float32
        torch.testing.assert_close(chunked[0][name], whole[0][name], **close)
    torch.testing.assert_close(chunked[1], whole[1], **close)
    torch.testing.assert_close(chunked[2], whole[2], **close)
    for a, b in zip(chunked[3], whole[3]):
        torch.testing.assert_close(a, b, **close)
