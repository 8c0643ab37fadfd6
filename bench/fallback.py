"""The per-module fallback, measured: a recognised rule against the fallback serving the
same module, and the fallback against torch.func computing the same parameters' per-sample
gradients alone (each result checked against the other first).

    python bench/fallback.py [--device cpu|cuda] [--n 32] [--t 128] [--d 256]

Setups: a stack of Llama RMS norms between frozen Linear layers (only the gains train:
``LlamaRMSNorm`` by its rule, and a copy of it named so that only the fallback serves it);
a block with an ``nn.MultiheadAttention`` between frozen layers (by its rule, from its
projections' factors, and by the fallback, torch.func over its forward, which serves MHA
with ``bias_k``/``bias_v``). Prints the median times of the per-sample gradients and
norms, the summed step's and torch.func's for the same parameters.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import common
import indivgrad_cuda as ig
from indivgrad_cuda.layers import multihead_attention


def norm_stack(norm_cls, d, layers=4):
    mods = []
    for _ in range(layers):
        lin = nn.Linear(d, d)
        lin.requires_grad_(False)
        mods += [lin, norm_cls(d)]
    return nn.Sequential(*mods, nn.Linear(d, 8).requires_grad_(False))


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.inp = nn.Linear(d, d).requires_grad_(False)
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True)
        self.head = nn.Linear(d, 8).requires_grad_(False)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.mha(h, h, h, need_weights=False)[0])


def loss(out, target):
    return F.cross_entropy(out.mean(1), target)


def func_grads(model, x, target):
    """torch.func per-sample gradients of the trainable parameters alone."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def one(p, xi, ti):
        return loss(functional_call(model, p, (xi[None],)), ti[None])

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, target)


def summed(model, x, target):
    model.zero_grad(set_to_none=True)
    loss(model(x), target).backward()


def measure(label, model, x, target, device):
    engine = ig.PerSampleGrads(model)
    got, want = engine(x, target, loss), func_grads(model, x, target)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-5)
    times = common.time_interleaved(
        {
            "summed": lambda: summed(model, x, target),
            "grads": lambda: engine(x, target, loss),
            "norms": lambda: engine.norms(x, target, loss),
            "torch.func": lambda: func_grads(model, x, target),
        },
        device,
        budget_s=2.0,
    )
    how = sorted(set(engine.describe().values()) - {"frozen"})
    print(f"{label:<28}" + "".join(f"{times[k]:>12.3f}" for k in ("summed", "grads", "norms", "torch.func")))
    print(f"  served by: {how}")
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--t", type=int, default=128)
    parser.add_argument("--d", type=int, default=256)
    args = parser.parse_args()
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    device, n, t, d = torch.device(args.device), args.n, args.t, args.d
    print(common.run_context(device))
    print(f"N={n}, T={t}, d={d}; median ms")
    print(f"{'setup':<28}" + "".join(f"{k:>12}" for k in ("summed", "grads", "norms", "torch.func")))
    x = torch.randn(n, t, d, device=device)
    target = torch.randint(0, 8, (n,), device=device)
    unrecognised = type("GainNorm", (LlamaRMSNorm,), {})  # the same module under a name no rule knows
    torch.manual_seed(0)
    rule = norm_stack(LlamaRMSNorm, d).to(device)
    torch.manual_seed(0)
    fallback = norm_stack(unrecognised, d).to(device)
    measure("LlamaRMSNorm x4: rule", rule, x, target, device)
    measure("LlamaRMSNorm x4: fallback", fallback, x, target, device)
    attention = Attention(d).to(device)
    measure("MultiheadAttention: rule", attention, x, target, device)
    rule = multihead_attention.RULE
    rule.bind = lambda path, module, fallback=True: multihead_attention.MultiheadAttentionFallback(path)
    try:  # the fallback MHA with bias_k/bias_v gets, forced on the same module
        measure("MultiheadAttention: fallback", attention, x, target, device)
    finally:
        del rule.bind


if __name__ == "__main__":
    main()
