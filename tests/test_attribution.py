"""Inner products, projections and TracIn against materialised float64 torch.func per-sample
gradients: MLPs (native and hooks captures), a transformer (token ids, padding, LayerNorm,
Embedding), sequence inputs, a custom module; per parameter and total; blocked equals
unblocked; empty and one-sample sets; projections equal the explicit projection by the
exposed matrices, are seeded, batch-independent and preserve inner products within a stated
bound; every bad input gets a clear error."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indivgrad_cuda as ig
from tests.conftest import TOL
from tests.models import FeatureEncoder, ResidualMLP, TinyEncoder, token_batch
from tests.reference import func_module_grads

F64 = TOL[torch.float64]


def reference(model, a, b, loss=F.cross_entropy):
    """(K, {name: K_name}, grads of a) from torch.func per-sample gradients in float64."""
    ga, gb = func_module_grads(model, *a, loss), func_module_grads(model, *b, loss)
    per = {k: ga[k].flatten(1).double() @ gb[k].flatten(1).double().t() for k in ga}
    return sum(per.values()), per, ga


def assert_inner_products(engine, a, b, ref, ref_per, loss=F.cross_entropy):
    k, per = engine.inner_products(*a, *b, loss, per_param=True)
    torch.testing.assert_close(k, ref, **F64)
    assert list(per) == list(ref_per)
    for name in ref_per:
        torch.testing.assert_close(per[name], ref_per[name], **F64, msg=name)
    torch.testing.assert_close(engine.inner_products(*a, *b, loss), ref, **F64)
    return k


def mlp(device, flatten=False):
    layers = [nn.Flatten()] if flatten else []
    return (
        nn.Sequential(*layers, nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4))
        .double()
        .to(device)
    )


def labelled(n, shape, device, classes=4):
    return torch.randn(n, *shape, dtype=torch.float64, device=device), torch.randint(0, classes, (n,), device=device)


@pytest.mark.parametrize("capture", ["native", "hooks"])
@pytest.mark.parametrize("max_chunk", [None, 3])
def test_mlp_inner_products(device, capture, max_chunk):
    model = mlp(device)
    a, b = labelled(8, (12,), device), labelled(5, (12,), device)
    ref, ref_per, _ = reference(model, a, b)
    engine = ig.PerSampleGrads(model, capture=capture, max_chunk=max_chunk)
    assert (engine._native is not None) == (capture == "native")
    assert_inner_products(engine, a, b, ref, ref_per)


def test_mlp_frozen_layer_and_no_bias(device):
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.GELU(), nn.Linear(5, 3)).double().to(device)
    model[2].bias.requires_grad_(False)
    a, b = labelled(6, (6,), device, 3), labelled(4, (6,), device, 3)
    ref, ref_per, _ = reference(model, a, b)
    assert list(ref_per) == ["0.weight", "2.weight"]
    for capture in ("native", "hooks"):
        assert_inner_products(ig.PerSampleGrads(model, capture=capture), a, b, ref, ref_per)


def encoder(device):
    return TinyEncoder(vocab=13, d_model=8, heads=2, layers=2, max_len=9, classes=3).double().to(device).eval()


@pytest.mark.parametrize("max_chunk", [None, 2])
def test_transformer_inner_products(device, max_chunk):
    """Token ids with padding, a mask, sets of different lengths: Embedding (padding_idx),
    LayerNorm and Linear layers on sequences, through the hooks capture."""
    model = encoder(device)
    ids_a, mask_a, y_a = token_batch(7, 9, 13, 3, device=device)
    ids_b, mask_b, y_b = token_batch(4, 6, 13, 3, device=device)
    a, b = ((ids_a, mask_a), y_a), ((ids_b, mask_b), y_b)
    ref, ref_per, _ = reference(model, a, b)
    assert_inner_products(ig.PerSampleGrads(model, max_chunk=max_chunk), a, b, ref, ref_per)


def test_sequence_inputs_and_custom_module(device):
    """Real-valued sequences [N, T, F] (Linear on 3-D inputs) and a custom residual module
    with LayerNorm on 2-D inputs, in dict and tensor form."""
    model = FeatureEncoder(5, d_model=8, heads=2, layers=1, max_len=7, classes=3).double().to(device).eval()
    a, b = labelled(6, (7, 5), device, 3), labelled(3, (4, 5), device, 3)
    ref, ref_per, _ = reference(model, a, b)
    assert_inner_products(ig.PerSampleGrads(model), a, b, ref, ref_per)
    res = ResidualMLP(6, 8, 2, 3).double().to(device)
    a, b = labelled(5, (6,), device, 3), labelled(4, (6,), device, 3)
    ref, ref_per, _ = reference(res, a, b)
    assert_inner_products(ig.PerSampleGrads(res), a, b, ref, ref_per)


def test_both_gram_forms_in_the_engine(monkeypatch):
    """The engine's sequence Linear layers take the Gram or the direct form by the cost rule;
    forcing either (through ops.linear_gram, which the engine calls) gives the same inner
    products."""
    from indivgrad_cuda import ops

    model = FeatureEncoder(5, d_model=8, heads=2, layers=1, max_len=7, classes=3).double().eval()
    a, b = labelled(4, (7, 5), "cpu", 3), labelled(3, (6, 5), "cpu", 3)
    ref, _, _ = reference(model, a, b)
    original = ops.linear_gram
    for method in ("ghost", "direct"):
        calls = []

        def forced(*f, bias=0.0, method=method, calls=calls):
            calls.append(f[0].dim())
            return original(*f, bias=bias, method=method)

        monkeypatch.setattr(ops, "linear_gram", forced)
        torch.testing.assert_close(ig.PerSampleGrads(model).inner_products(*a, *b, F.cross_entropy), ref, **F64)
        assert 3 in calls, f"{method}: the engine never called ops.linear_gram on sequence factors"


def test_blocked_equals_unblocked_and_reductions(device):
    model = encoder(device)
    ids, mask, y = token_batch(9, 9, 13, 3, device=device)
    whole = ig.PerSampleGrads(model).inner_products((ids, mask), y, (ids[:5], mask[:5]), y[:5], F.cross_entropy)
    for chunk in (1, 2, 4):
        blocked = ig.PerSampleGrads(model, max_chunk=chunk).inner_products(
            (ids, mask), y, (ids[:5], mask[:5]), y[:5], F.cross_entropy
        )
        torch.testing.assert_close(blocked, whole, **F64)
    assert torch.allclose(whole[:5], whole[:5].t(), **F64)  # a set against itself: symmetric

    def summed(out, t):
        return F.cross_entropy(out, t, reduction="sum")

    def per_sample(out, t):
        return F.cross_entropy(out, t, reduction="none")

    engine = ig.PerSampleGrads(model)
    for loss, reduction in ((summed, "sum"), (per_sample, "mean")):
        got = engine.inner_products((ids, mask), y, (ids[:5], mask[:5]), y[:5], loss, reduction=reduction)
        torch.testing.assert_close(got, whole, **F64)


@pytest.mark.parametrize("capture", ["native", "hooks"])
def test_empty_and_single_sample_sets(device, capture):
    model = mlp(device)
    engine = ig.PerSampleGrads(model, capture=capture)
    a, b = labelled(1, (12,), device), labelled(5, (12,), device)
    ref, ref_per, _ = reference(model, a, b)
    assert_inner_products(engine, a, b, ref, ref_per)
    empty = labelled(0, (12,), device)
    k, per = engine.inner_products(*empty, *b, F.cross_entropy, per_param=True)
    assert k.shape == (0, 5) and all(v.shape == (0, 5) for v in per.values()) and len(per) == 6
    assert engine.inner_products(*b, *empty, F.cross_entropy).shape == (5, 0)
    assert engine.project(*empty, F.cross_entropy, dim=50).shape == (0, engine.projection(50).dim)


def test_half_precision_model():
    """A bfloat16 model: K in float32 against float64 on the rounded model and inputs, within
    1e-2 of its largest entry, and each parameter's within 2e-2 of its own largest (bfloat16
    activations and gradients: measured up to 1.5e-2 over 20 seeds); K is their sum."""
    model = mlp("cpu").to(torch.bfloat16)
    a, b = labelled(6, (12,), "cpu"), labelled(4, (12,), "cpu")
    a, b = (a[0].bfloat16(), a[1]), (b[0].bfloat16(), b[1])
    ref, ref_per, _ = reference(copy.deepcopy(model).double(), (a[0].double(), a[1]), (b[0].double(), b[1]))
    engine = ig.PerSampleGrads(model)
    k, per = engine.inner_products(*a, *b, F.cross_entropy, per_param=True)
    assert k.dtype == torch.float32 and list(per) == list(ref_per)
    torch.testing.assert_close(k.double(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())
    for name in ref_per:
        assert per[name].dtype == torch.float32
        atol = 2e-2 * ref_per[name].abs().max().item()
        torch.testing.assert_close(per[name].double(), ref_per[name], rtol=0, atol=atol, msg=name)
    # K alone (a Linear's weight and bias in one pass) is the sum of the checked parts, to float32 rounding
    float32_tol = dict(rtol=0, atol=1e-6 * sum(v.abs() for v in per.values()).max().item())
    torch.testing.assert_close(k, sum(per.values()), **float32_tol)
    torch.testing.assert_close(engine.inner_products(*a, *b, F.cross_entropy), k, **float32_tol)


# ---------------------------------------------------------------- projections


@pytest.mark.parametrize("capture", ["native", "hooks"])
def test_mlp_projection_equals_explicit(device, capture):
    model = mlp(device, flatten=True)
    x, y = labelled(9, (3, 4), device)
    engine = ig.PerSampleGrads(model, capture=capture, max_chunk=4)
    got = engine.project(x, y, F.cross_entropy, dim=60, seed=7)
    proj = engine.projection(60, seed=7)
    assert got.shape == (9, proj.dim) and proj.dim <= 60
    torch.testing.assert_close(got, proj.apply(func_module_grads(model, x, y, F.cross_entropy)), **F64)


def test_transformer_projection_equals_explicit(device):
    model = encoder(device)
    ids, mask, y = token_batch(6, 9, 13, 3, device=device)
    engine = ig.PerSampleGrads(model)
    got = engine.project((ids, mask), y, F.cross_entropy, dim=500, seed=1)
    proj = engine.projection(500, seed=1)
    assert list(proj.matrices) == [n for n, p in model.named_parameters() if p.requires_grad]
    torch.testing.assert_close(got, proj.apply(func_module_grads(model, (ids, mask), y, F.cross_entropy)), **F64)


def test_projection_dimension_rule():
    """The documented rule: each layer's share of dim by its parameters; a Linear takes
    k_in = floor(sqrt(share)), k_out = floor(share / (k_in + 1)) with a bias, capped by its widths."""
    model = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10, bias=False)).double()
    proj = ig.PerSampleGrads(model).projection(1000)
    total = 100 * 50 + 50 + 50 * 10
    share0, share1 = 1000 * 5050 / total, 1000 * 500 / total
    k_in0 = math.isqrt(int(share0))
    k_out0 = int(share0 // (k_in0 + 1))
    k_in1 = math.isqrt(int(share1))
    k_out1 = min(10, int(share1 // k_in1))
    shapes = {name: [tuple(m.shape) for m in mats] for name, mats in proj.matrices.items()}
    assert shapes == {
        "0.weight": [(k_out0, 50), (k_in0, 100)],
        "0.bias": [(k_out0, 50)],
        "2.weight": [(k_out1, 10), (k_in1, 50)],
    }
    assert proj.matrices["0.bias"][0] is proj.matrices["0.weight"][0]  # the bias by the weight's P_out
    assert proj.dim == k_out0 * (k_in0 + 1) + k_out1 * k_in1 <= 1000
    assert proj.columns["0.bias"] == slice(k_out0 * k_in0, k_out0 * (k_in0 + 1))
    # Entries: variance 1/k, so E[PᵀP] = I
    p = proj.matrices["0.weight"][1]
    assert abs(p.square().sum(0).mean().item() - 1) < 0.05


def test_projection_is_seeded_and_batch_independent(device):
    model = encoder(device)
    ids, mask, y = token_batch(8, 9, 13, 3, device=device)
    a = ig.PerSampleGrads(model).project((ids, mask), y, F.cross_entropy, dim=300, seed=5)
    order = torch.randperm(8, device=device)[:5]
    b = ig.PerSampleGrads(model, max_chunk=2).project(
        (ids[order], mask[order]), y[order], F.cross_entropy, dim=300, seed=5
    )
    torch.testing.assert_close(b, a[order], **F64)  # another engine, batch, order and chunking
    other = ig.PerSampleGrads(model).project((ids, mask), y, F.cross_entropy, dim=300, seed=6)
    assert not torch.allclose(other, a)
    m1, m2 = ig.PerSampleGrads(model).projection(300, seed=5), ig.PerSampleGrads(model).projection(300, seed=5)
    for name in m1.matrices:
        for p, q in zip(m1.matrices[name], m2.matrices[name]):
            assert torch.equal(p, q)
    if device == "cuda":  # the same matrices on every device
        cpu = ig.PerSampleGrads(encoder("cpu")).projection(300, seed=5)
        for name in m1.matrices:
            for p, q in zip(m1.matrices[name], cpu.matrices[name]):
                assert torch.equal(p.cpu(), q)


def test_projection_matrices_follow_the_documented_recipe():
    """Matrix `key` of the layer at `path`: float64 CPU randn(k, d) / sqrt(k) from a generator
    seeded by blake2b(f"{seed}/{path}/{key}", 8 bytes, little-endian, 63 bits), cast to the
    model's dtype; two layers of one shape get different matrices."""
    import hashlib

    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5, bias=False))
    proj = ig.PerSampleGrads(model).projection(40, seed=11)

    def recipe(path, key, k, d):
        digest = hashlib.blake2b(f"11/{path}/{key}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        return (torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(k)).float()

    assert proj.dtype == torch.float32
    for name, mats in proj.matrices.items():
        path, attr = name.rsplit(".", 1)
        keys = ("out", "in") if attr == "weight" else ("out",)
        assert len(mats) == len(keys), name
        for key, m in zip(keys, mats):
            assert m.dtype == torch.float32 and m.device.type == "cpu"
            assert torch.equal(m, recipe(path, key, *m.shape)), (name, key)
    same_shape = proj.matrices["2.weight"], proj.matrices["4.weight"]
    assert [m.shape for m in same_shape[0]] == [m.shape for m in same_shape[1]]
    for m2, m4 in zip(*same_shape):
        assert not torch.allclose(m2, m4)


def test_projection_preserves_inner_products():
    """Johnson-Lindenstrauss for the Kronecker projection, seeded. For rank-one gradients
    x ⊗ g (2-D inputs), <P_out g ⊗ P_in x, P_out g' ⊗ P_in x'> = (P_in x · P_in x')(P_out g ·
    P_out g') is unbiased, and each factor's standard deviation relative to its norms is at
    most sqrt(2/k), so the product's is at most sd = sqrt(2/k_in + 2/k_out + 4/(k_in k_out)):
    0.125 with k_in = k_out = 256 here. Every one of the 40·40 pairs must be within 5 sd of
    its exact inner product relative to the gradients' norms, their root mean square error
    within 1.6 sd, and the mean ratio of squared norms within 0.15 of 1."""
    model = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 256, bias=False)).double()
    model[0].requires_grad_(False)
    x, y = labelled(40, (64,), "cpu", 256)
    engine = ig.PerSampleGrads(model)
    phi = engine.project(x, y, F.cross_entropy, dim=256 * 256, seed=0)
    assert [tuple(p.shape) for p in engine.projection(256 * 256).matrices["2.weight"]] == [(256, 256), (256, 512)]
    k = engine.inner_products(x, y, x, y, F.cross_entropy)
    norms = k.diagonal().sqrt()
    rel = (phi @ phi.t() - k) / (norms[:, None] * norms[None, :])
    sd = math.sqrt(2 / 256 + 2 / 256 + 4 / 256**2)
    assert rel.abs().max() < 5 * sd, rel.abs().max()
    assert rel.square().mean().sqrt() < 1.6 * sd, rel.square().mean().sqrt()
    assert ((phi.square().sum(1) / k.diagonal()).mean() - 1).abs() < 0.15


# ---------------------------------------------------------------- TracIn


def test_tracin_scores_and_self_influence(tmp_path):
    model = mlp("cpu")
    train, test = labelled(7, (12,), "cpu"), labelled(3, (12,), "cpu")
    checkpoints, lrs = [], [0.5, 0.2, 0.1]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in lrs:
        opt.zero_grad()
        F.cross_entropy(model(train[0]), train[1]).backward()
        opt.step()
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    final = {k: v.clone() for k, v in model.state_dict().items()}
    ref_scores, ref_self = 0, 0
    for ckpt, lr in zip(checkpoints, lrs):
        model.load_state_dict(ckpt)
        k, _, ga = reference(model, train, test)
        ref_scores = ref_scores + lr * k
        ref_self = ref_self + lr * sum(g.flatten(1).square().sum(1) for g in ga.values())
    model.load_state_dict(final)
    model[0].weight.data.add_(1.0)  # the model's own state, restored afterwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i, ckpt in enumerate(checkpoints):
        paths.append(tmp_path / f"c{i}.pt")
        torch.save(ckpt, paths[-1])
    torch.testing.assert_close(
        ig.tracin_scores(model, checkpoints, lrs, train, test, F.cross_entropy), ref_scores, **F64
    )
    torch.testing.assert_close(
        ig.tracin_self_influence(model, paths, lrs, train, F.cross_entropy, max_chunk=2), ref_self, **F64
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # TRAK-style: inner products of projected gradients, the same matrices at every checkpoint
    projected = ig.tracin_scores(model, checkpoints, 0.3, train, test, F.cross_entropy, projection_dim=64, seed=2)
    engine, expected = ig.PerSampleGrads(model), 0
    for ckpt in checkpoints:
        model.load_state_dict(ckpt)
        expected = (
            expected
            + 0.3
            * engine.project(*train, F.cross_entropy, dim=64, seed=2)
            @ engine.project(*test, F.cross_entropy, dim=64, seed=2).t()
        )
    torch.testing.assert_close(projected, expected, **F64)
    self_proj = ig.tracin_self_influence(model, checkpoints, 0.3, train, F.cross_entropy, projection_dim=64, seed=2)
    torch.testing.assert_close(
        self_proj,
        ig.tracin_scores(model, checkpoints, 0.3, train, train, F.cross_entropy, projection_dim=64, seed=2).diagonal(),
        **F64,
    )


def test_tracin_errors():
    model = mlp("cpu")
    train = labelled(3, (12,), "cpu")
    state = model.state_dict()
    cases = [
        (dict(checkpoints=[]), ValueError, "checkpoints: expected at least one state dict or path, got none"),
        (
            dict(learning_rates=[0.1, 0.2]),
            ValueError,
            "learning_rates: expected one per checkpoint (1) or a single number, got 2",
        ),
        (dict(checkpoints=[{"1.weight": torch.zeros(3)}]), ValueError, "checkpoints[0]: does not fit the model"),
        (dict(checkpoints=[3]), TypeError, "checkpoints[0]: expected a state dict or a path, got int"),
        (dict(chunk=2), TypeError, "unexpected keyword arguments ['chunk']; engine options are"),
    ]
    for change, error, message in cases:
        kw = dict(checkpoints=[state], learning_rates=0.1)
        kw.update(change)
        with pytest.raises(error) as info:
            ig.tracin_self_influence(
                model, kw.pop("checkpoints"), kw.pop("learning_rates"), train, F.cross_entropy, **kw
            )
        assert message in str(info.value)
    assert torch.equal(model.state_dict()["0.weight"], state["0.weight"])


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs():
    model = encoder("cpu")
    ids, mask, y = token_batch(4, 9, 13, 3)
    engine = ig.PerSampleGrads(model)
    loss = F.cross_entropy
    cases = [
        (
            lambda: engine.inner_products((ids, mask), y, ids, y, loss),
            ValueError,
            "inputs_b: expected the structure of inputs_a (a tuple of 2), got a Tensor",
        ),
        (
            lambda: engine.inner_products((ids, mask), y, (ids, mask, mask), y, loss),
            ValueError,
            "inputs_b: expected the structure of inputs_a (a tuple of 2), got a tuple of 3",
        ),
        (
            lambda: engine.inner_products((ids, mask), y, (ids.int(), mask), y, loss),
            ValueError,
            "inputs_b[0]: expected a 2-D torch.int64 tensor on cpu (as inputs_a[0]), got a 2-D torch.int32",
        ),
        (
            lambda: engine.inner_products((ids, mask), y, (ids, None), y, loss),
            ValueError,
            "inputs_b[1]: expected a Tensor (as inputs_a[1]), got NoneType",
        ),
        (
            lambda: engine.inner_products({"ids": ids}, y, {"x": ids}, y, loss),
            ValueError,
            "inputs_b: expected the structure of inputs_a (a dict with keys ['ids']), got a dict with keys ['x']",
        ),
        (
            lambda: engine.inner_products((ids, mask), y, (ids, mask), y, loss, per_param=1),
            TypeError,
            "per_param: expected True or False, got 1",
        ),
        (
            lambda: engine.inner_products((ids, mask), y, (ids, mask), y, loss, reduction="avg"),
            ValueError,
            "reduction: expected one of",
        ),
        (lambda: engine.project((ids, mask), y, loss, dim=0), ValueError, "dim: expected a positive int, got 0"),
        (lambda: engine.project((ids, mask), y, loss, dim=-3), ValueError, "dim: expected a positive int, got -3"),
        (lambda: engine.project((ids, mask), y, loss, dim=2.5), ValueError, "dim: expected a positive int, got 2.5"),
        (lambda: engine.project((ids, mask), y, loss, dim=True), ValueError, "dim: expected a positive int, got True"),
        (lambda: engine.project((ids, mask), y, loss, dim=8, seed="a"), TypeError, "seed: expected an int, got 'a'"),
        (
            lambda: engine.projection(8).apply({}),
            ValueError,
            "grads: expected every projected parameter, missing ['tok.weight'",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), str(info.value)
    dropout = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    for call in (
        lambda e: e.inner_products(x, None, x, None, lambda o: o.sum(1)),
        lambda e: e.project(x, None, lambda o: o.sum(1), dim=4),
    ):
        with pytest.raises(ValueError, match=r"modules \['1'\] \(Dropout\) are in train mode.*model.eval\(\)"):
            call(ig.PerSampleGrads(dropout))
    dropout.eval()
    assert ig.PerSampleGrads(dropout).inner_products(x, None, x, None, lambda o: o.sum(1)).shape == (5, 5)


@pytest.mark.cuda
def test_inputs_on_another_device_than_the_model():
    model = encoder("cpu")
    ids, mask, y = token_batch(4, 9, 13, 3)
    with pytest.raises(ValueError, match=r"inputs\[0\]: expected a tensor on cpu \(the model's\), got cuda"):
        ig.PerSampleGrads(model).project((ids.cuda(), mask), y, F.cross_entropy, dim=8)
