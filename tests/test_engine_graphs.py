"""The engine's CUDA-graph path (indivgrad_cuda/cuda_graphs.py).

Each test runs twice: on CPU with an eager stand-in for the capture (replay re-runs the
captured function and copies its results into the first run's outputs, as a graph replay
writes its static outputs: so static inputs, keys, invalidation and where results land are
exercised), and on CUDA with real graphs (skipped without a GPU). Results are compared with
the eager engine and with torch.func in float64, on fresh random data every call."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indivgrad_cuda as ig
from indivgrad_cuda.cuda_graphs import Captured, CudaGraphCapture, GraphRunner
from tests.conftest import TOL
from tests.reference import clipped_sum_ref, dropout_masks, func_per_sample_grads

F64 = TOL[torch.float64]


def _copy_into(dst, src):
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        assert len(dst) == len(src)
        for d, s in zip(dst, src):
            _copy_into(d, s)
    else:
        assert dst is None and src is None


class EagerCapture:
    """CPU stand-in for CudaGraphCapture."""

    def __init__(self):
        self.captures = 0

    def __call__(self, fn, pool=None, warmup=True):
        """Runs fn once now (a graph's capture computes nothing: its first replay does, so the
        first replay here is that run) and again at each later replay."""
        self.captures += 1
        outputs = fn()
        replays = []

        def replay():
            if replays:  # an autograd backward cannot run twice over one forward's graph
                _copy_into(outputs, fn())
            replays.append(None)

        return Captured(replay, outputs, pool)


class CountingCudaCapture(CudaGraphCapture):
    def __init__(self):
        self.captures = 0

    def __call__(self, fn, pool=None, warmup=True):
        self.captures += 1
        return super().__call__(fn, pool, warmup)


def install_runner(engine, runner):
    """Makes `runner` the engine's graph runner, where the engine reads it. Fails (on CPU too)
    if the runner has moved, rather than setting an attribute that nothing reads."""
    assert isinstance(engine._native.graphs, GraphRunner), "the engine's graph runner moved: update install_runner"
    engine._native.graphs = runner
    return engine


class Backend:
    def __init__(self, device):
        self.device = device
        self.capture = EagerCapture() if device == "cpu" else CountingCudaCapture()

    def engine(self, model, **kwargs):
        runner = GraphRunner(capture=self.capture, device_types=(self.device,))
        return install_runner(ig.PerSampleGrads(model, **kwargs), runner)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request):
    return Backend(request.param)


def mlp(device):
    return (
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(12, 9),
            nn.GELU(),
            nn.Linear(9, 8, bias=False),
            nn.Dropout(0.4),
            nn.Softplus(beta=2.0),
            nn.Sequential(nn.Linear(8, 7), nn.Tanh()),
            nn.Linear(7, 3),
        )
        .double()
        .to(device)
        .eval()
    )  # Dropout in eval mode: graphs apply


def batch(device, n=10):
    return (torch.randn(n, 3, 4, dtype=torch.float64, device=device), torch.randint(0, 3, (n,), device=device))


LOSS = nn.CrossEntropyLoss()


def assert_grads(got, ref):
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **F64, msg=name)


def in_out(grads):
    return {k: v.transpose(1, 2) if v.dim() == 3 else v for k, v in grads.items()}


def test_graphs_match_eager_and_torch_func_on_new_data(backend):
    dev = backend.device
    model = mlp(dev)
    graphed, eager = backend.engine(model), ig.PerSampleGrads(model, cuda_graphs=False)
    graphed_in_out = backend.engine(model)  # its own buffers: an engine keeps one set
    first_ptrs = None
    for step in range(3):
        x, t = batch(dev)
        ref = func_per_sample_grads(model, x, t, LOSS)
        got = graphed(x, t, LOSS)
        assert_grads(got, ref)
        assert_grads(got, eager(x, t, LOSS))
        ptrs = {k: v.data_ptr() for k, v in got.items()}
        first_ptrs = first_ptrs or ptrs
        assert ptrs == first_ptrs  # the engine's reused buffers are the graph's outputs
        assert_grads(in_out(graphed_in_out(x, t, LOSS, layout="in_out")), ref)

        ref_sum, ref_norms = clipped_sum_ref(ref, 1.0)
        norms, per_param = graphed.norms(x, t, LOSS, per_param=True)
        torch.testing.assert_close(norms, ref_norms, **F64)
        for name in ref:
            torch.testing.assert_close(per_param[name], ref[name].flatten(1).norm(dim=1), **F64, msg=name)

        max_norm = ref_norms.median().item()
        ref_sum, _ = clipped_sum_ref(ref, max_norm)
        torch.testing.assert_close(graphed.clipped_grad_sum(x, t, LOSS, max_norm), ref_norms, **F64)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_sum[name], **F64, msg=name)
        # noise added after the replay, from the generator, as the eager engine does
        seed = 100 + step
        graphed.clipped_grad_sum(
            x, t, LOSS, max_norm, noise_multiplier=0.5, generator=torch.Generator(dev).manual_seed(seed)
        )
        noisy = [p.grad.clone() for p in model.parameters()]
        eager.clipped_grad_sum(
            x, t, LOSS, max_norm, noise_multiplier=0.5, generator=torch.Generator(dev).manual_seed(seed)
        )
        for a, p in zip(noisy, model.parameters()):
            torch.testing.assert_close(a, p.grad, **F64)
        assert any((a - ref_sum[name]).abs().max() > 0.05 * max_norm for a, name in zip(noisy, ref_sum))
    # one forward and one backward graph for each of: grads out_in, grads in_out, norms,
    # clipped sum (max_norm changes each step: one more pair per step after the first)
    assert backend.capture.captures == 2 * (4 + 2)


def test_in_place_updates_replay_and_replacements_recapture(backend):
    dev = backend.device
    model = mlp(dev)
    engine = backend.engine(model)
    x, t = batch(dev)
    engine(x, t, LOSS)
    assert backend.capture.captures == 2
    with torch.no_grad():  # an optimiser step: same tensors, new values
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, t = batch(dev)
    assert_grads(engine(x, t, LOSS), func_per_sample_grads(model, x, t, LOSS))
    assert backend.capture.captures == 2

    model[3].weight = nn.Parameter(torch.randn_like(model[3].weight))  # a new Parameter object
    x, t = batch(dev)
    assert_grads(engine(x, t, LOSS), func_per_sample_grads(model, x, t, LOSS))
    assert backend.capture.captures == 4

    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    x, t = batch(dev)
    got = engine(x, t, LOSS)
    assert "1.weight" not in got and "1.bias" not in got
    ref = func_per_sample_grads(model, x, t, LOSS)
    assert_grads(got, {k: ref[k] for k in got})
    norms = engine.norms(x, t, LOSS)
    torch.testing.assert_close(norms, torch.stack([ref[k].flatten(1).norm(dim=1) for k in got]).norm(dim=0), **F64)
    assert backend.capture.captures == 8

    model[1].weight.requires_grad_(True)
    x, t = batch(dev)
    got = engine(x, t, LOSS)
    assert "1.weight" in got and "1.bias" not in got
    ref = func_per_sample_grads(model, x, t, LOSS)
    assert_grads(got, {k: ref[k] for k in got})


def test_out_buffers_are_part_of_the_key(backend):
    dev = backend.device
    model = mlp(dev)
    engine = backend.engine(model)
    x, t = batch(dev)
    shape = (10, 9, 12)
    a = {"1.weight": torch.full(shape, float("nan"), dtype=torch.float64, device=dev)}
    b = {"1.weight": torch.full(shape, float("nan"), dtype=torch.float64, device=dev)}
    engine(x, t, LOSS, out=a)
    first = a["1.weight"].clone()
    torch.testing.assert_close(first, func_per_sample_grads(model, x, t, LOSS)["1.weight"], **F64)
    captures = backend.capture.captures
    x, t = batch(dev)
    got = engine(x, t, LOSS, out=b)
    assert got["1.weight"] is b["1.weight"]
    assert_grads(got, func_per_sample_grads(model, x, t, LOSS))
    assert backend.capture.captures == captures + 2
    assert torch.equal(a["1.weight"], first)  # the first graph's buffer was not written
    x, t = batch(dev)
    engine(x, t, LOSS, out=a)  # a's graph again: replayed, not captured
    torch.testing.assert_close(a["1.weight"], func_per_sample_grads(model, x, t, LOSS)["1.weight"], **F64)
    assert backend.capture.captures == captures + 2


def test_least_recently_used_graphs_are_dropped(backend):
    dev = backend.device
    model = mlp(dev)
    engine = backend.engine(model)
    for n in (2, 3, 4, 5, 6):  # five batch sizes: five graph pairs, four kept
        x, t = batch(dev, n)
        engine.norms(x, t, LOSS)
    assert backend.capture.captures == 10
    x, t = batch(dev, 6)
    ref = torch.stack([g.flatten(1).norm(dim=1) for g in func_per_sample_grads(model, x, t, LOSS).values()]).norm(dim=0)
    torch.testing.assert_close(engine.norms(x, t, LOSS), ref, **F64)
    assert backend.capture.captures == 10
    x, t = batch(dev, 2)
    engine.norms(x, t, LOSS)
    assert backend.capture.captures == 12


def test_where_graphs_do_not_apply_the_engine_runs_eagerly(backend):
    dev = backend.device
    model = mlp(dev).train()  # Dropout in train mode: masks differ every call
    engine = backend.engine(model)
    x, t = batch(dev)
    got = engine(x, t, LOSS, generator=torch.Generator(dev).manual_seed(5))
    masks = dropout_masks(model, x, torch.Generator(dev).manual_seed(5))
    assert_grads(got, func_per_sample_grads(model, x, t, LOSS, masks))
    assert backend.capture.captures == 0

    model.eval()
    chunked = backend.engine(model, max_chunk=4)  # a chunked batch is big: launches do not matter
    assert_grads(chunked(x, t, LOSS), func_per_sample_grads(model, x, t, LOSS))
    assert backend.capture.captures == 0
    empty = backend.engine(model)
    assert empty(x[:0], t[:0], LOSS)["1.weight"].shape == (0, 9, 12)
    assert backend.capture.captures == 0


def test_no_graphs_on_cpu_with_the_default_runner():
    model = mlp("cpu")
    engine = ig.PerSampleGrads(model)  # cuda_graphs=True by default
    capture = EagerCapture()
    assert isinstance(engine._native.graphs.capture, CudaGraphCapture)  # where the runner reads it
    engine._native.graphs.capture = capture
    x, t = batch("cpu")
    assert_grads(engine(x, t, LOSS), func_per_sample_grads(model, x, t, LOSS))
    engine.norms(x, t, LOSS)
    engine.clipped_grad_sum(x, t, LOSS, 1.0)
    assert capture.captures == 0
    assert ig.PerSampleGrads(model, cuda_graphs=False)._native.graphs is None


class FailingCapture(EagerCapture):
    """Captures the forward, then fails on the backward (as an op that syncs would)."""

    def __call__(self, fn, pool=None, warmup=True):
        if self.captures == 1:
            self.captures += 1
            raise RuntimeError("operation not permitted when stream is capturing")
        return super().__call__(fn, pool, warmup)


def test_a_failed_capture_warns_once_and_falls_back():
    model = mlp("cpu")
    capture = FailingCapture()
    engine = install_runner(ig.PerSampleGrads(model), GraphRunner(capture=capture, device_types=("cpu",)))
    x, t = batch("cpu")
    with pytest.warns(RuntimeWarning, match=r"capturing a CUDA graph failed \(RuntimeError: operation not permitted"):
        got = engine(x, t, LOSS)
    assert_grads(got, func_per_sample_grads(model, x, t, LOSS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, t = batch("cpu")
        assert_grads(engine(x, t, LOSS), func_per_sample_grads(model, x, t, LOSS))
        ref_sum, ref_norms = clipped_sum_ref(func_per_sample_grads(model, x, t, LOSS), 0.2)
        torch.testing.assert_close(engine.clipped_grad_sum(x, t, LOSS, 0.2), ref_norms, **F64)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_sum[name], **F64, msg=name)
    assert capture.captures == 2  # no further attempt


def test_autocast_with_graphs(backend):
    dev = backend.device
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4)).to(dev)
    x, t = torch.randn(6, 8, device=dev), torch.randn(6, 4, device=dev)
    engine = backend.engine(model)
    engine(x, t, F.mse_loss)
    assert backend.capture.captures == 2
    with torch.autocast(dev, dtype=torch.bfloat16):  # the hooks capture: no native graphs under autocast
        got = engine(x, t, F.mse_loss)
        want = ig.PerSampleGrads(model, capture="hooks")(x, t, F.mse_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert backend.capture.captures == 2


def test_deep_float32_net_graphs_equal_eager(backend):
    dev = backend.device
    torch.manual_seed(1)
    layers = [nn.Linear(64, 128), nn.ReLU()]
    for _ in range(14):
        layers += [nn.Linear(128, 128), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(128, 10)).to(dev)
    graphed = backend.engine(model)
    eager = ig.PerSampleGrads(model, cuda_graphs=False)
    for _ in range(3):
        x, t = torch.randn(64, 64, device=dev), torch.randint(0, 10, (64,), device=dev)
        a = {k: v.clone() for k, v in graphed(x, t, LOSS).items()}
        b = eager(x, t, LOSS)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(graphed.norms(x, t, LOSS), eager.norms(x, t, LOSS), rtol=1e-6, atol=0)
    assert backend.capture.captures == 4  # two graphs for each method's signature, captured once
