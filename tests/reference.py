"""Independent reference implementations, shared by the tests and the benchmarks (so the
two cannot drift apart). They use only plain torch: float64 broadcasting and autograd."""

import torch
import torch.nn.functional as F

# activation name -> (callable, the act_outer keyword arguments it takes)
ACTIVATION_FNS = {
    "identity": lambda t, **kw: t,
    "relu": lambda t, **kw: F.relu(t),
    "leaky_relu": lambda t, negative_slope=0.01, **kw: F.leaky_relu(t, negative_slope),
    "elu": lambda t, alpha=1.0, **kw: F.elu(t, alpha),
    "tanh": lambda t, **kw: torch.tanh(t),
    "sigmoid": lambda t, **kw: torch.sigmoid(t),
    "gelu": lambda t, **kw: F.gelu(t),
    "gelu_tanh": lambda t, **kw: F.gelu(t, approximate="tanh"),
    "silu": lambda t, **kw: F.silu(t),
    "softplus": lambda t, beta=1.0, threshold=20.0, **kw: F.softplus(t, beta, threshold),
}


def outer_ref(x, g, layout="in_out"):
    """Per-sample outer products in float64: [N, D_in, D_out] or [N, D_out, D_in]."""
    x, g = x.double(), g.double()
    return x[:, :, None] * g[:, None, :] if layout == "in_out" else g[:, :, None] * x[:, None, :]


def activation_backward_ref(upstream, pre, activation, **params):
    """upstream * act'(pre) in float64, by torch autograd of the activation itself."""
    pre = pre.detach().double().requires_grad_(True)
    y = ACTIVATION_FNS[activation](pre, **params)
    (g,) = torch.autograd.grad(y, pre, upstream.double())
    return g


def act_outer_ref(x, upstream, pre, activation, layout="in_out", **params):
    g = activation_backward_ref(upstream, pre, activation, **params)
    return outer_ref(x, g, layout), g


def bmm_outer(x, g, layout="in_out"):
    """The seed implementation's per-sample outer product: torch.bmm of [N,D,1] x [N,1,D']."""
    if layout == "in_out":
        return torch.bmm(x.unsqueeze(2), g.unsqueeze(1))
    return torch.bmm(g.unsqueeze(2), x.unsqueeze(1))


def broadcast_outer(x, g, layout="in_out"):
    """Per-sample outer products by a broadcast multiply, in the inputs' dtype."""
    return x[:, :, None] * g[:, None, :] if layout == "in_out" else g[:, :, None] * x[:, None, :]
