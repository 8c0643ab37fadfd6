"""CUDA graphs for the hooks capture (capture/hooks.py ``_graphed``), each test on CPU with
the eager stand-in of tests/test_engine_graphs.py (replay re-runs the captured function and
copies its results into the first run's outputs, so keys, static inputs and buffers, and
where results land are exercised) and on CUDA with real graphs (skipped without a GPU).
Results are compared with an eager engine and torch.func in float64, on fresh random data
every call."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indivgrad_cuda as ig
from indivgrad_cuda.cuda_graphs import GraphRunner
from tests.conftest import TOL
from tests.models import TinyEncoder, token_batch
from tests.reference import clipped_sum_ref, func_module_grads
from tests.test_engine_graphs import CountingCudaCapture, EagerCapture, FailingCapture

F64 = TOL[torch.float64]
VOCAB, CLASSES = 30, 4


def graphed(model, capture, device, **kwargs):
    """An engine whose hooks capture replays graphs through `capture` on `device`."""
    engine = ig.PerSampleGrads(model, capture="hooks", **kwargs)
    assert isinstance(engine._hooks.graphs, GraphRunner), "the hooks capture's graph runner moved"
    engine._hooks.graphs = GraphRunner(capture=capture, device_types=(device,))
    return engine


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return request.param


def capture_for(device):
    return EagerCapture() if device == "cpu" else CountingCudaCapture()


def encoder(device):
    torch.manual_seed(0)
    return TinyEncoder(vocab=VOCAB, d_model=16, heads=2, layers=1, max_len=8, classes=CLASSES).double().to(device)


def batch(device, n=6):
    ids, mask, y = token_batch(n, 8, VOCAB, CLASSES)
    return (ids.to(device), mask.to(device)), y.to(device)


def check_all(engine, model, inputs, y, max_norm=0.3):
    ref = func_module_grads(model, inputs, y, F.cross_entropy)
    got = engine(inputs, y, F.cross_entropy)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **F64, msg=name)
    ref_sum, ref_norms = clipped_sum_ref(ref, max_norm)
    torch.testing.assert_close(engine.norms(inputs, y, F.cross_entropy), ref_norms, **F64)
    for p in model.parameters():
        p.grad = None  # set_to_none between steps: the graph writes its own buffers, copied into the new p.grad
    torch.testing.assert_close(engine.clipped_grad_sum(inputs, y, F.cross_entropy, max_norm), ref_norms, **F64)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_sum[name], **F64, msg=name)


def test_replays_match_torch_func_on_new_data(device):
    model = encoder(device)
    capture = capture_for(device)
    engine = graphed(model, capture, device)
    inputs, y = batch(device)
    check_all(engine, model, inputs, y)
    assert capture.captures == 4  # the first call (grads) checks the parameters' uses eagerly; the others capture
    for _ in range(3):
        inputs, y = batch(device)
        check_all(engine, model, inputs, y)
    assert capture.captures == 6  # two graphs for each of the three methods, captured once


def test_in_place_updates_replay_and_replacements_recapture(device):
    model = encoder(device)
    capture = capture_for(device)
    engine = graphed(model, capture, device)
    inputs, y = batch(device)
    engine.norms(inputs, y, F.cross_entropy)
    engine.norms(inputs, y, F.cross_entropy)
    assert capture.captures == 2
    with torch.no_grad():  # an optimiser step: same tensors, new values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    check_all(engine, model, *batch(device))
    assert capture.captures == 6  # the norms replayed; the other two methods captured
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())  # a new tensor: a new graph
    model.ln.weight.requires_grad_(False)  # a frozen parameter is left out
    inputs, y = batch(device)
    engine.norms(inputs, y, F.cross_entropy)  # checked eagerly (a new signature), then graphed
    check_all(engine, model, inputs, y)
    assert "ln.weight" not in engine(inputs, y, F.cross_entropy)
    assert capture.captures == 12


def test_the_key_holds_the_batch_size_and_the_inputs_other_values(device):
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x, scale):
            return self.fc(x) * scale

    torch.manual_seed(0)
    model = Flagged().double().to(device)
    capture = capture_for(device)
    engine = graphed(model, capture, device)
    eager = ig.PerSampleGrads(model, cuda_graphs=False)  # torch.func's vmap takes no float among the inputs
    for n, scale in [(4, 1.0), (4, 1.0), (4, 2.0), (4, 2.0), (4, 1.0), (7, 2.0), (7, 2.0)]:
        inputs = {"x": torch.randn(n, 5, dtype=torch.float64, device=device), "scale": scale}
        y = torch.randint(0, 3, (n,), device=device)
        want = eager.norms(inputs, y, F.cross_entropy)
        torch.testing.assert_close(engine.norms(inputs, y, F.cross_entropy), want, **F64)
    assert capture.captures == 6  # (4, 1.0) checked eagerly, then (4, 1.0), (4, 2.0); (7, 2.0) checked, then captured


def test_where_graphs_do_not_apply_the_engine_runs_eagerly(device):
    torch.manual_seed(0)
    model = encoder(device)
    capture = capture_for(device)
    engine = graphed(model, capture, device, max_chunk=4)  # two chunks
    for _ in range(2):
        check_all(engine, model, *batch(device))
    dropped = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).double().to(device)
    dropout_engine = graphed(dropped, capture, device)  # train-mode Dropout: masks drawn per call
    x, y = torch.randn(6, 5, dtype=torch.float64, device=device), torch.randint(0, 3, (6,), device=device)
    for _ in range(2):
        dropout_engine.norms(x, y, F.cross_entropy)
    assert capture.captures == 0


def test_a_failed_capture_warns_once_and_falls_back():
    model = encoder("cpu")
    capture = FailingCapture()
    engine = graphed(model, capture, "cpu")
    inputs, y = batch("cpu")
    engine.norms(inputs, y, F.cross_entropy)  # eager: the check
    with pytest.warns(RuntimeWarning, match=r"capturing a CUDA graph failed \(RuntimeError: operation not permitted"):
        check_all(engine, model, *batch("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_all(engine, model, *batch("cpu"))
    assert capture.captures == 2  # no further attempt


def test_one_shot_functions_and_the_switch_do_not_capture():
    model = encoder("cpu")
    assert ig.PerSampleGrads(model, cuda_graphs=False)._hooks.graphs is None
    assert ig.PerSampleGrads(model)._hooks.graphs is not None
    inputs, y = batch("cpu")
    engine = ig.PerSampleGrads(model)  # the default runner serves CUDA only
    for _ in range(2):
        engine.norms(inputs, y, F.cross_entropy)
    assert not engine._hooks.graphs._entries
