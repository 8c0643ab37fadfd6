"""The README's examples (Any model, DP-SGD, Data attribution) run as written, and their results are right."""

import re
import textwrap
from pathlib import Path

import torch

from tests.reference import func_module_grads

README = Path(__file__).resolve().parents[1] / "README.md"


def test_any_model_examples_run():
    section = README.read_text().split("### Any model", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    scope = {}
    torch.manual_seed(0)
    exec(blocks[0], scope)  # the documentation's own code
    model, ids, mask, labels, grads = (scope[k] for k in ("model", "ids", "mask", "labels", "grads"))
    assert grads["emb.weight"].shape == (32, 1000, 128) and scope["norms"].shape == (32,)
    ref = func_module_grads(model, (ids, mask), labels, torch.nn.functional.cross_entropy)
    for name in ref:  # float32 against float32: the same gradients
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    exec(blocks[1], scope)
    assert scope["grads"]["0.weight"].shape == (1000, 100, 100)
    exec(textwrap.dedent(blocks[2]), scope)  # describe() on GPT-2 (the block sits in a list item)
    how = scope["how"]
    assert how["transformer.wte.weight"] == "tied: rule (Embedding 'transformer.wte') + rule (Linear 'lm_head')"
    assert how["transformer.h.0.attn.c_attn.weight"] == "rule (Conv1D 'transformer.h.0.attn.c_attn')"


def test_dp_sgd_example_runs():
    section = README.read_text().split("### DP-SGD", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    # the second and fourth need torchrun: tests/test_privacy_distributed.py and test_privacy_fsdp.py run their settings
    assert len(blocks) == 4
    scope = {}
    exec(blocks[0], scope)  # the documentation's own code
    dp = scope["dp"]
    assert dp.steps == 3 * 8 and dp.history == [(1.0, 0.125, 24)]
    assert 0.5 < dp.epsilon(1e-5) < 20
    assert scope["norms"].dim() == 1 and scope["loss"].dim() == 0
    exec(blocks[2], scope)  # the clipping variants, on the first block's model and batches
    layers = len(scope["model"]) - 1  # two Linear layers (and a ReLU)
    assert scope["norms"].shape == (len(scope["x"]), layers) and scope["dp"].max_grad_norm != 1.0


def test_data_attribution_example_runs(tmp_path, monkeypatch):
    section = README.read_text().split("### Data attribution", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    scope = {}
    torch.manual_seed(0)
    exec(blocks[0], scope)  # the documentation's own code
    model, engine, proj = scope["model"], scope["engine"], scope["proj"]
    x, y, x_te, y_te = (scope[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    loss = torch.nn.functional.cross_entropy
    ga = func_module_grads(model, x[:64], y[:64], loss)
    gb = func_module_grads(model, x_te, y_te, loss)
    ref = sum(ga[k].flatten(1) @ gb[k].flatten(1).t() for k in ga)
    torch.testing.assert_close(scope["K"][:64], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert list(scope["per_param"]) == list(ga) and proj.dim <= 1024 and scope["phi"].shape == (2000, proj.dim)
    torch.testing.assert_close(scope["phi"][:64], proj.apply(ga), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scope["scores"], 0.1 * scope["K"])
    norms = engine.norms(x, y, loss)
    torch.testing.assert_close(scope["self_influence"], 0.1 * norms.square())
    monkeypatch.chdir(tmp_path)  # it saves trak.pt
    exec(blocks[1], scope)  # TRAK and influence on the first block's model and sets
    assert scope["tau"].shape == (2000, 100) and scope["scores"].shape == (2000, 100)
    assert scope["scores"].isfinite().all() and scope["tau"].isfinite().all()
    assert scope["how"] == {n: f"kronecker (Linear '{n.split('.')[0]}')" for n, _ in model.named_parameters()}
