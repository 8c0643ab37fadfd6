"""Models the any-model tests and the benches share: a small transformer encoder
classifier written with Linear layers (Embedding with padding_idx, LayerNorm, attention,
MLP blocks, mean pooling), a custom residual MLP, and the CNN of Opacus's CIFAR-10 example."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, mask=None):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # [N, H, T, T]
        if mask is not None:  # keys that are padding get no attention
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = torch.softmax(scores, -1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, d_model, heads, ln_bias=True):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=ln_bias)
        self.attn = Attention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model, bias=ln_bias)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln1(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyEncoder(nn.Module):
    """Token ids [N, T] (0 is padding) -> class logits [N, classes]."""

    def __init__(self, vocab=50, d_model=16, heads=2, layers=2, max_len=64, classes=4, ln_bias=True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model, padding_idx=0)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, ln_bias) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model, bias=ln_bias)
        self.head = nn.Linear(d_model, classes)

    def forward(self, ids, mask=None):
        n, t = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device).repeat(n, 1))
        for block in self.blocks:
            h = block(h, mask)
        h = self.ln(h)
        if mask is None:
            pooled = h.mean(1)
        else:
            m = mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        return self.head(pooled)


class FeatureEncoder(TinyEncoder):
    """Real-valued tokens [N, T, features] (e.g. image rows) instead of ids."""

    def __init__(self, features, **kw):
        super().__init__(**kw)
        d_model = self.tok.embedding_dim
        del self.tok
        self.inp = nn.Linear(features, d_model)

    def forward(self, x, mask=None):
        n, t, _ = x.shape
        h = self.inp(x) + self.pos(torch.arange(t, device=x.device).repeat(n, 1))
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.ln(h).mean(1))


class ResidualMLP(nn.Module):
    """A custom MLP module: Linear layers with residual connections and LayerNorm."""

    def __init__(self, d_in, width, depth, d_out):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for layer in self.layers:
            h = h + F.silu(layer(h))
        return self.out(self.norm(h))


def token_batch(n, t, vocab, classes, device="cpu", pad_from=None, generator=None):
    """Random ids with some padding (id 0) at the end of each row, a mask, and labels."""
    ids = torch.randint(1, vocab, (n, t), device=device, generator=generator)
    lengths = torch.randint(max(1, t // 2), t + 1, (n,), device=device, generator=generator)
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    labels = torch.randint(0, classes, (n,), device=device, generator=generator)
    return ids, mask, labels


def opacus_cifar_cnn(classes=10):
    """The CNN of Opacus's CIFAR-10 example (examples/cifar10.py): four 3x3 convolutions with
    average pooling, [N, 3, S, S] to [N, classes]; 0.13 M parameters."""
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(start_dim=1, end_dim=-1),
        nn.Linear(128, classes, bias=True),
    )
