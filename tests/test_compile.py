"""torch.compile'd models: the engine serves the wrapped module (``_orig_mod``) eagerly, never
through TorchDynamo, and keys every result like the compiled module's ``named_parameters()``
(``_orig_mod.<name>``). Per-sample gradients, norms, clipped sums and inner products of a
compiled MLP (native capture) and a compiled transformer (hooks capture) equal the uncompiled
model's and float64 torch.func's; the one-shot functions and DPSGD take compiled models too."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import indivgrad_cuda as ig
from indivgrad_cuda import compiled as compiled_mod
from indivgrad_cuda.privacy import DPSGD
from tests.conftest import TOL
from tests.models import TinyEncoder, token_batch
from tests.reference import clipped_sum_ref, func_module_grads

F64 = TOL[torch.float64]
P = "_orig_mod."


def mlp(device):
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().to(device)


def mlp_batch(device):
    return torch.randn(6, 5, dtype=torch.float64, device=device), torch.randint(0, 3, (6,), device=device)


def encoder(device):
    return TinyEncoder(vocab=13, d_model=8, heads=2, layers=2, max_len=9, classes=3).double().to(device).eval()


def encoder_batch(device):
    ids, mask, labels = token_batch(5, 9, 13, 3, device=device)
    return (ids, mask), labels


MODELS = {"mlp": (mlp, mlp_batch, "0"), "encoder": (encoder, encoder_batch, "blocks.0.attn.qkv")}  # and a Linear's path


def prefixed(d, prefix=P):
    return {prefix + k: v for k, v in d.items()}


def assert_same(got, ref, tol=None):
    assert list(got) == list(ref)
    for name in ref:
        if tol is None:
            assert torch.equal(got[name], ref[name]), name
        else:
            torch.testing.assert_close(got[name], ref[name], **tol, msg=name)


def frames():
    return counters["frames"]["total"]


@pytest.mark.parametrize("kind", list(MODELS))
def test_compiled_equals_uncompiled_and_float64(kind, device):
    make, batch, layer = MODELS[kind]
    model = make(device)
    inputs, target = batch(device)
    loss = F.cross_entropy
    compiled = torch.compile(model, backend="eager")
    names = [n for n, _ in compiled.named_parameters()]
    assert names == [P + n for n, _ in model.named_parameters()]
    before = frames()
    engine = ig.PerSampleGrads(compiled)
    plain = ig.PerSampleGrads(copy.deepcopy(model))
    assert (engine._native is not None) == (kind == "mlp")  # the MLP still runs natively
    # keyed like the compiled module's named_parameters(), the layers' paths its named_modules() names
    described = engine.describe()
    assert list(described) == names
    assert described == {P + n: how.replace(" '", f" '{P}") for n, how in plain.describe().items()}
    assert described[P + layer + ".weight"] == f"rule (Linear '{P}{layer}')"

    ref = prefixed(func_module_grads(model, inputs, target, loss))
    grads = {k: v.clone() for k, v in engine(inputs, target, loss).items()}
    assert_same(grads, prefixed(plain(inputs, target, loss)))
    assert_same(grads, ref, F64)

    _, ref_norms = clipped_sum_ref(ref, 1.0)
    norms, per_param = engine.norms(inputs, target, loss, per_param=True)
    plain_norms, plain_per_param = plain.norms(inputs, target, loss, per_param=True)
    assert torch.equal(norms, plain_norms)
    assert_same(per_param, prefixed(plain_per_param))
    torch.testing.assert_close(norms, ref_norms, **F64)

    max_norm = ref_norms.median().item()  # clips about half the samples
    ref_sum, _ = clipped_sum_ref(ref, max_norm)
    torch.testing.assert_close(engine.clipped_grad_sum(inputs, target, loss, max_norm), ref_norms, **F64)
    got_sum = {n: p.grad.clone() for n, p in compiled.named_parameters()}
    assert_same(got_sum, ref_sum, F64)
    plain.clipped_grad_sum(inputs, target, loss, max_norm)
    assert_same(got_sum, prefixed({n: p.grad for n, p in plain.model.named_parameters()}))

    other_inputs, other_target = batch(device)
    k = engine.inner_products(inputs, target, other_inputs, other_target, loss)
    assert torch.equal(k, plain.inner_products(inputs, target, other_inputs, other_target, loss))
    ref_other = prefixed(func_module_grads(model, other_inputs, other_target, loss))
    ref_k = sum(ref[n].flatten(1) @ ref_other[n].flatten(1).T for n in ref)
    torch.testing.assert_close(k, ref_k, **F64)

    assert frames() == before, "the engine ran the model through TorchDynamo"
    # the compiled model still runs compiled, and as before (no hook of the engine left on it)
    eager_out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    out = compiled(*inputs) if isinstance(inputs, tuple) else compiled(inputs)
    assert frames() > before
    torch.testing.assert_close(out, eager_out, **F64)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize(
    "options",
    [dict(backend="aot_eager"), dict(backend="eager", fullgraph=True), {}],
    ids=["aot_eager", "fullgraph", "inductor"],
)
def test_backends_and_one_shot_functions(kind, options):
    """Any backend and fullgraph: the engine does not run the compiled forward, so none is
    compiled here (inductor's first call takes a minute on a 2-core CPU)."""
    make, batch, _ = MODELS[kind]
    model = make("cpu")
    inputs, target = batch("cpu")
    compiled = torch.compile(model, **options)
    before = frames()
    ref = prefixed(func_module_grads(model, inputs, target, F.cross_entropy))
    assert_same(ig.per_sample_grads(compiled, inputs, target, F.cross_entropy), ref, F64)
    _, ref_norms = clipped_sum_ref(ref, 1.0)
    torch.testing.assert_close(ig.per_sample_grad_norms(compiled, inputs, target, F.cross_entropy), ref_norms, **F64)
    ref_sum, _ = clipped_sum_ref(ref, 1.0)
    ig.clipped_grad_sum(compiled, inputs, target, F.cross_entropy, 1.0)
    assert_same({n: p.grad for n, p in compiled.named_parameters()}, ref_sum, F64)
    assert frames() == before


def test_forced_captures():
    model = mlp("cpu")
    x, y = mlp_batch("cpu")
    compiled = torch.compile(model, backend="eager")
    ref = prefixed(func_module_grads(model, x, y, F.cross_entropy))
    for capture in ("native", "hooks"):
        engine = ig.PerSampleGrads(compiled, capture=capture)
        assert list(engine.describe()) == [n for n, _ in compiled.named_parameters()] == list(ref)
        assert_same(engine(x, y, F.cross_entropy), ref, F64)


def test_train_and_eval_mode_follow_the_compiled_model():
    """The stand-in the hooks capture runs reads the wrapped module's mode."""
    model = encoder("cpu")
    compiled = torch.compile(model, backend="eager")
    stand_in = compiled_mod.eager(compiled)
    assert stand_in is not compiled and stand_in._orig_mod is model and not stand_in.training
    compiled.train()
    assert stand_in.training and model.training
    compiled.eval()
    assert not stand_in.training
    assert compiled_mod.eager(model) is model  # an uncompiled model is served as it is
    seq = compiled_mod.eager(torch.compile(mlp("cpu"), backend="eager"), sequential=True)
    assert type(seq) is nn.Sequential and list(seq._modules) == ["_orig_mod"]


@pytest.mark.parametrize("kind", list(MODELS))
def test_dp_sgd_on_a_compiled_model(kind):
    make, batch, _ = MODELS[kind]
    models = [make("cpu"), None]
    models[1] = copy.deepcopy(models[0])
    steps = [batch("cpu") for _ in range(2)]
    finals = []
    for i, model in enumerate(models):
        served = torch.compile(model, backend="eager") if i == 0 else model
        opt = torch.optim.SGD(served.parameters(), lr=0.05)
        dp = DPSGD(served, opt, max_grad_norm=1.0, noise_multiplier=1.3, expected_batch_size=6.0, seed=7)
        for inputs, target in steps:
            dp.step(inputs, target, F.cross_entropy)
        finals.append({n: p.detach() for n, p in model.named_parameters()})
    assert_same(finals[0], finals[1])


@pytest.mark.parametrize("kind", list(MODELS))
def test_modules_compiled_in_place_run_eagerly_in_the_engine(kind):
    build, batch, _ = MODELS[kind]
    model = build("cpu")
    inputs, target = batch("cpu")
    ref = {k: v.clone() for k, v in ig.PerSampleGrads(model, capture="hooks")(inputs, target, F.cross_entropy).items()}
    model.compile(backend="eager")  # in place: the names stay
    before = frames()
    got = ig.PerSampleGrads(model, capture="hooks")(inputs, target, F.cross_entropy)
    assert frames() == before  # nothing compiled for the engine's forward
    assert_same(got, ref)
