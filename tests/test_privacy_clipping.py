"""Clipping variants (issue 30): ``clip_fn`` x ``clip_groups`` in the engine's clipped sum and
in DPSGD, against float64 torch.func per-sample gradients clipped by the reference; the
per-layer groups clipped as each layer's gradient arrives; adaptive clipping's threshold
trajectory and accounting; the noise drawn shard by shard; the lazy ``ig.privacy``; and
every refusal."""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import indivgrad_cuda as ig
from indivgrad_cuda import randomness
from indivgrad_cuda.privacy import DPSGD, AdaptiveClipping, accounting
from indivgrad_cuda.reducers.clipped_sum import ClippedSumReducer
from tests.models import TinyEncoder, token_batch
from tests.reference import clipped_sum_ref, dp_sgd_reference, func_module_grads, noise_ref

F64 = dict(rtol=1e-10, atol=1e-12)
CLIP_FNS = ["abadi", "automatic"]
GROUPINGS = [None, "layer", "param", "halves"]  # "halves": a list of two groups that cut across layers


class TiedLM(nn.Module):
    """An Embedding whose weight is also the output layer's (a tied parameter in a group)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.ln(self.emb(ids))).mean(1)


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def encoder():
    return TinyEncoder(vocab=13, d_model=8, heads=2, layers=1, max_len=9, classes=3).double().eval()


def batch(kind, n, generator=None):
    if kind.startswith("mlp"):
        return torch.randn(n, 5, dtype=torch.float64, generator=generator), torch.randint(
            0, 3, (n,), generator=generator
        )
    if kind == "tied":
        return torch.randint(0, 11, (n, 4), generator=generator), torch.randint(0, 11, (n,), generator=generator)
    ids, mask, labels = token_batch(n, 6, 13, 3, generator=generator)
    return (ids, mask), labels


# kind -> (model factory, engine options); "mlp" runs the native capture, the others hooks
MODELS = {
    "mlp": (mlp, {}),
    "mlp_hooks": (mlp, {"capture": "hooks"}),
    "encoder": (encoder, {}),
    "tied": (lambda: TiedLM().double(), {}),
}


def groups_for(names, grouping):
    return [names[0::2], names[1::2]] if grouping == "halves" else grouping


def ref_grads(model, inputs, target):
    return func_module_grads(model, inputs, target, nn.CrossEntropyLoss())


@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
@pytest.mark.parametrize("clip_fn", CLIP_FNS)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_clipped_sum_matches_reference(kind, clip_fn, grouping):
    make, options = MODELS[kind]
    torch.manual_seed(0)
    model = make()
    inputs, target = batch(kind, 7)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = ig.PerSampleGrads(model, max_chunk=3, **options)  # three chunks: each group's sums accumulate
    groups = engine.clip_groups(groups_for(names, grouping))
    if kind == "mlp":
        assert engine._native is not None and engine._native.applies(inputs)
    grads = ref_grads(model, inputs, target)
    _, norms = clipped_sum_ref(grads, 1.0, groups=groups)
    # the threshold at the median of the groups' norms: some parts clipped, others not
    max_norm = norms.flatten().median().item() * math.sqrt(len(groups))
    want_sums, want_norms = clipped_sum_ref(grads, max_norm, clip_fn, 0.05, None if grouping is None else groups)
    got = engine.clipped_grad_sum(
        inputs,
        target,
        nn.CrossEntropyLoss(),
        max_norm,
        clip_fn=clip_fn,
        stability=0.05,
        clip_groups=groups_for(names, grouping),
    )
    assert got.shape == ((7,) if grouping is None else (7, len(groups)))
    torch.testing.assert_close(got, want_norms, **F64)
    params = dict(model.named_parameters())
    for name, want in want_sums.items():
        torch.testing.assert_close(params[name].grad, want, **F64, msg=name)


def test_clip_groups_named():
    model = TiedLM()
    engine = ig.PerSampleGrads(model)
    assert engine.clip_groups(None) == [["emb.weight", "ln.weight", "ln.bias", "head.bias"]]
    assert engine.clip_groups("layer") == [["emb.weight"], ["ln.weight", "ln.bias"], ["head.bias"]]
    assert engine.clip_groups("param") == [["emb.weight"], ["ln.weight"], ["ln.bias"], ["head.bias"]]
    model.ln.bias.requires_grad_(False)  # frozen parameters are in no group
    assert engine.clip_groups("layer") == [["emb.weight"], ["ln.weight"], ["head.bias"]]


def test_layer_groups_clip_as_each_layer_arrives(monkeypatch):
    """With a group per layer each layer's sums are formed in its visit, during the backward:
    no layer's factors wait for the others (nothing is left for the end of the chunk)."""
    events = []
    visit, flush, end = ClippedSumReducer.visit, ClippedSumReducer._flush, ClippedSumReducer.end_chunk

    def logged(name, f):
        def run(self, *args):
            events.append(name)
            return f(self, *args)

        return run

    monkeypatch.setattr(ClippedSumReducer, "visit", logged("visit", visit))
    monkeypatch.setattr(ClippedSumReducer, "_flush", logged("flush", flush))
    monkeypatch.setattr(ClippedSumReducer, "end_chunk", logged("end", end))
    model = encoder()
    inputs, target = batch("encoder", 5)
    engine = ig.PerSampleGrads(model)
    engine.clipped_grad_sum(inputs, target, nn.CrossEntropyLoss(), 1.0, clip_groups="layer")
    layers = len(engine._layers())
    assert events == ["visit", "flush"] * layers + ["end"], events
    events.clear()
    engine.clipped_grad_sum(inputs, target, nn.CrossEntropyLoss(), 1.0)  # flat: all after the last layer's norms
    assert events == ["visit"] * (layers - 1) + ["visit", "flush", "end"], events


class SharedPositions(nn.Module):
    """Positions passed as one row [1, T] shared by the batch, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(13, 6)
        self.pos = nn.Embedding(6, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids, mask=None):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])
        return self.head(self.ln(h).mean(1))


@pytest.mark.parametrize("make", [encoder, lambda: SharedPositions().double()], ids=["encoder", "shared_positions"])
@pytest.mark.parametrize("n", [5, 0])
def test_sums_handed_over_layer_by_layer(n, make):
    """The sharded step's path (a sink instead of p.grad): flat clipping still hands each
    layer's sums over on their own (one layer's full-size sums in memory at a time), all equal
    to the reference; an empty batch runs its forward (a [1, T] input shared by the batch
    included) and hands over zeros."""
    torch.manual_seed(4)
    model = make()
    inputs, target = batch("encoder", max(n, 1))
    inputs, target = tuple(t[:n] for t in inputs), target[:n]
    engine = ig.PerSampleGrads(model)
    layers = {layer.path: set(layer.names.values()) for layer in engine._layers()}
    handed, calls = {}, []

    def sink(sums):
        calls.append(set(sums))
        handed.update({k: v.clone() for k, v in sums.items()})

    options = dict(reduction="mean", clip_fn="abadi", stability=0.01, clip_groups=None)
    norms = engine._clipped_sum_into(inputs, target, nn.CrossEntropyLoss(), 1.0, sink, **options)
    assert all(any(names == owned for owned in layers.values()) for names in calls), calls
    assert len(calls) == len(layers) and set(handed) == {name for name, _ in model.named_parameters()}
    if n == 0:
        assert norms.shape == (0,) and all(not g.any() for g in handed.values())
        return
    want, want_norms = clipped_sum_ref(ref_grads(model, inputs, target), 1.0)
    torch.testing.assert_close(norms, want_norms, **F64)
    for name, g in handed.items():
        torch.testing.assert_close(g, want[name], **F64, msg=name)


# ---------------------------------------------------------------- DPSGD


def steps_of(kind, sizes, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [[batch(kind, n, g) for n in step] for step in sizes]


def as_tuple(inputs):
    return inputs if isinstance(inputs, tuple) else (inputs,)


def run_dpsgd(model, steps, options=None, **kw):
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.05), **kw, **(options or {}))
    thresholds, stats = [], []
    for physical in steps:
        thresholds.append(dp.max_grad_norm)
        for inputs, target in physical[:-1]:
            stats.append(dp.accumulate(inputs, target, nn.CrossEntropyLoss()))
        stats.append(dp.step(*physical[-1], nn.CrossEntropyLoss()))
    return dp, thresholds, stats


@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
@pytest.mark.parametrize("clip_fn", CLIP_FNS)
@pytest.mark.parametrize("kind", ["mlp", "encoder"])
def test_dpsgd_matches_reference(kind, clip_fn, grouping):
    """Noise on, two logical steps of two physical batches each (one empty)."""
    make, options = MODELS[kind]
    torch.manual_seed(1)
    model = make()
    names = [n for n, _ in model.named_parameters()]
    steps = steps_of(kind, [[4, 3], [0, 5]])
    settings = dict(max_grad_norm=1.2, noise_multiplier=0.7, expected_batch_size=6.0, seed=31)
    groups = ig.PerSampleGrads(model).clip_groups(groups_for(names, grouping))
    ref_steps = [[(as_tuple(i), t) for i, t in physical] for physical in steps]
    want, want_norms, _ = dp_sgd_reference(
        model,
        ref_steps,
        nn.CrossEntropyLoss(),
        lr=0.05,
        clip_fn=clip_fn,
        stability=0.01,
        groups=None if grouping is None else groups,
        **settings,
    )
    dp, _, stats = run_dpsgd(
        model, steps, options, clip_fn=clip_fn, clip_groups=groups_for(names, grouping), **settings
    )
    assert dp.groups == groups
    got = dict(model.named_parameters())
    for name, p in want.items():
        torch.testing.assert_close(got[name].detach(), p, **F64, msg=name)
    nonempty = [s.norms for s in stats if len(s.norms)]
    for got_norms, norms in zip(nonempty, want_norms, strict=True):
        torch.testing.assert_close(got_norms, norms, **F64)


@pytest.mark.cuda
@pytest.mark.parametrize("grouping", ["layer", "halves"])
@pytest.mark.parametrize("kind", ["mlp", "encoder"])
def test_graphed_groups_equal_eager(kind, grouping):
    """CUDA graphs (the native MLP's and the hooks capture's) replayed with clip groups: each
    call equal to the eager engine's, with the allocator's cache emptied between calls (a
    graph must not read a buffer of an earlier call)."""
    make, options = MODELS[kind]
    torch.manual_seed(5)
    model = make().cuda()
    names = [n for n, _ in model.named_parameters()]
    graphed, eager = (ig.PerSampleGrads(model, cuda_graphs=g, **options) for g in (True, False))
    for step in range(3):
        inputs, target = batch(kind, 6, torch.Generator().manual_seed(step))
        inputs = tuple(t.cuda() for t in inputs) if isinstance(inputs, tuple) else inputs.cuda()
        target = target.cuda()
        got = {}
        for engine in (graphed, eager):
            norms = engine.clipped_grad_sum(
                inputs, target, nn.CrossEntropyLoss(), 0.8, clip_groups=groups_for(names, grouping)
            )
            got[engine] = (norms.clone(), {n: p.grad.clone() for n, p in model.named_parameters()})
            torch.cuda.empty_cache()
        torch.testing.assert_close(got[graphed][0], got[eager][0])
        for name in names:
            torch.testing.assert_close(got[graphed][1][name], got[eager][1][name], msg=name)


def test_adaptive_clipping_turns_cuda_graphs_off_by_default():
    model = mlp()
    settings = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=64)
    adaptive = AdaptiveClipping(target_quantile=0.5)
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings, adaptive_clipping=adaptive)
    assert dp.engine._native.graphs is None and dp.engine._hooks.graphs is None
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)
    assert dp.engine._native.graphs is not None


ADAPTIVE = dict(target_quantile=0.4, learning_rate=0.3, count_noise_std=2.0)


@pytest.mark.parametrize("grouping", [None, "layer"], ids=str)
@pytest.mark.parametrize("kind", ["mlp", "encoder"])
def test_adaptive_threshold_trajectory(kind, grouping):
    make, options = MODELS[kind]
    torch.manual_seed(2)
    model = make()
    steps = steps_of(kind, [[6], [3, 4], [7], [5], [6]], seed=9)
    settings = dict(max_grad_norm=0.5, noise_multiplier=1.1, expected_batch_size=6.0, seed=4)
    groups = ig.PerSampleGrads(model).clip_groups(grouping)
    ref_steps = [[(as_tuple(i), t) for i, t in physical] for physical in steps]
    want, _, want_thresholds = dp_sgd_reference(
        model,
        ref_steps,
        nn.CrossEntropyLoss(),
        lr=0.05,
        groups=None if grouping is None else groups,
        adaptive=ADAPTIVE,
        **settings,
    )
    dp, thresholds, _ = run_dpsgd(
        model, steps, options, clip_groups=grouping, adaptive_clipping=AdaptiveClipping(**ADAPTIVE), **settings
    )
    assert len(set(want_thresholds)) == len(want_thresholds), "the threshold moves at every step"
    torch.testing.assert_close(torch.tensor(thresholds), torch.tensor(want_thresholds), rtol=1e-12, atol=0)
    got = dict(model.named_parameters())
    for name, p in want.items():
        torch.testing.assert_close(got[name].detach(), p, **F64, msg=name)
    z, s = settings["noise_multiplier"], ADAPTIVE["count_noise_std"]
    assert dp.gradient_noise_multiplier == pytest.approx((z**-2 - (2 * s) ** -2) ** -0.5, rel=1e-15)
    assert dp.gradient_noise_multiplier > z


def test_adaptive_threshold_follows_the_quantile():
    """Without noise, the threshold settles near the target quantile of the norms."""
    torch.manual_seed(3)
    model = mlp()
    x, y = batch("mlp", 64, torch.Generator().manual_seed(0))
    adaptive = AdaptiveClipping(target_quantile=0.3, learning_rate=0.5)
    dp = DPSGD(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),  # the model stays put: the norms' quantile is fixed
        noise_multiplier=0.0,
        max_grad_norm=10.0,
        expected_batch_size=64.0,
        adaptive_clipping=adaptive,
    )
    for _ in range(60):
        stats = dp.step(x, y, nn.CrossEntropyLoss())
    fraction = (stats.norms + 1e-6 <= dp.max_grad_norm).double().mean().item()
    assert abs(fraction - 0.3) <= 0.05, (fraction, dp.max_grad_norm)


def test_adaptive_accounting():
    """The history holds the noise multiplier the gradient's and the count's noise amount to:
    RDP (exact for composed Gaussians without subsampling) of the two mechanisms composed
    equals that of one Gaussian of the accounted multiplier."""
    z, s, steps = 1.1, 2.0, 7
    model = mlp()
    adaptive = AdaptiveClipping(target_quantile=0.5, count_noise_std=s)
    dp = DPSGD(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        noise_multiplier=z,
        max_grad_norm=1.0,
        sample_rate=0.1,
        dataset_size=60,
        adaptive_clipping=adaptive,
    )
    x, y = batch("mlp", 6)
    for _ in range(steps):
        dp.step(x, y, nn.CrossEntropyLoss())
    assert dp.history == [(z, 0.1, steps)]
    assert dp.epsilon(1e-5, "rdp") == accounting.epsilon([(z, 0.1, steps)], 1e-5, "rdp")
    z_grad = dp.gradient_noise_multiplier
    composed = accounting.epsilon([(z_grad, 1.0, steps), (2 * s, 1.0, steps)], 1e-5, "rdp")
    assert composed == pytest.approx(accounting.epsilon([(z, 1.0, steps)], 1e-5, "rdp"), rel=1e-9)


# ---------------------------------------------------------------- the noise


@pytest.mark.parametrize("shape", [(3000, 700), (5,), (2, 3), ()], ids=str)
def test_noise_shards_assemble_into_the_whole(shape):
    """Drawn whole or by shards of rows (any split, empty shards included), the noise is the
    same numbers: the documented blocks (noise_ref), several of them for the large shape."""
    g = torch.Generator()
    whole = randomness.noise_rows(shape, (0, shape[0] if shape else 1), 0.7, 11, 3, 2, torch.float64, "cpu", g)
    torch.testing.assert_close(whole, noise_ref(shape, 0.7, 11, 3, 2, torch.float64, "cpu"), rtol=0, atol=0)
    rows = shape[0] if shape else 1
    for cuts in ([0, rows // 3, rows // 3, rows], [0, 1, rows], [0, rows, rows]):
        parts = [
            randomness.noise_rows(shape, (a, b), 0.7, 11, 3, 2, torch.float64, "cpu", g) for a, b in zip(cuts, cuts[1:])
        ]
        assert torch.equal(torch.cat([p.reshape(-1, *shape[1:]) for p in parts]).reshape(shape), whole)
    other = randomness.noise_rows(shape, (0, rows), 0.7, 11, 4, 2, torch.float64, "cpu", g)
    assert shape == () or not torch.equal(other, whole)  # another step, other numbers


# ---------------------------------------------------------------- ig.privacy, refusals


def test_privacy_and_opacus_are_lazy_attributes():
    code = (
        "import sys; import indivgrad_cuda as ig; "
        "assert 'indivgrad_cuda.privacy' not in sys.modules and 'opacus' not in sys.modules; "
        "assert ig.privacy.DPSGD is sys.modules['indivgrad_cuda.privacy'].DPSGD; "
        "assert 'opacus' not in sys.modules; "
        "assert ig.opacus.__name__ == 'indivgrad_cuda.opacus' and 'opacus' in sys.modules; "
        "assert 'privacy' in dir(ig)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="module 'indivgrad_cuda' has no attribute 'privat'"):
        ig.privat  # noqa: B018


def _engine_call(**kw):
    model = mlp()
    x, y = batch("mlp", 4)
    return ig.PerSampleGrads(model).clipped_grad_sum(x, y, nn.CrossEntropyLoss(), 1.0, **kw)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(clip_fn="flat"), ValueError, r"clip_fn: expected one of \('abadi', 'automatic'\), got 'flat'"),
        (dict(clip_fn="automatic", stability=0), ValueError, "stability: expected a number > 0, got 0"),
        (dict(stability=-1.0), ValueError, "stability: expected a number > 0, got -1.0"),
        (dict(clip_groups="module"), ValueError, "clip_groups: expected None, one of"),
        (dict(clip_groups=["0.weight"]), TypeError, "clip_groups: expected None, one of"),
        (
            dict(clip_groups=[["0.weight", "0.bias"], ["2.weight"]]),
            ValueError,
            r"clip_groups: every trainable parameter must be in exactly one group; missing \['2.bias'\]",
        ),
        (
            dict(clip_groups=[["0.weight", "0.bias", "2.bias"], ["2.weight", "0.bias"]]),
            ValueError,
            r"repeated \['0.bias'\]",
        ),
        (
            dict(clip_groups=[["0.weight", "0.bias", "2.bias"], ["2.weight", "3.weight"]]),
            ValueError,
            r"not trainable parameters of the model \['3.weight'\]",
        ),
        (
            dict(clip_groups=[["0.weight", "0.bias", "2.bias", "2.weight"], []]),
            ValueError,
            r"empty groups at \[1\]",
        ),
    ],
)
def test_bad_clipping_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _engine_call(**kwargs)
    model = mlp()
    with pytest.raises(error, match=match):
        DPSGD(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            **kwargs,
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_quantile=0.0), r"target_quantile: expected a number in \(0, 1\), got 0.0"),
        (dict(target_quantile=1), r"target_quantile: expected a number in \(0, 1\), got 1"),
        (dict(target_quantile=None), r"target_quantile: expected a number in \(0, 1\), got None"),
        (dict(target_quantile=0.5, learning_rate=0), "learning_rate: expected a finite number > 0, got 0"),
        (dict(target_quantile=0.5, count_noise_std=-1.0), "count_noise_std: expected a finite number > 0 or None"),
        (
            dict(target_quantile=0.5, min_norm=2.0, max_norm=1.0),
            "min_norm, max_norm: expected 0 <= min_norm < max_norm",
        ),
    ],
)
def test_bad_adaptive_clipping(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveClipping(**kwargs)


def test_adaptive_clipping_refusals():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
    with pytest.raises(TypeError, match=r"adaptive_clipping: expected an indivgrad_cuda\.privacy\.AdaptiveClipping"):
        DPSGD(model, opt, **settings, adaptive_clipping=0.5)
    with pytest.raises(ValueError, match="adaptive_clipping: clip_fn='automatic' rescales every sample's gradient"):
        DPSGD(model, opt, **settings, clip_fn="automatic", adaptive_clipping=AdaptiveClipping(0.5))
    # the paper's default sigma_b = 8 / 20 = 0.4: 2 sigma_b = 0.8 <= 1.0 leaves the gradient no budget
    with pytest.raises(ValueError, match=r"count_noise_std: adaptive clipping needs 2 \* count_noise_std > noise_mult"):
        DPSGD(model, opt, **settings, adaptive_clipping=AdaptiveClipping(0.5))
    bounded = AdaptiveClipping(0.5, count_noise_std=4.0, min_norm=0.5, max_norm=2.0)
    for start in (0.25, 3.0):  # the first threshold outside the bounds the updates keep
        with pytest.raises(ValueError, match=r"max_grad_norm: with adaptive clipping .* \[0\.5, 2\.0\], got"):
            DPSGD(model, opt, **{**settings, "max_grad_norm": start}, adaptive_clipping=bounded)
    for start in (0.5, 2.0):  # at the bounds: accepted
        dp = DPSGD(model, opt, **{**settings, "max_grad_norm": start}, adaptive_clipping=bounded)
    state = {**dp.state_dict(), "max_grad_norm": 2.5, "steps": 7}  # a checkpoint of other bounds
    with pytest.raises(ValueError, match=r"state\['max_grad_norm'\]: with adaptive clipping .* got 2\.5"):
        dp.load_state_dict(state)
    assert dp.steps == 0 and dp.max_grad_norm == 2.0  # nothing loaded
