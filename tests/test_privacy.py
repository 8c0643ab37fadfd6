"""The DP-SGD step (indivgrad_cuda.privacy) in one process: against a float64 reference from
torch.func per-sample gradients, accumulation, empty steps, Poisson sampling, the
accountant against Opacus's, and every refusal. Across processes: test_privacy_distributed.py."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from indivgrad_cuda.privacy import DPSGD, PoissonBatchSampler, epsilon, poisson_loader
from indivgrad_cuda.privacy.distributed import check_backend
from tests.models import TinyEncoder, token_batch
from tests.reference import dp_sgd_reference, func_module_grads, noise_ref

# max_grad_norm near the median per-sample norm of these models and batches (1.46 to 1.63), so
# each step clips some samples and leaves others as they are (checked where it matters)
SETTINGS = dict(max_grad_norm=1.5, noise_multiplier=1.3, expected_batch_size=6.0, seed=1234)
LR = 0.05


def mlp(device):
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().to(device)


def encoder(device):
    return TinyEncoder(vocab=13, d_model=8, heads=2, layers=1, max_len=9, classes=3).double().to(device).eval()


def mlp_batch(n, device):
    return (torch.randn(n, 5, dtype=torch.float64, device=device),), torch.randint(0, 3, (n,), device=device)


def encoder_batch(n, device):
    ids, mask, labels = token_batch(n, 6, 13, 3, device=device)
    return (ids, mask), labels


MODELS = {"mlp": (mlp, mlp_batch), "encoder": (encoder, encoder_batch)}


def _inputs(t):
    return t[0] if len(t) == 1 else t


def run_dp(model, logical_steps, loss_fn, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dp = DPSGD(model, opt, **{**SETTINGS, **kw})
    stats = []
    for batches in logical_steps:
        for inputs, target in batches[:-1]:
            stats.append(dp.accumulate(_inputs(inputs), target, loss_fn))
        if batches:
            inputs, target = batches[-1]
            stats.append(dp.step(_inputs(inputs), target, loss_fn))
        else:
            assert dp.step() is None
    return dp, stats


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("sizes", [[[6], [5], [7]], [[3, 4], [2, 0, 5], []]], ids=["one_batch", "accumulated"])
def test_step_matches_float64_reference(kind, sizes, device):
    make, batch = MODELS[kind]
    model = make(device)
    steps = [[batch(n, device) for n in sizes_of_step] for sizes_of_step in sizes]
    loss_fn = nn.CrossEntropyLoss()
    want, want_norms, _ = dp_sgd_reference(model, steps, loss_fn, lr=LR, **SETTINGS)
    norms = torch.cat(want_norms)
    clip = SETTINGS["max_grad_norm"]
    assert (norms < clip).any() and (norms > clip).any(), "both sides of min(1, C / norm) must be exercised"
    dp, stats = run_dp(model, steps, loss_fn, dataset_size=60)
    got = dict(model.named_parameters())
    for name, p in want.items():
        torch.testing.assert_close(got[name].detach(), p, rtol=1e-10, atol=1e-12, msg=name)
    nonempty = [s for s in stats if s is not None and len(s.norms)]
    assert len(nonempty) == len(want_norms)
    for s, norms in zip(nonempty, want_norms):
        torch.testing.assert_close(s.norms, norms, rtol=1e-10, atol=1e-12)
    assert dp.steps == len(sizes)
    # one entry per logical step, however many physical batches it accumulated (q = 6 / 60)
    assert dp.history == [(SETTINGS["noise_multiplier"], 0.1, len(sizes))]


def test_step_returns_the_mean_per_sample_loss(device):
    model = mlp(device)
    (x,), y = mlp_batch(9, device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dp = DPSGD(model, opt, **SETTINGS, max_chunk=4)  # three chunks: the loss is still the batch's mean
    want = nn.CrossEntropyLoss(reduction="none")(model(x), y).mean()
    sum_loss = lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum")  # noqa: E731
    for loss_fn, reduction in ((nn.CrossEntropyLoss(), "mean"), (sum_loss, "sum")):
        stats = dp.accumulate(x, y, loss_fn, reduction=reduction)
        torch.testing.assert_close(stats.loss, want)
    per_sample = dp.accumulate(x, y, nn.CrossEntropyLoss(reduction="none"))
    torch.testing.assert_close(per_sample.loss, want)
    empty = dp.accumulate(x[:0], y[:0], nn.CrossEntropyLoss())
    assert empty.norms.shape == (0,) and math.isnan(empty.loss.item())


def test_accumulating_equals_one_batch_without_noise(device):
    """Split or whole, a logical step applies the same update (noise off: nothing random)."""
    (x,), y = mlp_batch(10, device)
    models = [mlp(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    before = models[0][0].weight.detach().clone()
    a = DPSGD(models[0], torch.optim.SGD(models[0].parameters(), lr=LR), **{**SETTINGS, "noise_multiplier": 0.0})
    b = DPSGD(models[1], torch.optim.SGD(models[1].parameters(), lr=LR), **{**SETTINGS, "noise_multiplier": 0.0})
    a.step(x, y, nn.CrossEntropyLoss())
    for n0, n1 in ((0, 3), (3, 3), (3, 10)):
        b.accumulate(x[n0:n1], y[n0:n1], nn.CrossEntropyLoss())
    b.step()
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(models[0][0].weight, before)  # the step did move the weights
    assert a.history == b.history == []  # no sample rate: nothing to account


def test_empty_step_applies_the_noise_alone(device):
    model = mlp(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), **SETTINGS)
    dp.step()
    std = SETTINGS["noise_multiplier"] * SETTINGS["max_grad_norm"]
    for k, (n, p) in enumerate(model.named_parameters()):
        noise = noise_ref(p.shape, std, SETTINGS["seed"], 0, k, p.dtype, p.device)
        torch.testing.assert_close(p.detach(), before[n] - LR * noise / SETTINGS["expected_batch_size"])


def test_frozen_parameters_get_nothing(device):
    model = mlp(device)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    dp = DPSGD(model, opt, **SETTINGS)
    (x,), y = mlp_batch(4, device)
    dp.step(x, y, nn.CrossEntropyLoss())
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None


@pytest.mark.parametrize("clip_groups", [None, "layer"], ids=str)
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_a_nan_sample_is_named_by_its_norm(device, clip_fn, clip_groups):
    """As documented: a sample whose gradient is NaN has NaN norms and makes the sums NaN (as
    in Opacus); the other samples' norms are those of a batch without it."""
    (x,), y = mlp_batch(5, device)
    x[2, 1] = math.nan
    model = mlp(device)
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), **SETTINGS, clip_fn=clip_fn, clip_groups=clip_groups)
    norms = dp.accumulate(x, y, nn.CrossEntropyLoss()).norms
    keep = [0, 1, 3, 4]
    clean = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), **SETTINGS, clip_groups=clip_groups)
    want = clean.accumulate(x[keep], y[keep], nn.CrossEntropyLoss()).norms
    assert norms[2].isnan().all()
    torch.testing.assert_close(norms[keep], want, rtol=1e-12, atol=1e-14)
    dp.step()
    assert all(p.isnan().all() for p in model.parameters())


def test_checkpoint_resumes_the_same_noise(device):
    (x,), y = mlp_batch(5, device)
    model = mlp(device)
    copy = mlp(device)
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), **SETTINGS, dataset_size=60)
    dp.step(x, y, nn.CrossEntropyLoss())
    copy.load_state_dict(model.state_dict())
    resumed = DPSGD(copy, torch.optim.SGD(copy.parameters(), lr=LR), **{**SETTINGS, "seed": 99}, dataset_size=60)
    resumed.load_state_dict(dp.state_dict())
    dp.step(x, y, nn.CrossEntropyLoss())
    resumed.step(x, y, nn.CrossEntropyLoss())
    for a, b in zip(model.parameters(), copy.parameters()):
        assert torch.equal(a, b)
    assert resumed.history == dp.history == [(SETTINGS["noise_multiplier"], 0.1, 2)]
    dp.accumulate(x, y, nn.CrossEntropyLoss())  # mid-step, a checkpoint would leave these sums out
    with pytest.raises(RuntimeError, match=r"state_dict: a logical step is under way"):
        dp.state_dict()
    dp.step()
    assert dp.state_dict()["steps"] == 3


# ---------------------------------------------------------------- the accountant


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_epsilon_equals_opacus(accountant):
    from opacus.accountants import create_accountant

    dp = _dp(noise_multiplier=1.1, expected_batch_size=64, dataset_size=6400)
    theirs = create_accountant(mechanism=accountant)
    changes = accountant != "gdp"  # Opacus's Gaussian accountant takes one noise level only
    for k in range(30):
        if k == 20 and changes:  # a change of noise starts a new entry of the history
            dp.noise_multiplier = 1.5
        dp.step()
        theirs.step(noise_multiplier=dp.noise_multiplier, sample_rate=0.01)
    assert dp.history == ([(1.1, 0.01, 20), (1.5, 0.01, 10)] if changes else [(1.1, 0.01, 30)])
    want = theirs.get_epsilon(delta=1e-5)
    assert dp.epsilon(1e-5, accountant) == pytest.approx(want, rel=1e-9)
    assert 0.1 < want < 50  # a real epsilon, not a degenerate one
    assert epsilon([], 1e-5) == 0.0


def test_epsilon_without_opacus_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    with pytest.raises(ImportError, match=r"indivgrad_cuda\[opacus\]"):
        epsilon([(1.0, 0.01, 5)], 1e-5)


def test_expected_batch_and_sample_rate_given_or_derived():
    assert _dp(expected_batch_size=8, dataset_size=80).sample_rate == 0.1
    assert _dp(expected_batch_size=8).sample_rate is None
    dp = _dp(expected_batch_size=None, sample_rate=0.25, dataset_size=40)
    assert (dp.expected_batch_size, dp.sample_rate) == (10.0, 0.25)
    dp = _dp(expected_batch_size=9, sample_rate=0.25)  # both as given (Opacus rounds the batch down)
    assert (dp.expected_batch_size, dp.sample_rate) == (9.0, 0.25)


def test_epsilon_bad_arguments():
    with pytest.raises(ValueError, match="accountant: expected one of"):
        epsilon([(1.0, 0.01, 5)], 1e-5, "moments")
    with pytest.raises(ValueError, match=r"delta: expected a float in \(0, 1\), got 0.0"):
        epsilon([(1.0, 0.01, 5)], 0.0)
    with pytest.raises(ValueError, match="'gdp' needs one noise multiplier and sample rate throughout"):
        epsilon([(1.0, 0.01, 5), (2.0, 0.01, 5)], 1e-5, "gdp")
    dp = _dp()
    with pytest.raises(ValueError, match="epsilon: needs the sample rate"):
        dp.epsilon(1e-5)


# ---------------------------------------------------------------- Poisson sampling


def test_poisson_sampler_rate_and_determinism():
    sampler = PoissonBatchSampler(2000, 0.03, steps=200, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 200
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    # each size is Binomial(2000, 0.03): mean 60, sd 7.6; the mean of 200 has sd 0.54
    assert abs(sizes.mean().item() - 60) < 3 and 5 < sizes.std().item() < 10.5
    counts = torch.zeros(2000, dtype=torch.float64)
    for b in batches:
        assert len(set(b)) == len(b) and all(0 <= i < 2000 for i in b)
        counts[b] += 1
    # each sample joins each batch independently: its count is Binomial(200, 0.03), variance
    # n·q(1-q) = 5.82; the variance of 2000 such counts has sd about 0.2
    assert abs(counts.var().item() - 200 * 0.03 * 0.97) < 0.8
    assert batches == list(PoissonBatchSampler(2000, 0.03, steps=200, seed=5))
    assert batches != list(PoissonBatchSampler(2000, 0.03, steps=200, seed=6))
    assert PoissonBatchSampler(1000, 0.01).steps == 100


def test_poisson_shards_partition_the_single_process_batch():
    whole = list(PoissonBatchSampler(101, 0.2, steps=5, seed=3))
    for world in (2, 3):
        shards = [list(PoissonBatchSampler(101, 0.2, steps=5, seed=3, rank=r, world_size=world)) for r in range(world)]
        for step, batch in enumerate(whole):
            assert sorted(i for shard in shards for i in shard[step]) == batch


def test_poisson_loader_gives_empty_batches_their_shape():
    ds = torch.utils.data.TensorDataset(torch.randn(30, 4, 2), torch.randint(0, 3, (30,)))
    loader = poisson_loader(ds, 0.02, steps=40, seed=0)
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in loader]
    assert ((0, 4, 2), (0,)) in shapes and any(s[0][0] > 0 for s in shapes)
    assert loader.batch_sampler.expected_batch_size == pytest.approx(0.6)
    spawned = poisson_loader(ds, 0.02, steps=40, seed=0, num_workers=2, multiprocessing_context="spawn")
    assert [(tuple(x.shape), tuple(y.shape)) for x, y in spawned] == shapes  # workers: the same batches


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0, sample_rate=0.1), "num_samples: expected a positive int, got 0"),
        (dict(num_samples=10, sample_rate=0.0), r"sample_rate: expected a number in \(0, 1\], got 0.0"),
        (dict(num_samples=10, sample_rate=0.1, steps=0), "steps: expected a positive int or None, got 0"),
        (dict(num_samples=10, sample_rate=0.1, rank=2, world_size=2), "expected 0 <= rank < world_size, got 2, 2"),
    ],
)
def test_poisson_sampler_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoissonBatchSampler(**kwargs)


# ---------------------------------------------------------------- refusals


def _dp(model=None, **kw):
    model = model if model is not None else mlp("cpu")
    opt = kw.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=LR)
    return DPSGD(model, opt, **{**dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8), **kw})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_grad_norm=0.0), "max_grad_norm: expected a finite number > 0, got 0.0"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm: expected a finite number > 0, got inf"),
        (dict(noise_multiplier=-0.5), "noise_multiplier: expected a finite number >= 0, got -0.5"),
        (dict(expected_batch_size=0), "expected_batch_size: expected a number > 0, got 0"),
        (
            dict(expected_batch_size=None),
            "expected_batch_size: expected a number > 0, or sample_rate with dataset_size",
        ),
        (dict(expected_batch_size=None, sample_rate=0.1), "or sample_rate with dataset_size; got sample_rate alone"),
        (dict(expected_batch_size=None, dataset_size=10), "got dataset_size alone"),
        (dict(sample_rate=0.1, dataset_size=100), "give two of them"),
        (
            dict(expected_batch_size=None, sample_rate=1.5, dataset_size=10),
            r"sample_rate: expected a number in \(0, 1\]",
        ),
        (dict(expected_batch_size=20, dataset_size=10), "expected_batch_size: 20 is more than dataset_size"),
        (dict(dataset_size=0), "dataset_size: expected a positive int, got 0"),
        (dict(seed=-1), "seed: expected an int >= 0 or None, got -1"),
        (dict(capture="magic"), "capture: expected one of"),
        (dict(process_group=object()), "process_group: given, but torch.distributed is not initialised"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dp(**kwargs)


def test_optimizer_must_update_exactly_the_trainable_parameters():
    model = mlp("cpu")
    with pytest.raises(ValueError, match=r"optimizer: does not update the model's trainable parameters \['2.bias'\]"):
        _dp(model, optimizer=torch.optim.SGD(list(model.parameters())[:3], lr=LR))
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="optimizer: updates 1 tensor"):
        _dp(model, optimizer=torch.optim.SGD([*model.parameters(), stray], lr=LR))
    with pytest.raises(TypeError, match=r"optimizer: expected a torch\.optim\.Optimizer, got list"):
        DPSGD(model, [], noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)


def test_trainable_set_fixed_within_a_logical_step():
    model = mlp("cpu")
    dp = _dp(model)
    (x,), y = mlp_batch(3, "cpu")
    dp.accumulate(x, y, nn.CrossEntropyLoss())
    model[2].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="the trainable parameters changed within a logical step"):
        dp.accumulate(x, y, nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="the trainable parameters changed within a logical step"):
        dp.step()
    model[2].bias.requires_grad_(True)
    dp.step()  # as it was: the step goes on


def test_step_with_inputs_needs_a_loss():
    dp = _dp()
    with pytest.raises(TypeError, match="loss_fn: needed with inputs"):
        dp.step(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "config, device, match",
    [
        ("gloo", "cpu", None),
        ("cpu:gloo,cuda:nccl", "cpu", None),
        ("cpu:gloo,cuda:nccl", "cuda", None),
        (
            "nccl",
            "cpu",
            "the model is on cpu, whose tensors need the gloo or mpi backend, but the group's backends are 'nccl'",
        ),
        ("cuda:nccl", "cpu", "need the gloo or mpi backend"),
        (
            "gloo",
            "cuda",
            "the model is on cuda, whose tensors need the nccl backend, but the group's backends are 'gloo'",
        ),
        ("cpu:gloo,cuda:gloo", "cuda", "need the nccl backend"),
        ("gloo", "meta", "supports models on"),
    ],
)
def test_backend_must_serve_the_device(config, device, match):
    if match is None:
        check_backend(config, torch.device(device))
    else:
        with pytest.raises(ValueError, match=match):
            check_backend(config, torch.device(device))


def test_reference_is_independent_of_the_engine():
    """The reference (tests/reference.py) imports nothing of indivgrad_cuda, and its per-sample
    gradients are each sample's own: equal to autograd on that sample alone, and different
    between samples (so the comparisons above can fail)."""
    import ast

    import tests.reference

    tree = ast.parse(Path(tests.reference.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.startswith("indivgrad_cuda")], imported
    model = mlp("cpu")
    (x,), y = mlp_batch(3, "cpu")
    grads = func_module_grads(model, x, y, nn.CrossEntropyLoss())
    names, params = zip(*model.named_parameters())
    for n in range(3):
        loss = nn.CrossEntropyLoss()(model(x[n : n + 1]), y[n : n + 1])
        for name, g in zip(names, torch.autograd.grad(loss, params)):
            torch.testing.assert_close(grads[name][n], g, rtol=1e-12, atol=1e-14, msg=name)
    assert not torch.allclose(grads["0.weight"][0], grads["0.weight"][1])
