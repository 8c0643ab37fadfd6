"""Bad models and bad calls to the engine get clear errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indivgrad_cuda as ig


def small():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


@pytest.mark.parametrize(
    "model,pattern",
    [
        (
            nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.ConvTranspose1d(1, 1, 1))),
            r"cannot serve:\n  - '1\.1' \(ConvTranspose1d\): no per-sample gradient rule for this type "
            r"\(fallback=True serves it by torch\.func\)\nSupported: layers with trainable parameters: "
            r"nn\.Linear on \[N, \*, D_in\]; nn\.LayerNorm",
        ),
        (
            nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
            r"'1' \(BatchNorm1d\): BatchNorm normalises with statistics "
            r"of the whole batch in train mode, which mixes samples",
        ),
        (nn.Embedding(5, 3, max_norm=1.0), r"'\(the model\)' \(Embedding\): max_norm=1\.0 renormalises the weight"),
        (nn.Embedding(5, 3, scale_grad_by_freq=True), r"scale_grad_by_freq=True scales by token counts"),
        (nn.PReLU(), r"'\(the model\)' \(PReLU\): no per-sample gradient rule"),
    ],
)
def test_unsupported_models(model, pattern):
    """With fallback=False what has no rule is refused at construction, by name (Embedding's
    max_norm and scale_grad_by_freq are refused with the fallback too)."""
    with pytest.raises(ig.UnsupportedModuleError, match=pattern):
        ig.PerSampleGrads(model, fallback=False)
    if "Embedding" in pattern:
        with pytest.raises(ig.UnsupportedModuleError, match=pattern):
            ig.PerSampleGrads(model)


def test_every_offending_module_is_named_and_frozen_ones_are_fine():
    model = nn.Sequential(nn.ConvTranspose1d(1, 1, 1), nn.Flatten(), nn.Linear(4, 4), nn.GRU(4, 4), nn.PReLU())
    with pytest.raises(
        ig.UnsupportedModuleError, match=r"'0' \(ConvTranspose1d\).*\n  - '3' \(GRU\).*\n  - '4' \(PReLU\)"
    ):
        ig.PerSampleGrads(model, fallback=False)
    for i in (0, 3, 4):
        model[i].requires_grad_(False)
    ig.PerSampleGrads(model, fallback=False)  # frozen: fine
    model[4].weight.requires_grad_(True)  # unfrozen after construction: refused at the call
    with pytest.raises(ig.UnsupportedModuleError, match=r"'4' \(PReLU\)"):
        ig.PerSampleGrads(model, capture="hooks", fallback=False).norms(
            torch.randn(2, 1, 4), torch.randn(2, 4), F.mse_loss
        )


def test_native_capture_refuses_what_it_cannot_run():
    with pytest.raises(ig.UnsupportedModuleError, match=r"module '1' of type LayerNorm is not supported"):
        ig.PerSampleGrads(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), capture="native")
    lin = nn.Linear(3, 3)
    with pytest.raises(ig.UnsupportedModuleError, match=r"module '2' .*appears twice"):
        ig.PerSampleGrads(nn.Sequential(lin, nn.Tanh(), lin), capture="native")
    engine = ig.PerSampleGrads(nn.Sequential(nn.Linear(3, 3)), capture="native")
    with pytest.raises(
        ValueError, match=r"inputs: capture='native' needs a 2-D Tensor \[N, D\] .*got shape \[2, 5, 3\]"
    ):
        engine(torch.randn(2, 5, 3), None, lambda o: o.sum())
    with pytest.raises(ValueError, match=r"capture: expected one of \('auto', 'native', 'hooks'\), got 'fast'"):
        ig.PerSampleGrads(nn.Linear(2, 2), capture="fast")
    with pytest.raises(ValueError, match=r"norm_method: expected one of \('auto', 'ghost', 'direct'\), got 'exact'"):
        ig.PerSampleGrads(nn.Linear(2, 2), norm_method="exact")
    with pytest.raises(TypeError, match=r"model: expected an nn\.Module, got function"):
        ig.PerSampleGrads(lambda x: x)


def test_bad_calls():
    model = small()
    engine = ig.PerSampleGrads(model)
    x, t = torch.randn(3, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"x: expected shape \[N, 4\] for the model's first Linear, got \[3, 5\]"):
        engine(torch.randn(3, 5), t, F.mse_loss)
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied"):  # 3-D: the hooks capture
        engine(torch.randn(3, 2, 2), t, F.mse_loss)
    with pytest.raises(TypeError, match=r"x: expected dtype Float \(the model's parameters\), got Double"):
        engine(x.double(), t, F.mse_loss)
    with pytest.raises(ValueError, match=r"reduction: expected one of \('mean', 'sum'\), got 'none'"):
        engine(x, t, F.mse_loss, reduction="none")
    with pytest.raises(ValueError, match=r"layout: expected one of"):
        engine(x, t, F.mse_loss, layout="oi")
    with pytest.raises(ValueError, match=r"into: expected None or 'grad_sample'"):
        engine(x, t, F.mse_loss, into="grad")
    with pytest.raises(
        ValueError, match=r"loss_fn: expected a scalar or per-sample losses of shape \[3\], got shape \[3, 2\]"
    ):
        engine(x, t, lambda o, t: (o - t) ** 2)
    with pytest.raises(TypeError, match=r"loss_fn: expected it to return a Tensor, got float"):
        engine(x, t, lambda o, t: 1.0)
    with pytest.raises(ValueError, match=r"max_norm: expected a positive finite number, got 0"):
        engine.clipped_grad_sum(x, t, F.mse_loss, 0)
    with pytest.raises(ValueError, match=r"noise_multiplier: expected a finite number >= 0, got -1"):
        engine.clipped_grad_sum(x, t, F.mse_loss, 1.0, noise_multiplier=-1)
    with pytest.raises(ValueError, match=r"max_chunk: expected a positive int or None, got 0"):
        ig.PerSampleGrads(model, max_chunk=0)


def test_bad_out_buffers():
    engine = ig.PerSampleGrads(small())
    x, t = torch.randn(3, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"out: 'nope' is not a parameter that requires grad"):
        engine(x, t, F.mse_loss, out={"nope": torch.empty(1)})
    with pytest.raises(ValueError, match=r"out\['0.weight'\]: expected shape \[3, 5, 4\], got \[3, 4, 5\]"):
        engine(x, t, F.mse_loss, out={"0.weight": torch.empty(3, 4, 5)})
    with pytest.raises(
        TypeError, match=r"out\['0.bias'\]: expected dtype torch.float32 \(the parameter's dtype\), got torch.float64"
    ):
        engine(x, t, F.mse_loss, out={"0.bias": torch.empty(3, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"out\['0.weight'\]: expected a contiguous tensor"):
        engine(x, t, F.mse_loss, out={"0.weight": torch.empty(3, 4, 5).transpose(1, 2)})
    shared = torch.empty(3 * 5 * 4)
    with pytest.raises(ValueError, match=r"out\['0.weight'\] and out\['0.bias'\] share memory"):
        engine(x, t, F.mse_loss, out={"0.weight": shared.view(3, 5, 4), "0.bias": shared[10:25].view(3, 5)})


def test_mixed_dropout_modes_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2), nn.Dropout(0.1))
    model[1].eval()
    with pytest.raises(ValueError, match="Dropout layers are in mixed train/eval modes"):
        ig.per_sample_grads(model, torch.randn(2, 4), torch.randn(2, 2), F.mse_loss)


def test_chunking_needs_a_sliceable_target():
    engine = ig.PerSampleGrads(small(), max_chunk=2)
    with pytest.raises(ValueError, match=r"target: to split the batch into chunks it must be a Tensor with 3 rows"):
        engine(torch.randn(3, 4), [1, 2, 3], lambda o, t: o.sum())


def test_out_of_memory_says_how_many_bytes(monkeypatch):
    engine = ig.PerSampleGrads(small())

    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(
        MemoryError, match=r"per-sample gradients for N=3 need 444 bytes \(0\.00 GiB\) of torch.float32"
    ):
        engine(torch.randn(3, 4), torch.randn(3, 2), F.mse_loss)


class _GeneratorOnCuda(torch.Generator):
    """What a CUDA generator reports as its device, constructible without a GPU."""

    device = torch.device("cuda", 0)


def _refuses_generator(model, x, t, generator, error, pattern):
    """Every method refuses the generator before any work: no loss call, p.grad untouched."""
    engine = ig.PerSampleGrads(model)
    calls = []

    def loss(out, target):
        calls.append(1)
        return F.mse_loss(out, target)

    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    for method in (engine, engine.norms, lambda *a, **kw: engine.clipped_grad_sum(*a, 1.0, noise_multiplier=1.0, **kw)):
        with pytest.raises(error, match=pattern):
            method(x, t, loss, generator=generator)
    assert not calls
    assert all((p.grad == 3.0).all() for p in model.parameters())


def test_generator_of_the_wrong_kind_or_device():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 2)).train()
    x, t = torch.randn(3, 4), torch.randn(3, 2)
    _refuses_generator(model, x, t, object(), TypeError, r"generator: expected a torch\.Generator or None, got object")
    _refuses_generator(
        model,
        x,
        t,
        _GeneratorOnCuda(),
        ValueError,
        r"generator: expected a torch\.Generator on cpu \(the model's device\), got one on cuda:0",
    )
    ig.PerSampleGrads(model)(x, t, F.mse_loss, generator=torch.Generator().manual_seed(0))  # the right one is accepted


@pytest.mark.cuda
def test_generator_on_cpu_for_a_cuda_model():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 2)).cuda().train()
    x, t = torch.randn(3, 4, device="cuda"), torch.randn(3, 2, device="cuda")
    _refuses_generator(
        model,
        x,
        t,
        torch.Generator("cpu"),
        ValueError,
        r"generator: expected a torch\.Generator on cuda:0 \(the model's device\), got one on cpu",
    )
    _refuses_generator(
        model.cpu(),
        x.cpu(),
        t.cpu(),
        torch.Generator("cuda"),
        ValueError,
        r"generator: expected a torch\.Generator on cpu \(the model's device\), got one on cuda:0",
    )


def test_bad_cuda_graphs_option():
    with pytest.raises(TypeError, match=r"cuda_graphs: expected True or False, got 'yes'"):
        ig.PerSampleGrads(small(), cuda_graphs="yes")


def test_dropout_p_out_of_range_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    model[1].p = 1.5
    with pytest.raises(
        ig.UnsupportedModuleError, match=r"module '1' of type Dropout is not supported \(p=1\.5; expected 0 <= p <= 1\)"
    ):
        ig.PerSampleGrads(model, capture="native")
    with pytest.raises(ValueError, match=r"module '1' \(Dropout\): p=1\.5; expected 0 <= p <= 1"):
        ig.PerSampleGrads(model)(torch.randn(2, 4), torch.randn(2, 4), F.mse_loss)
