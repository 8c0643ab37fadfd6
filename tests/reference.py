"""Independent reference implementations, shared by the tests and the benchmarks (so the
two cannot drift apart). They use only plain torch: float64 broadcasting and autograd."""

import hashlib
import math

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


def _leaves(module):
    if isinstance(module, torch.nn.Sequential):
        for child in module.children():
            yield from _leaves(child)
    else:
        yield module


def functional_mlp(model, params, x, masks=()):
    """The model's forward from its leaf modules, with Linear weights taken from `params`
    (a dict keyed like named_parameters) and Dropout replaced by the given masks."""
    ids = {id(p): name for name, p in model.named_parameters()}
    masks = iter(masks)
    h = x
    for m in _leaves(model):
        if isinstance(m, torch.nn.Linear):
            bias = params[ids[id(m.bias)]] if m.bias is not None else None
            h = F.linear(h, params[ids[id(m.weight)]], bias)
        elif isinstance(m, torch.nn.Dropout):
            h = h * next(masks) if m.training else h
        else:
            h = m(h)
    return h


def func_per_sample_grads(model, x, target, loss_fn, masks=()):
    """Per-sample gradients by torch.func.vmap(grad(...)) over single-sample batches, in
    the model's dtype: sample n's loss is loss_fn on the batch of sample n alone."""
    from torch.func import grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(p, xi, ti, mi):
        out = functional_mlp(model, p, xi[None], [m[None] for m in mi])
        loss = loss_fn(out) if ti is None else loss_fn(out, ti[None])
        return loss.sum()

    in_dims = (None, 0, None if target is None else 0, 0)
    return vmap(grad(sample_loss), in_dims=in_dims)(params, x, target, tuple(masks))


def dropout_masks(model, x, generator):
    """The masks the engine's forward draws: bernoulli_(1 - p, generator) per Dropout in
    train mode, in layer order, each scaled by 1 / (1 - p)."""
    masks, h = [], x
    with torch.no_grad():
        for m in _leaves(model):
            if isinstance(m, torch.nn.Dropout) and m.training:
                mask = torch.empty_like(h).bernoulli_(1 - m.p, generator=generator) * (1 / (1 - m.p))
                masks.append(mask)
                h = h * mask
            else:
                h = m(h)
    return masks


def clipped_sum_ref(grads, max_norm, clip_fn="abadi", stability=0.01, groups=None):
    """DP-SGD clipping of materialised per-sample gradients: (sum_n c_n g_n, norms). Each of
    the G groups (lists of names; None: all one group) is clipped to max_norm / sqrt(G) by
    min(1, C_g / (norm + 1e-6)) ("abadi") or C_g / (norm + stability) ("automatic"); norms
    [N] (no groups) or [N, G]."""
    flat = groups is None
    groups = [list(grads)] if flat else groups
    threshold = max_norm / math.sqrt(len(groups))
    sums, columns = {}, []
    for group in groups:
        norms = torch.stack([grads[k].flatten(1).double().norm(dim=1) for k in group]).norm(dim=0)
        abadi = (threshold / (norms + 1e-6)).clamp(max=1.0)
        coef = abadi if clip_fn == "abadi" else threshold / (norms + stability)
        for k in group:
            g = grads[k].double()
            sums[k] = (g * coef.view(-1, *[1] * (g.dim() - 1))).sum(0)
        columns.append(norms)
    return sums, columns[0] if flat else torch.stack(columns, dim=1)


def noise_ref(shape, std, seed, step, index, dtype, device):
    """DP-SGD's documented noise of parameter `index` at `step` (indivgrad_cuda.randomness):
    blocks of max(1, 2**20 // row size) whole rows, block b drawn by normal_ from a generator
    seeded with the first 63 bits of blake2b(f"{seed}:{step}:{index}:{b}", 8 bytes, little
    endian)."""
    shape = tuple(shape)
    rows, rest = (shape[0], shape[1:]) if shape else (1, ())
    per = max(1, 2**20 // max(math.prod(rest), 1))
    blocks = []
    for b in range(-(-rows // per)):
        seed_b = int.from_bytes(
            hashlib.blake2b(f"{seed}:{step}:{index}:{b}".encode(), digest_size=8).digest(), "little"
        )
        g = torch.Generator(device=device).manual_seed(seed_b >> 1)
        size = min(per, rows - b * per)
        blocks.append(torch.empty((size, *rest), dtype=dtype, device=device).normal_(0.0, std, generator=g))
    return torch.cat(blocks).reshape(shape)


def func_module_grads(model, inputs, target, loss_fn, reduction="mean"):
    """Per-sample gradients of any module's trainable parameters by torch.func: vmap of
    grad over single-sample batches of every tensor in `inputs` (a Tensor, tuple or dict).
    A scalar loss of one sample is that sample's loss under either reduction."""
    from torch.func import functional_call, grad, vmap

    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def one(v):
        return v[None] if isinstance(v, torch.Tensor) else v

    def sample_loss(p, xi, ti):
        if isinstance(xi, dict):
            args, kwargs = (), {k: one(v) for k, v in xi.items()}
        elif isinstance(xi, tuple):
            args, kwargs = tuple(one(v) for v in xi), {}
        else:
            args, kwargs = (one(xi),), {}
        out = functional_call(model, {**p, **frozen}, args, kwargs)
        loss = loss_fn(out) if ti is None else loss_fn(out, ti[None])
        return loss.sum()

    return vmap(grad(sample_loss), in_dims=(None, 0, None if target is None else 0))(trainable, inputs, target)


def dp_sgd_reference(
    model,
    logical_steps,
    loss_fn,
    *,
    max_grad_norm,
    noise_multiplier,
    expected_batch_size,
    seed,
    lr,
    clip_fn="abadi",
    stability=0.01,
    groups=None,
    adaptive=None,
):
    """DP-SGD from materialised float64 torch.func per-sample gradients, on a float64 copy of
    the model: per logical step (a list of physical batches (inputs, target)), clip each
    sample (clipped_sum_ref), sum, add the noise once (noise_ref, std noise multiplier x
    threshold), divide by expected_batch_size and take a plain SGD step of `lr`.

    ``adaptive``: dict(target_quantile, learning_rate, count_noise_std, min_norm, max_norm)
    of Andrew et al.'s update: the gradient's noise multiplier (z^-2 - (2 s)^-2)^-1/2, then
    C <- clamp(C exp(-lr (b - q))) with b = (unclipped - samples / 2 + N(0, s²)) / B + 1/2,
    the count's noise from a CPU generator seeded with blake2b(f"{seed}:{step}:count").
    Returns the final parameters, each physical batch's norms and each step's threshold."""
    import copy

    ref = copy.deepcopy(model).double()
    device = next(ref.parameters()).device
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    all_norms, thresholds = [], []
    for step, batches in enumerate(logical_steps):
        thresholds.append(max_grad_norm)
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        unclipped = samples = 0
        for inputs, target in batches:
            if len(target) == 0:
                continue
            inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
            grads = func_module_grads(ref, inputs if len(inputs) > 1 else inputs[0], target, loss_fn)
            sums, norms = clipped_sum_ref(grads, max_grad_norm, clip_fn, stability, groups)
            all_norms.append(norms)
            threshold = max_grad_norm / math.sqrt(1 if groups is None else len(groups))
            kept = norms + 1e-6 <= threshold
            unclipped += int((kept if groups is None else kept.all(dim=1)).sum())
            samples += len(target)
            for n in total:
                total[n] += sums[n]
        z = noise_multiplier
        if adaptive is not None and z > 0:
            z = (z**-2 - (2 * adaptive["count_noise_std"]) ** -2) ** -0.5
        with torch.no_grad():
            for k, (n, p) in enumerate(params.items()):
                noise = noise_ref(p.shape, z * max_grad_norm, seed, step, k, p.dtype, device) if z > 0 else 0
                p -= lr * (total[n] + noise) / expected_batch_size
        if adaptive is not None:
            noise = 0.0
            if noise_multiplier > 0:
                digest = hashlib.blake2b(f"{seed}:{step}:count".encode(), digest_size=8).digest()
                g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
                noise = torch.empty((), dtype=torch.float64).normal_(0.0, adaptive["count_noise_std"], generator=g)
            b = (unclipped - samples / 2 + float(noise)) / expected_batch_size + 0.5
            max_grad_norm *= math.exp(-adaptive["learning_rate"] * (b - adaptive["target_quantile"]))
            max_grad_norm = min(max(max_grad_norm, adaptive.get("min_norm", 0.0)), adaptive.get("max_norm", math.inf))
    return {n: p.detach() for n, p in ref.named_parameters()}, all_norms, thresholds


def loop_module_grads(model, inputs, target, loss_fn):
    """Per-sample gradients by a plain loop: one backward per sample, on a batch of that sample
    alone (inputs a Tensor, tuple or dict; tensors of one row shared by the batch are passed
    as they are). For models torch.func cannot run (data-dependent control flow)."""

    def rows(v, i):
        return v[i : i + 1] if isinstance(v, torch.Tensor) and v.shape[0] > 1 else v

    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = {k: [] for k in params}
    n = target.shape[0]
    for i in range(n):
        model.zero_grad(set_to_none=True)
        if isinstance(inputs, dict):
            out = model(**{k: rows(v, i) for k, v in inputs.items()})
        elif isinstance(inputs, tuple):
            out = model(*(rows(v, i) for v in inputs))
        else:
            out = model(rows(inputs, i))
        loss_fn(out, target[i : i + 1]).backward()
        for k, p in params.items():
            grads[k].append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in grads.items()}
