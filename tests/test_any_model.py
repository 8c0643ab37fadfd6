"""The engine on any nn.Module (the hooks capture and the layer rules) against torch.func
in float64: transformers with token ids, custom modules, sequences of any rank, modules
used twice, frozen layers, tuple and dict inputs, norms by both methods, clipped sums,
chunking, Dropout, and every bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indivgrad_cuda as ig
from tests.conftest import TOL
from tests.models import ResidualMLP, TinyEncoder, token_batch
from tests.reference import clipped_sum_ref, func_module_grads

F64 = TOL[torch.float64]


def assert_grads(got, ref, tol=F64):
    assert list(got) == list(ref)
    for name in ref:
        torch.testing.assert_close(got[name].double(), ref[name].double(), **tol, msg=name)


def check_everything(model, inputs, target, loss, reduction="mean", **engine_kw):
    """Per-sample gradients, norms (per parameter) and the clipped sum against torch.func."""
    ref = func_module_grads(model, inputs, target, loss)
    engine = ig.PerSampleGrads(model, **engine_kw)
    assert_grads(engine(inputs, target, loss, reduction=reduction), ref)
    ref_sum, ref_norms = clipped_sum_ref(ref, 1.0)
    norms, per_param = engine.norms(inputs, target, loss, reduction=reduction, per_param=True)
    torch.testing.assert_close(norms, ref_norms, **F64)
    for name in ref:
        torch.testing.assert_close(per_param[name], ref[name].flatten(1).norm(dim=1), **F64, msg=name)
    max_norm = ref_norms.median().item()  # both branches of min(1, max_norm / norm)
    ref_sum, _ = clipped_sum_ref(ref, max_norm)
    torch.testing.assert_close(
        engine.clipped_grad_sum(inputs, target, loss, max_norm, reduction=reduction), ref_norms, **F64
    )
    params = dict(model.named_parameters())
    for name in ref:
        torch.testing.assert_close(params[name].grad, ref_sum[name], **F64, msg=name)
    return engine


def encoder(device, **kw):
    return TinyEncoder(vocab=13, d_model=8, heads=2, layers=2, max_len=9, classes=3, **kw).double().to(device).eval()


@pytest.mark.parametrize("ln_bias", [True, False])
@pytest.mark.parametrize("norm_method", ["ghost", "direct", "auto"])
def test_tiny_transformer_with_token_ids(device, ln_bias, norm_method):
    model = encoder(device, ln_bias=ln_bias)
    ids, mask, labels = token_batch(5, 9, 13, 3, device=device)
    assert (ids == 0).any()
    check_everything(model, (ids, mask), labels, F.cross_entropy, norm_method=norm_method)
    # without the mask, padding tokens reach the pooled output: padding_idx must get no gradient
    check_everything(model, ids, labels, F.cross_entropy, norm_method=norm_method)


def test_dict_inputs_and_per_sample_losses(device):
    model = encoder(device)
    ids, mask, labels = token_batch(4, 7, 13, 3, device=device)
    check_everything(model, {"ids": ids, "mask": mask}, labels, lambda o, t: F.cross_entropy(o, t, reduction="none"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_custom_residual_module(device, reduction):
    model = ResidualMLP(6, 10, 3, 4).double().to(device)
    x, t = torch.randn(7, 6, dtype=torch.float64, device=device), torch.randn(7, 4, dtype=torch.float64, device=device)
    loss = (lambda o, y: F.mse_loss(o, y, reduction="sum")) if reduction == "sum" else F.mse_loss
    check_everything(model, x, t, loss, reduction=reduction)


@pytest.mark.parametrize("middle", [(), (5,), (3, 4)])
def test_linear_on_any_number_of_middle_dims(device, middle):
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double().to(device)
    x = torch.randn(4, *middle, 6, dtype=torch.float64, device=device)
    t = torch.randn(4, *middle, 3, dtype=torch.float64, device=device)
    engine = check_everything(model, x, t, F.mse_loss, capture="hooks")
    for method in ("ghost", "direct"):  # forced both ways, same norms
        forced = ig.PerSampleGrads(model, capture="hooks", norm_method=method).norms(x, t, F.mse_loss)
        torch.testing.assert_close(forced, engine.norms(x, t, F.mse_loss), **F64)


class Twice(nn.Module):
    """One Linear applied twice (shared weights), a frozen layer, an unused layer."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5).requires_grad_(False)
        self.unused = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        h = self.frozen(h) + self.shared(h)
        return self.head(h.mean(1))


def test_module_used_twice_frozen_and_unused_layers(device):
    model = Twice().double().to(device)
    x, t = (
        torch.randn(6, 4, 5, dtype=torch.float64, device=device),
        torch.randn(6, 2, dtype=torch.float64, device=device),
    )
    engine = check_everything(model, x, t, F.mse_loss)
    grads = engine(x, t, F.mse_loss)
    assert "frozen.weight" not in grads and grads["unused.weight"].abs().max() == 0


def test_one_engine_reads_the_trainable_parameters_on_every_call(device):
    """Each call works on the layers' trainable parameters as they are then (the reducers
    share one reading per call): freezing, unfreezing and replacing parameters between calls
    of one engine is seen by every method."""
    model = encoder(device)
    ids, mask, labels = token_batch(5, 9, 13, 3, device=device)
    engine = check_everything(model, (ids, mask), labels, F.cross_entropy)
    block = model.blocks[0]
    block.fc1.requires_grad_(False)
    block.ln1.bias.requires_grad_(False)
    engine = check_everything(model, (ids, mask), labels, F.cross_entropy)
    assert not {"blocks.0.fc1.weight", "blocks.0.fc1.bias", "blocks.0.ln1.bias"} & set(
        engine(ids, labels, F.cross_entropy)
    )
    block.fc1.weight.requires_grad_(True)
    with torch.no_grad():
        block.fc2.weight = nn.Parameter(torch.randn_like(block.fc2.weight))  # a new Parameter object
    ref = func_module_grads(model, (ids, mask), labels, F.cross_entropy)
    assert "blocks.0.fc1.weight" in ref and "blocks.0.fc1.bias" not in ref
    assert_grads(engine((ids, mask), labels, F.cross_entropy), ref)
    _, ref_norms = clipped_sum_ref(ref, 1.0)
    torch.testing.assert_close(engine.norms((ids, mask), labels, F.cross_entropy), ref_norms, **F64)


def test_a_loss_that_no_trainable_layer_reaches(device):
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double().to(device)
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    grads = ig.per_sample_grads(model, x, None, lambda o: o.detach().sum(1), capture="hooks")
    assert all(g.shape[0] == 4 and (g == 0).all() for g in grads.values())
    assert (ig.per_sample_grad_norms(model, x, None, lambda o: o.detach().sum(1), capture="hooks") == 0).all()


def test_native_and_hooks_captures_agree(device):
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Dropout(0.3), nn.Linear(8, 3)).double().to(device).train()
    x, t = torch.randn(9, 6, dtype=torch.float64, device=device), torch.randn(9, 3, dtype=torch.float64, device=device)

    def run(capture, chunk):
        engine = ig.PerSampleGrads(model, capture=capture, max_chunk=chunk, cuda_graphs=False)
        gen = torch.Generator(device).manual_seed(3)
        grads = {k: v.clone() for k, v in engine(x, t, F.mse_loss, generator=gen).items()}
        norms = engine.clipped_grad_sum(
            x, t, F.mse_loss, 0.5, noise_multiplier=1.0, generator=torch.Generator(device).manual_seed(4)
        )
        return grads, norms, {n: p.grad.clone() for n, p in model.named_parameters()}

    native = run("native", None)
    for capture, chunk in (("hooks", None), ("hooks", 2), ("native", 4)):
        other = run(capture, chunk)
        assert_grads(other[0], native[0])
        torch.testing.assert_close(other[1], native[1], **F64)
        assert_grads(other[2], native[2])


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_equals_unchunked(device, chunk):
    model = encoder(device).train()  # no Dropout in the encoder: train mode changes nothing
    ids, mask, labels = token_batch(5, 6, 13, 3, device=device)
    whole = ig.PerSampleGrads(model)
    chunked = ig.PerSampleGrads(model, max_chunk=chunk)
    assert_grads(chunked((ids, mask), labels, F.cross_entropy), whole((ids, mask), labels, F.cross_entropy))
    torch.testing.assert_close(
        chunked.norms((ids, mask), labels, F.cross_entropy), whole.norms((ids, mask), labels, F.cross_entropy), **F64
    )
    a = chunked.clipped_grad_sum((ids, mask), labels, F.cross_entropy, 0.3)
    grads_a = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(whole.clipped_grad_sum((ids, mask), labels, F.cross_entropy, 0.3), a, **F64)
    assert_grads({n: p.grad for n, p in model.named_parameters()}, grads_a)


# dtype -> (per-sample gradients: error / the parameter's largest gradient, norms: relative
# error), against float64 on the rounded model; about 4x the worst of 10 seeds measured on CPU
# (float32 5e-7 and 1.3e-7, float16 1.9e-3 and 6.2e-4, bfloat16 1.8e-2 and 5.3e-3)
LOW_PRECISION_TOL = {torch.float32: (5e-6, 1e-6), torch.float16: (8e-3, 3e-3), torch.bfloat16: (6e-2, 2e-2)}


@pytest.mark.parametrize("dtype", sorted(LOW_PRECISION_TOL, key=str))
def test_low_precision_transformer(device, dtype):
    low = encoder(device).to(dtype)
    ids, mask, labels = token_batch(4, 8, 13, 3, device=device)
    ref = func_module_grads(copy.deepcopy(low).double(), (ids, mask), labels, F.cross_entropy)
    engine = ig.PerSampleGrads(low)
    got = engine((ids, mask), labels, F.cross_entropy)
    grad_tol, norm_tol = LOW_PRECISION_TOL[dtype]
    assert list(got) == list(ref)
    for name in ref:  # each parameter against its own scale: small ones count as much as large ones
        assert got[name].dtype == dtype
        atol = grad_tol * ref[name].abs().max().item()
        torch.testing.assert_close(got[name].double(), ref[name], rtol=0, atol=atol, msg=name)
    norms = engine.norms((ids, mask), labels, F.cross_entropy)
    assert norms.dtype == torch.float32
    _, ref_norms = clipped_sum_ref(ref, 1.0)
    torch.testing.assert_close(norms.double(), ref_norms, rtol=norm_tol, atol=0)


def test_empty_batch(device):
    model = encoder(device)
    ids, mask, labels = token_batch(0, 5, 13, 3, device=device)
    grads = ig.per_sample_grads(model, (ids, mask), labels, F.cross_entropy)
    assert grads["tok.weight"].shape == (0, 13, 8)
    norms = ig.clipped_grad_sum(model, (ids, mask), labels, F.cross_entropy, 1.0)
    assert norms.shape == (0,) and all((p.grad == 0).all() for p in model.parameters())


# ---------------------------------------------------------------- bad inputs


class InPlace(nn.Module):
    """In-place ops on a layer's output: ReLU(inplace=True) and +=."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        h = F.relu(self.a(x), inplace=True)
        y = self.b(h)
        y += h
        return self.c(y)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)

    def forward(self, ids):
        return self.emb(ids).mean(1) @ self.emb.weight.t()  # the output projection tied to the embedding


class Positions(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(5, 3)

    def forward(self, x):
        return x + self.pos(torch.arange(x.shape[1]))  # [T, D]: dim 0 is not the batch


class SharedPositions(nn.Module):
    """Positions [1, T] shared by the batch (as Hugging Face models pass them), a learned query
    token [1, 1, D] through a Linear, and a dict output."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(11, 6, padding_idx=0), nn.Embedding(9, 6)
        self.query = nn.Parameter(torch.randn(1, 1, 6), requires_grad=False)
        self.q, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)[None])
        attn = torch.softmax((self.q(self.query) * h).sum(-1), -1)  # [N, T]
        return {"logits": self.head((attn[..., None] * h).sum(1))}


def test_inputs_shared_by_the_batch_and_dict_outputs(device):
    model = SharedPositions().double().to(device)
    ids = torch.randint(0, 11, (5, 7), device=device)
    labels = torch.randint(0, 3, (5,), device=device)
    check_everything(model, ids, labels, lambda out, t: F.cross_entropy(out["logits"], t))


def test_in_place_ops_on_layer_outputs(device):
    model = InPlace().double().to(device)
    x = torch.randn(5, 3, dtype=torch.float64, device=device)
    check_everything(model, x, None, lambda o: (o**2).sum(), reduction="sum")


def test_what_cannot_be_right_is_refused():
    ids = torch.randint(0, 7, (3, 5))
    with pytest.raises(
        ig.UnsupportedModuleError,
        match=r"used outside the forward of every module that owns them.*\n  - parameter "
        r"'emb.weight' \(of 'emb', Embedding\)\n.*untie it, or freeze it",
    ):
        ig.per_sample_grad_norms(Tied(), ids, None, lambda o: o.sum(), fallback=False)
    with pytest.raises(
        ValueError, match=r"module 'pos' \(Embedding\) was called with shape \[4\]; .*\(N=2\), or 1 for"
    ):
        ig.per_sample_grads(Positions(), torch.randn(2, 4, 3), None, lambda o: o.sum())
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False))
    with pytest.raises(
        ig.UnsupportedModuleError, match=r"modules '1' \(BatchNorm1d\) are in train mode: .*mixes samples"
    ):
        ig.per_sample_grads(bn, torch.randn(4, 3), None, lambda o: o.sum())
    ig.per_sample_grads(bn.eval(), torch.randn(4, 3), None, lambda o: o.sum())  # eval mode: per-sample


def test_bad_inputs():
    model = encoder("cpu")
    ids, mask, labels = token_batch(4, 6, 13, 3)
    engine = ig.PerSampleGrads(model)
    with pytest.raises(TypeError, match=r"inputs: expected a Tensor, a tuple \(model\(\*inputs\)\) or a dict"):
        engine([ids, mask], labels, F.cross_entropy)
    with pytest.raises(
        ValueError,
        match=r"inputs\[1\]: expected 4 rows \(dim 0 is the batch, N from inputs\[0\]\), "
        r"got shape \[3, 6\]",
    ):
        engine((ids, mask[:3]), labels, F.cross_entropy)
    with pytest.raises(TypeError, match=r"inputs: expected a Tensor, or a tuple or dict holding at least one Tensor"):
        engine((), labels, F.cross_entropy)
    with pytest.raises(ValueError, match=r"loss_fn: expected a scalar or per-sample losses of shape \[4\]"):
        engine((ids, mask), labels, lambda o, t: F.cross_entropy(o, t, reduction="none")[:2])
    with pytest.raises(ValueError, match=r"target: to split the batch into chunks it must be a Tensor with 4 rows"):
        ig.PerSampleGrads(model, max_chunk=2)((ids, mask), labels.tolist(), F.cross_entropy)
