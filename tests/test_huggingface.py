"""A real Hugging Face model (a tiny BERT classifier built from a config, no download) through
the hooks capture: per-sample gradients, norms and clipped sums against a per-sample loop of
plain autograd in float64 (torch.func cannot run it: BERT checks its mask with data-dependent
control flow). GPT-2, Llama, ViT and the rest: tests/test_transformers.py."""

import pytest
import torch
import torch.nn.functional as F

import indivgrad_cuda as ig
from tests.reference import clipped_sum_ref, loop_module_grads

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")


def bert(device):
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg).double().to(device).eval()


def loss(out, target):
    return F.cross_entropy(out.logits, target)


def test_bert_classifier(device):
    torch.manual_seed(0)
    model = bert(device)
    ids = torch.randint(1, 100, (5, 10), device=device)
    mask = (torch.arange(10, device=device) < torch.tensor([[10], [7], [5], [9], [3]], device=device)).long()
    inputs = {"input_ids": ids, "attention_mask": mask}
    labels = torch.randint(0, 3, (5,), device=device)
    ref = loop_module_grads(model, inputs, labels, loss)
    engine = ig.PerSampleGrads(model)
    got = engine(inputs, labels, loss)
    assert list(got) == list(ref) and len(got) == 41
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    ref_sum, ref_norms = clipped_sum_ref(ref, 0.5)
    torch.testing.assert_close(engine.norms(inputs, labels, loss), ref_norms, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(engine.clipped_grad_sum(inputs, labels, loss, 0.5), ref_norms, rtol=1e-10, atol=1e-12)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_sum[k], rtol=1e-10, atol=1e-12, msg=k)
