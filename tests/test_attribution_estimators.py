"""TRAK, K-FAC and EK-FAC influence and the LDS against float64 references
(tests/reference_attribution.py: explicit per-sample gradients, explicit Kronecker products,
dense inverses) on an MLP (native capture) and a sequence model (Linear on [N, T, D],
Embedding, LayerNorm: hooks capture); blocked equals unblocked; ensembles; saved and loaded
state; every bad input gets a clear error."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indivgrad_cuda as ig
from indivgrad_cuda.attribution import TRAK, Influence, lds, margin, negative_margin, one_minus_p
from tests.conftest import TOL
from tests.reference_attribution import influence_ref, linear_factors, sampled_labels, trak_ref

F64 = TOL[torch.float64]


def per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class Seq(nn.Module):
    """Token ids [N, T] -> logits: Embedding, a Linear on [N, T, D], LayerNorm, a Linear head."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.ln, self.head = nn.Embedding(7, 4), nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(self.ln(torch.tanh(self.lin(self.emb(ids)))).mean(1))


def setup(kind, n_fit=48, n_train=11, n_test=5, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

        def draw(n):
            return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)

    else:
        model = Seq()

        def draw(n):
            return torch.randint(0, 7, (n, 4), generator=g), torch.randint(0, 3, (n,), generator=g)

    model = model.double().to(device).eval()
    sets = [draw(n) for n in (n_fit, n_train, n_test)]
    return model, *[tuple(t.to(device) for t in s) for s in sets]


@pytest.mark.parametrize("kind", ["mlp", "seq"])
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("damping", [None, 0.05])
def test_influence_equals_dense_reference(kind, strategy, fisher, damping):
    model, fit, train, test = setup(kind)
    ref = influence_ref(model, fit, train, test, per_sample_ce, strategy, fisher, damping, seed=3)
    inf = Influence(model, F.cross_entropy, strategy=strategy, fisher=fisher, damping=damping, seed=3, block_size=5)
    got = inf.fit(*fit).scores(*train, *test)
    torch.testing.assert_close(got, ref, **F64)
    # blocked equals unblocked: every set in one block, the test set one sample at a time
    whole = Influence(
        model, F.cross_entropy, strategy=strategy, fisher=fisher, damping=damping, seed=3, block_size=1000
    )
    torch.testing.assert_close(whole.fit(*fit).scores(*train, *test, test_block_size=1), got, **F64)


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_influence_measurement_and_frozen_weight(kind):
    model, fit, train, test = setup(kind, seed=1)
    head = model[2] if kind == "mlp" else model.head
    head.weight.requires_grad_(False)  # its bias alone: a diagonal curvature
    ref = influence_ref(model, fit, train, test, per_sample_ce, "ekfac", "empirical", measurement=negative_margin)
    inf = Influence(model, per_sample_ce, fisher="empirical", block_size=7).fit(*fit)
    torch.testing.assert_close(inf.scores(*train, *test, measurement=negative_margin), ref, **F64)
    name = "2.bias" if kind == "mlp" else "head.bias"
    assert inf.describe()[name].startswith("diagonal")


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_kfac_factors_equal_explicit_covariances(kind):
    model, fit, _, _ = setup(kind, seed=2)
    inf = Influence(model, F.cross_entropy, strategy="kfac", fisher="true", seed=5, block_size=9).fit(*fit)
    factors = linear_factors(model, fit[0], sampled_labels(model, fit[0], 5, 0), per_sample_ce)
    kron = {p: c for p, c in inf.curvatures.items() if c.kind == "kronecker"}
    assert sorted(kron) == sorted(factors)
    for path, (a, g) in factors.items():
        c = kron[path]
        torch.testing.assert_close(c.u_a @ torch.diag(c.alpha) @ c.u_a.t(), a.t() @ a / len(a), **F64)
        torch.testing.assert_close(c.u_g @ torch.diag(c.sigma) @ c.u_g.t(), g.t() @ g / len(g), **F64)


def test_influence_describes_each_parameter():
    model, *_ = setup("seq")
    described = Influence(model, F.cross_entropy).describe()
    assert described == {
        "emb.weight": "diagonal (Embedding 'emb')",
        "lin.weight": "kronecker (Linear 'lin')",
        "lin.bias": "kronecker (Linear 'lin')",
        "ln.weight": "diagonal (LayerNorm 'ln')",
        "ln.bias": "diagonal (LayerNorm 'ln')",
        "head.weight": "kronecker (Linear 'head')",
        "head.bias": "kronecker (Linear 'head')",
    }


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_influence_state_saved_and_loaded(tmp_path, strategy):
    model, fit, train, test = setup("seq", seed=4)
    inf = Influence(model, F.cross_entropy, strategy=strategy).fit(*fit)
    want = inf.scores(*train, *test)
    inf.save(tmp_path / "inf.pt")
    again = Influence(model, F.cross_entropy, strategy=strategy).load(tmp_path / "inf.pt")
    torch.testing.assert_close(again.scores(*train, *test), want, rtol=0, atol=0)
    other, *_ = setup("mlp")
    with pytest.raises(ValueError, match="another model"):
        Influence(other, F.cross_entropy, strategy=strategy).load(tmp_path / "inf.pt")
    wider = Seq().double()
    wider.lin = nn.Linear(4, 6).double()
    wider.ln, wider.head = nn.LayerNorm(6).double(), nn.Linear(6, 3).double()
    with pytest.raises(ValueError, match="another model"):
        Influence(wider, F.cross_entropy, strategy=strategy).load_state_dict(inf.state_dict())
    with pytest.raises(ValueError, match="strategy"):
        Influence(model, F.cross_entropy, strategy={"kfac": "ekfac", "ekfac": "kfac"}[strategy]).load(
            tmp_path / "inf.pt"
        )


def test_influence_bad_inputs():
    model, fit, train, test = setup("mlp")
    for damping in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="damping"):
            Influence(model, F.cross_entropy, damping=damping)
    with pytest.raises(ValueError, match="strategy"):
        Influence(model, F.cross_entropy, strategy="fac")
    with pytest.raises(ValueError, match="fisher"):
        Influence(model, F.cross_entropy, fisher="model")
    with pytest.raises(ValueError, match="block_size"):
        Influence(model, F.cross_entropy, block_size=0)
    with pytest.raises(TypeError, match="engine options"):
        Influence(model, F.cross_entropy, cuda_graph=True)
    inf = Influence(model, F.cross_entropy)
    with pytest.raises(ValueError, match="at least one sample"):
        inf.fit(fit[0][:0], fit[1][:0])
    with pytest.raises(RuntimeError, match="fit"):
        inf.scores(*train, *test)
    inf.fit(*fit)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="fit again"):
        inf.scores(*train, *test)
    per_position = nn.Sequential(nn.Embedding(5, 5)).double()  # logits [N, T, C]
    with pytest.raises(ValueError, match="fisher='empirical'"):
        Influence(per_position, lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())).fit(
            torch.randint(0, 5, (4, 2)), torch.randint(0, 5, (4, 2))
        )
    tied = nn.Sequential(nn.Embedding(5, 5), nn.Linear(5, 5)).double()
    tied[1].weight = tied[0].weight
    with pytest.raises(NotImplementedError, match="tied"):
        Influence(tied, lambda out, y: F.cross_entropy(out.mean(1), y)).fit(
            torch.randint(0, 5, (4, 2)), torch.randint(0, 5, (4,))
        )


# ---------------------------------------------------------------- TRAK


@pytest.mark.parametrize("kind", ["mlp", "seq"])
@pytest.mark.parametrize("regularization", [0.0, 0.3])
@pytest.mark.parametrize("n_train", [40, 8])  # 8 < D_proj: ΦᵀΦ singular, its pseudo-inverse when λ = 0
def test_trak_equals_explicit_formula(kind, regularization, n_train):
    model, _, train, test = setup(kind, n_train=n_train, seed=6)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    with torch.no_grad():  # a second "checkpoint": the weights moved
        states.append({k: v + 0.1 * torch.randn_like(v) for k, v in states[0].items()})
    trak = TRAK(model, proj_dim=12, seed=7, regularization=regularization, block_size=9)
    for s in states:
        trak.featurize(*train, checkpoint=s)
    engine = ig.PerSampleGrads(model)
    projections = [engine.projection(12, seed=7 + c) for c in range(2)]
    ref = trak_ref(projections, states, model, train, test, margin, one_minus_p, regularization)
    got = trak.scores(*test)
    # a pseudo-inverse cuts near-zero eigenvalues at its own rounding: 1e-8 of the scores
    torch.testing.assert_close(
        got, ref, **(F64 if n_train > 12 else dict(rtol=1e-8, atol=1e-8 * ref.abs().max().item()))
    )
    # blocked equals unblocked; the model's own state is restored
    whole = TRAK(model, proj_dim=12, seed=7, regularization=regularization, block_size=1000)
    for s in states:
        whole.featurize(*train, checkpoint=s)
    torch.testing.assert_close(whole.scores(*test), got, **F64)
    torch.testing.assert_close(model.state_dict(), states[0], rtol=0, atol=0)


def test_trak_ensemble_averages_as_documented():
    model, _, train, test = setup("mlp", n_train=30, seed=8)
    states = [{k: v + 0.2 * c * torch.randn_like(v) for k, v in model.state_dict().items()} for c in range(3)]
    singles = []
    for c, s in enumerate(states):
        one = TRAK(model, proj_dim=10, seed=c)
        one.featurize(*train, checkpoint=s)
        singles.append(one)
    both = TRAK(model, proj_dim=10, seed=0)
    for s in states:
        both.featurize(*train, checkpoint=s)
    kernels = torch.stack([t.scores(*test) / t.models[0]["weights"][:, None] for t in singles])
    weights = torch.stack([t.models[0]["weights"] for t in singles]).mean(0)
    torch.testing.assert_close(both.scores(*test), kernels.mean(0) * weights[:, None], **F64)


def test_trak_state_saved_and_loaded(tmp_path):
    model, _, train, test = setup("seq", n_train=30, seed=9)
    trak = TRAK(model, proj_dim=10)
    trak.featurize(*train)
    trak.featurize(*train, checkpoint={k: v * 1.1 for k, v in model.state_dict().items()})
    want = trak.scores(*test)
    trak.save(tmp_path / "trak.pt")
    again = TRAK(model, proj_dim=10).load(tmp_path / "trak.pt")
    torch.testing.assert_close(again.scores(*test), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="proj_dim"):
        TRAK(model, proj_dim=11).load(tmp_path / "trak.pt")
    other, *_ = setup("mlp")
    with pytest.raises(ValueError, match="another model"):
        TRAK(other, proj_dim=10).load(tmp_path / "trak.pt")


def test_trak_bad_inputs():
    model, _, train, test = setup("mlp", n_train=6)
    for dim in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="proj_dim"):
            TRAK(model, proj_dim=dim)
    with pytest.raises(ValueError, match="regularization"):
        TRAK(model, regularization=-0.1)
    with pytest.raises(TypeError, match="output_fn"):
        TRAK(model, output_fn="margin")
    trak = TRAK(model, proj_dim=4)
    with pytest.raises(RuntimeError, match="featurize"):
        trak.scores(*test)
    with pytest.raises(ValueError, match="at least one"):
        trak.featurize(train[0][:0], train[1][:0])
    trak.featurize(*train)
    with pytest.raises(ValueError, match="training samples featurized before"):
        trak.featurize(train[0][:3], train[1][:3])
    other, *_ = setup("seq")
    with pytest.raises(ValueError, match="does not fit the model"):
        trak.featurize(*train, checkpoint=other.state_dict())


# ---------------------------------------------------------------- LDS


def test_lds_equals_scipy_spearman():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(30, 6, generator=g, dtype=torch.float64)
    subsets = torch.rand(20, 30, generator=g) < 0.5
    actual = subsets.double() @ scores + 2.0 * torch.randn(20, 6, generator=g, dtype=torch.float64)
    actual[:, 5] = actual[:, 5].round()  # ties
    actual[:, 4] = 1.0  # constant: left out
    got = lds(scores, subsets, actual)
    predicted = subsets.double() @ scores
    want = torch.tensor(
        [stats.spearmanr(predicted[:, m], actual[:, m]).statistic for m in range(4)]
        + [float("nan")]
        + [stats.spearmanr(predicted[:, 5], actual[:, 5]).statistic],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got.per_test, want, equal_nan=True, **F64)
    ok = want[~want.isnan()]
    assert got.left_out == 1 and got.mean == pytest.approx(ok.mean().item())
    half = 1.96 * ok.std().item() / len(ok) ** 0.5
    assert (got.low, got.high) == pytest.approx((got.mean - half, got.mean + half))
    with pytest.raises(ValueError, match="subsets"):
        lds(scores, subsets[:, :10], actual)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_estimators_on_cuda_equal_cpu():
    model, fit, train, test = setup("seq", seed=10)
    gpu, fit_c, train_c, test_c = setup("seq", seed=10, device="cuda")
    for strategy in ("kfac", "ekfac"):
        cpu = Influence(model, F.cross_entropy, strategy=strategy).fit(*fit).scores(*train, *test)
        cuda = Influence(gpu, F.cross_entropy, strategy=strategy).fit(*fit_c).scores(*train_c, *test_c)
        torch.testing.assert_close(cuda.cpu(), cpu, **F64)
    t_cpu, t_gpu = TRAK(model, proj_dim=8), TRAK(gpu, proj_dim=8)
    t_cpu.featurize(*train)
    t_gpu.featurize(*train_c)
    torch.testing.assert_close(t_gpu.scores(*test_c).cpu(), t_cpu.scores(*test), **F64)


# ---------------------------------------------------------------- precision, blocks, edge cases


def test_trak_in_float32_matches_float64_with_a_rank_deficient_kernel():
    """The projection covers the softmax layer whole, so Φ is rank-deficient (the margin's
    output gradients sum to zero): float32 features must still give float64's scores."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x, y = torch.randn(300, 8), torch.randint(0, 4, (300,))
    xt, yt = torch.randn(7, 8), torch.randint(0, 4, (7,))
    got, want = TRAK(model, proj_dim=200), TRAK(copy.deepcopy(model).double(), proj_dim=200)
    got.featurize(x, y)
    want.featurize(x.double(), y)
    ref = want.scores(xt.double(), yt)
    torch.testing.assert_close(got.scores(xt, yt).double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_trak_keeps_copies_of_checkpoints_and_paths(tmp_path):
    model, _, train, test = setup("mlp", n_train=30, seed=12)
    aliased, copied = TRAK(model, proj_dim=10), TRAK(model, proj_dim=10)
    aliased.featurize(*train, checkpoint=model.state_dict())  # shares the parameters' storage
    copied.featurize(*train, checkpoint={k: v.clone() for k, v in model.state_dict().items()})
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    by_path = TRAK(model, proj_dim=10)
    by_path.featurize(*train, checkpoint=tmp_path / "ckpt.pt")  # a pathlib.Path
    want = copied.scores(*test)
    with torch.no_grad():  # training goes on
        for p in model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(aliased.scores(*test), want, rtol=0, atol=0)
    by_path.save(tmp_path / "trak.pt")
    torch.testing.assert_close(TRAK(model, proj_dim=10).load(tmp_path / "trak.pt").scores(*test), want, **F64)


def test_one_minus_p_does_not_cancel():
    logits = torch.tensor([[0.0, 20.0, 0.0], [0.0, 14.0, 0.0]], dtype=torch.float64)
    want = 2 / (2 + torch.exp(torch.tensor([20.0, 14.0], dtype=torch.float64)))  # exp(0) + exp(0) over the sum
    torch.testing.assert_close(one_minus_p(logits, torch.tensor([1, 1])), want, rtol=1e-14, atol=0)


class Branchy(nn.Module):
    """A layer called only when every sample of the block has a positive first feature."""

    def __init__(self):
        super().__init__()
        self.a, self.extra = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = self.a(x)
        return self.extra(h) if bool(x[:, 0].gt(0).all()) else h


def test_influence_does_not_depend_on_test_blocks_when_a_layer_is_skipped():
    torch.manual_seed(13)
    model = Branchy().double().eval()
    x, y = torch.randn(40, 4, dtype=torch.float64).abs(), torch.randint(0, 3, (40,))
    xt, yt = torch.tensor([[-1.0, 0.2, 0.3, 0.4], [1.0, -0.5, 0.1, 0.9]], dtype=torch.float64), torch.tensor([0, 1])
    inf = Influence(model, F.cross_entropy, fisher="empirical", block_size=1).fit(x, y)
    one = inf.scores(x[:5], y[:5], xt, yt, test_block_size=1)
    torch.testing.assert_close(inf.scores(x[:5], y[:5], xt, yt, test_block_size=2), one, **F64)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_influence_blocks_of_temporaries_do_not_change_scores(monkeypatch, strategy):
    """The 64 MiB blocks of precondition, score and the eigenvalue pass, forced to a few elements."""
    from indivgrad_cuda.attribution import curvature

    for kind in ("mlp", "seq"):
        model, fit, train, test = setup(kind, seed=14)
        want = Influence(model, F.cross_entropy, strategy=strategy, fisher="empirical").fit(*fit).scores(*train, *test)
        monkeypatch.setattr(curvature, "BLOCK_ELEMENTS", 40)
        got = Influence(model, F.cross_entropy, strategy=strategy, fisher="empirical").fit(*fit).scores(*train, *test)
        monkeypatch.undo()
        torch.testing.assert_close(got, want, **F64)


def test_states_load_into_the_model_dtype(tmp_path):
    model, fit, train, test = setup("seq", seed=15)
    inf = Influence(model, F.cross_entropy).fit(*fit)
    trak = TRAK(model, proj_dim=10)
    trak.featurize(*train)
    single = copy.deepcopy(model).float()
    loaded = Influence(single, F.cross_entropy)
    loaded.load_state_dict(inf.state_dict())
    want = inf.scores(*train, *test)
    torch.testing.assert_close(loaded.scores(*train, *test).double(), want, rtol=0, atol=1e-4 * want.abs().max().item())
    t32 = TRAK(single, proj_dim=10)
    t32.load_state_dict(trak.state_dict())
    assert t32.scores(*test).dtype == torch.float32


def test_errors_name_the_argument():
    model, fit, train, test = setup("mlp", n_train=6)
    inf = Influence(model, F.cross_entropy).fit(*fit)
    with pytest.raises(ValueError, match=r"^test_block_size"):
        inf.scores(*train, *test, test_block_size=0)
    with pytest.raises(ValueError, match=r"^checkpoint: does not fit"):
        TRAK(model, proj_dim=4).featurize(*train, checkpoint={"0.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"^checkpoint: expected a state dict or a path"):
        TRAK(model, proj_dim=4).featurize(*train, checkpoint=3)
    with pytest.raises(ValueError, match="regularization"):
        TRAK(model, proj_dim=4, regularization=0.5).load_state_dict(TRAK(model, proj_dim=4).state_dict())
    with pytest.raises(ValueError, match="at least one test sample"):
        lds(torch.zeros(6, 0), torch.ones(4, 6, dtype=torch.bool), torch.zeros(4, 0))
