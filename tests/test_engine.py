"""PerSampleGrads against torch.func (vmap(grad)) in float64 on random MLPs."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indivgrad_cuda as ig
from tests.conftest import TOL
from tests.reference import clipped_sum_ref, dropout_masks, func_per_sample_grads

ACT_MODULES = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.3),
    "elu": lambda: nn.ELU(0.8),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=5.0),
    "identity": nn.Identity,
}


def random_mlp(rng, depth, d_in, d_out, activation, bias=True):
    widths = [d_in] + [rng.choice([1, 2, 3, 7, 16, 33]) for _ in range(depth - 1)] + [d_out]
    layers = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias if not isinstance(bias, list) else bias[i]))
        if i < depth - 1:
            layers.append(ACT_MODULES[activation]())
    return nn.Sequential(*layers)


def assert_grads_close(got, ref, tol=TOL[torch.float64], layout="out_in"):
    assert set(got) == set(ref)
    for name in ref:
        g = got[name]
        if layout == "in_out" and name.endswith("weight"):
            g = g.transpose(1, 2)
        torch.testing.assert_close(g.double(), ref[name].double(), **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("activation", list(ACT_MODULES))
@pytest.mark.parametrize("depth", [1, 2, 4, 6])
def test_matches_torch_func(device, activation, depth):
    rng = random.Random(hash((activation, depth)) % 1000)
    model = random_mlp(rng, depth, 5, 3, activation, bias=[rng.random() < 0.7 for _ in range(depth)])
    model = model.double().to(device)
    x = torch.randn(9, 5, dtype=torch.float64, device=device)
    target = torch.randn(9, 3, dtype=torch.float64, device=device)
    ref = func_per_sample_grads(model, x, target, F.mse_loss)
    engine = ig.PerSampleGrads(model)
    assert_grads_close(engine(x, target, F.mse_loss), ref)
    assert_grads_close(engine(x, target, F.mse_loss, layout="in_out"), ref, layout="in_out")


def seed_style_mlp(width, depth, d_in=4):
    """The seed's architecture: Linear+ReLU blocks and one logit."""
    layers = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


LOSSES = {
    "bce_with_logits": (
        lambda n, dev: torch.rand(n, 1, dtype=torch.float64, device=dev).round(),
        lambda red: nn.BCEWithLogitsLoss(reduction=red),
        1,
    ),
    "cross_entropy": (
        lambda n, dev: torch.randint(0, 4, (n,), device=dev),
        lambda red: nn.CrossEntropyLoss(reduction=red),
        4,
    ),
    "mse": (
        lambda n, dev: torch.randn(n, 4, dtype=torch.float64, device=dev),
        lambda red: nn.MSELoss(reduction=red),
        4,
    ),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_losses_and_reductions(device, loss, reduction):
    make_target, make_loss, d_out = LOSSES[loss]
    model = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, d_out)).double().to(device)
    x = torch.randn(10, 6, dtype=torch.float64, device=device)
    target = make_target(10, device)
    got = ig.per_sample_grads(model, x, target, make_loss(reduction), reduction=reduction)
    # sample n's own loss: the same loss on its batch of one ("mean": N times its share of the mean)
    assert_grads_close(got, func_per_sample_grads(model, x, target, make_loss(reduction)))


def test_per_sample_vector_and_custom_losses(device):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double().to(device)
    x = torch.randn(7, 4, dtype=torch.float64, device=device)

    def per_sample(out):  # [N] losses, no target
        return (out**2).sum(1) + out[:, 0].sin()

    got = ig.per_sample_grads(model, x, None, per_sample)
    assert_grads_close(got, func_per_sample_grads(model, x, None, per_sample))

    def custom(out, t):  # a scalar, summed over samples
        return (torch.log1p((out - t).abs()) * torch.tensor([1.0, 3.0], dtype=out.dtype, device=out.device)).sum()

    t = torch.randn(7, 2, dtype=torch.float64, device=device)
    got = ig.per_sample_grads(model, x, t, custom, reduction="sum")
    assert_grads_close(got, func_per_sample_grads(model, x, t, custom))


def test_layer_orders_flatten_and_identity(device):
    model = (
        nn.Sequential(
            nn.Flatten(),
            nn.Tanh(),
            nn.Linear(12, 6),
            nn.Linear(6, 5, bias=False),
            nn.Identity(),
            nn.Sequential(nn.ELU(), nn.Sigmoid(), nn.Linear(5, 3)),
            nn.Softplus(),
        )
        .double()
        .to(device)
    )
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64, device=device)
    t = torch.randn(8, 3, dtype=torch.float64, device=device)
    got = ig.per_sample_grads(model, x, t, F.mse_loss)
    assert set(got) == {"2.weight", "2.bias", "3.weight", "5.2.weight", "5.2.bias"}
    assert_grads_close(got, func_per_sample_grads(model, x, t, F.mse_loss))


def test_frozen_parameters_get_nothing(device):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2)).double().to(device)
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)  # bias of layer 2 stays trainable
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    t = torch.randn(6, 2, dtype=torch.float64, device=device)
    got = ig.per_sample_grads(model, x, t, F.mse_loss)
    assert set(got) == {"2.bias", "4.weight", "4.bias"}
    ref = func_per_sample_grads(model, x, t, F.mse_loss)
    assert_grads_close(got, {k: ref[k] for k in got})
    norms, per_param = ig.per_sample_grad_norms(model, x, t, F.mse_loss, per_param=True)
    assert set(per_param) == set(got)
    torch.testing.assert_close(norms, torch.stack([g.flatten(1).norm(dim=1) for g in got.values()]).norm(dim=0))


def test_dropout_in_train_mode_uses_the_drawn_masks(device):
    model = (
        nn.Sequential(
            nn.Dropout(0.2),
            nn.Linear(6, 9),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(9, 7),
            nn.Dropout(0.3),
            nn.Tanh(),
            nn.Linear(7, 1),
        )
        .double()
        .to(device)
    )
    model.train()
    x = torch.randn(12, 6, dtype=torch.float64, device=device)
    t = torch.rand(12, 1, dtype=torch.float64, device=device)
    loss = nn.BCEWithLogitsLoss()
    gen = torch.Generator(device).manual_seed(123)
    got = ig.per_sample_grads(model, x, t, loss, generator=gen)
    masks = dropout_masks(model, x, torch.Generator(device).manual_seed(123))
    assert len(masks) == 3 and all((m == 0).any() for m in masks)
    assert_grads_close(got, func_per_sample_grads(model, x, t, nn.BCEWithLogitsLoss(reduction="sum"), masks))
    model.eval()  # identity in eval mode
    assert_grads_close(ig.per_sample_grads(model, x, t, loss), func_per_sample_grads(model, x, t, loss))


def test_into_grad_sample_out_buffers_and_reuse(device):
    model = seed_style_mlp(5, 3).double().to(device)
    engine = ig.PerSampleGrads(model)
    loss = nn.BCEWithLogitsLoss()
    first = None
    for n in (8, 8, 5):
        x = torch.randn(n, 4, dtype=torch.float64, device=device)
        t = torch.rand(n, 1, dtype=torch.float64, device=device).round()
        got = engine(x, t, loss, into="grad_sample")
        assert_grads_close(got, func_per_sample_grads(model, x, t, loss))
        for name, p in model.named_parameters():
            assert p.grad_sample is got[name]
        ptrs = {k: v.data_ptr() for k, v in got.items()}
        if first is None:
            first = ptrs
        elif n == 8:
            assert ptrs == first  # same N, dtype, device: the same buffers
    own = {
        "0.weight": torch.empty(5, 5, 4, dtype=torch.float64, device=device),
        "6.bias": torch.empty(5, 1, dtype=torch.float64, device=device),
    }
    got = engine(x, t, loss, out=own)
    assert got["0.weight"] is own["0.weight"] and got["6.bias"] is own["6.bias"]
    assert_grads_close(got, func_per_sample_grads(model, x, t, loss))
    cached = {k: v.data_ptr() for k, v in engine._results.buffers.items()}
    assert "0.weight" not in cached and "6.bias" not in cached  # no buffer of ours beside the caller's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_models(device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 matmul on CPU is slow and not what CPU users run")
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(device)
    x = torch.randn(6, 8, device=device)
    t = torch.randn(6, 4, device=device)
    ref = func_per_sample_grads(model.double(), x.double(), t.double(), F.mse_loss)
    got = ig.per_sample_grads(model.to(dtype), x.to(dtype), t.to(dtype), F.mse_loss)
    # judged against float64 relative to torch's own error in this dtype (its summed gradient)
    loose = dict(rtol=TOL[dtype]["rtol"] * 8, atol=TOL[dtype]["rtol"] * 8)
    assert_grads_close(got, ref, tol=loose if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5))


def test_norms_match_materialised(device):
    model = seed_style_mlp(7, 4).double().to(device)
    x = torch.randn(10, 4, dtype=torch.float64, device=device)
    t = torch.rand(10, 1, dtype=torch.float64, device=device).round()
    loss = nn.BCEWithLogitsLoss()
    grads = ig.per_sample_grads(model, x, t, loss)
    norms, per_param = ig.PerSampleGrads(model).norms(x, t, loss, per_param=True)
    for name, g in grads.items():
        torch.testing.assert_close(per_param[name], g.flatten(1).norm(dim=1))
    torch.testing.assert_close(norms, torch.stack(list(per_param.values())).norm(dim=0))


def test_clipped_sum_matches_explicit_clipping(device):
    model = seed_style_mlp(6, 3).double().to(device)
    x = torch.randn(16, 4, dtype=torch.float64, device=device)
    t = torch.rand(16, 1, dtype=torch.float64, device=device).round()
    loss = nn.BCEWithLogitsLoss()
    ref_grads = func_per_sample_grads(model, x, t, loss)
    max_norm = clipped_sum_ref(ref_grads, 1.0)[1].median().item()  # half the samples get clipped
    ref_sum, ref_norms = clipped_sum_ref(ref_grads, max_norm)
    assert (ref_norms > max_norm).any() and (ref_norms < max_norm).any()  # both branches of min(1, .)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # overwritten, not accumulated into
    norms = ig.clipped_grad_sum(model, x, t, loss, max_norm)
    torch.testing.assert_close(norms, ref_norms)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_sum[name])


def test_clipped_sum_noise_is_reproducible_and_scaled(device):
    model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 30)).double().to(device)
    x = torch.randn(8, 50, dtype=torch.float64, device=device)
    t = torch.randn(8, 30, dtype=torch.float64, device=device)
    engine = ig.PerSampleGrads(model)

    def noisy(seed):
        engine.clipped_grad_sum(
            x, t, F.mse_loss, 0.5, noise_multiplier=2.0, generator=torch.Generator(device).manual_seed(seed)
        )
        return torch.cat([p.grad.flatten().clone() for p in model.parameters()])

    engine.clipped_grad_sum(x, t, F.mse_loss, 0.5)
    clean = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
    a, b, c = noisy(1), noisy(1), noisy(2)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    std = (a - clean).std().item()
    assert abs(std - 1.0) < 0.05, std  # noise_multiplier * max_norm = 1.0, over 3,270 values


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_equals_unchunked(device, chunk):
    model = nn.Sequential(nn.Linear(5, 6), nn.Softplus(), nn.Linear(6, 3)).double().to(device)
    x = torch.randn(10, 5, dtype=torch.float64, device=device)
    t = torch.randint(0, 3, (10,), device=device)
    loss = nn.CrossEntropyLoss()
    whole, chunked = ig.PerSampleGrads(model), ig.PerSampleGrads(model, max_chunk=chunk)
    assert_grads_close(chunked(x, t, loss), whole(x, t, loss))
    torch.testing.assert_close(chunked.norms(x, t, loss), whole.norms(x, t, loss))
    norms = whole.clipped_grad_sum(x, t, loss, 0.3)
    grads = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(chunked.clipped_grad_sum(x, t, loss, 0.3), norms)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_empty_batch_gives_empty_results(device):
    model = seed_style_mlp(3, 2).to(device)
    x, t = torch.randn(0, 4, device=device), torch.rand(0, 1, device=device)
    loss = nn.BCEWithLogitsLoss()
    got = ig.per_sample_grads(model, x, t, loss)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: (0, *p.shape) for k, p in model.named_parameters()}
    assert ig.per_sample_grad_norms(model, x, t, loss).shape == (0,)
    assert ig.clipped_grad_sum(model, x, t, loss, 1.0).shape == (0,)
    assert all((p.grad == 0).all() for p in model.parameters())
