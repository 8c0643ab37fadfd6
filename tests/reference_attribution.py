"""float64 references of the attribution estimators, from explicit per-sample gradients
(torch.func), explicit covariance and Kronecker matrices, and dense inverses: small models only."""

import torch
from torch import nn

from tests.reference import func_module_grads


def sampled_labels(model, x, seed, k):
    """The true Fisher's labels of pass k, by the documented rule: u ~ U[0, 1) per sample from
    a generator seeded ``2 * seed + k``, the label where the softmax's CDF passes u."""
    u = torch.rand(len(x), generator=torch.Generator().manual_seed(2 * seed + k), dtype=torch.float64)
    with torch.no_grad():
        cdf = torch.softmax(model(x).double(), -1).cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0].clamp(max=cdf.shape[1] - 1)


def linear_factors(model, x, y, per_sample_loss):
    """{path: (A' rows [R, D_in(+1)], G rows [R, D_out])} of every nn.Linear with a trainable
    weight, from hooks and the gradient of the summed per-sample losses (each sample's own)."""
    saved, outs = {}, {}
    handles = []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight.requires_grad:

            def hook(mod, args, out, path=path):
                out.retain_grad()
                saved[path], outs[path] = args[0].detach(), out

            handles.append(m.register_forward_hook(hook))
    try:
        per_sample_loss(model(x), y).sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    factors = {}
    for path, a in saved.items():
        m = model.get_submodule(path)
        a = a.reshape(-1, a.shape[-1])
        if m.bias is not None and m.bias.requires_grad:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        factors[path] = (a, outs[path].grad.reshape(-1, outs[path].shape[-1]))
    return factors


def flat_grads(model, x, y, per_sample_loss):
    """{path: [N, P_layer]}: each layer's per-sample gradients, a Linear's as [weight | bias] rows."""
    grads = func_module_grads(model, x, y, lambda out, t: per_sample_loss(out, t).sum())
    out = {}
    for path, m in model.named_modules():
        own = [(a, p) for a, p in m.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        names = {a: f"{path}.{a}" if path else a for a, _ in own}
        if isinstance(m, nn.Linear) and m.weight.requires_grad:
            w = grads[names["weight"]]
            parts = [w] + ([grads[names["bias"]][..., None]] if "bias" in names else [])
            out[path] = torch.cat(parts, -1).flatten(1)
        else:
            out[path] = torch.cat([grads[names[a]].flatten(1) for a, _ in own], 1)
    return out


def influence_ref(model, fit, train, test, per_sample_loss, strategy, fisher, damping=None, seed=0, measurement=None):
    """[N_train, N_test]: sum over layers of ``G_train (H + λI)⁻¹ G_testᵀ``, H per Linear
    layer ``S ⊗ A`` (K-FAC, the explicit Kronecker product) or ``K diag(Λ) Kᵀ`` with
    ``K = U_g ⊗ U_a`` (EK-FAC), per other layer ``diag(mean g²)``; dense inverses."""
    x, y = fit
    y0 = y if fisher == "empirical" else sampled_labels(model, x, seed, 0)
    y1 = y if fisher == "empirical" else sampled_labels(model, x, seed, 1)
    factors = linear_factors(model, x, y0, per_sample_loss)
    fit0, fit1 = flat_grads(model, x, y0, per_sample_loss), flat_grads(model, x, y1, per_sample_loss)
    g_train = flat_grads(model, *train, per_sample_loss)
    g_test = flat_grads(model, *test, measurement or per_sample_loss)
    total = 0
    for path, gt in g_train.items():
        if path in factors:
            a, g = factors[path]
            cov_a, cov_s = a.t() @ a / len(a), g.t() @ g / len(g)
            if strategy == "kfac":
                h = torch.kron(cov_s, cov_a)
            else:
                ua, ug = torch.linalg.eigh(cov_a)[1], torch.linalg.eigh(cov_s)[1]
                k = torch.kron(ug, ua)
                lam = ((fit1[path] @ k) ** 2).mean(0)
                h = k @ torch.diag(lam) @ k.t()
            lam_mean = torch.diagonal(h).mean() if strategy == "kfac" else lam.mean()
        else:
            h = torch.diag((fit0[path] ** 2).mean(0))
            lam_mean = torch.diagonal(h).mean()
        d = 0.1 * lam_mean if damping is None else damping
        total = total + gt @ torch.linalg.inv(h + d * torch.eye(len(h), dtype=h.dtype)) @ g_test[path].t()
    return total


def trak_ref(projections, models_state, model, train, test, output_fn, weight_fn, regularization=0.0):
    """TRAK's formula from explicit projected gradients: for each checkpoint c (its state
    and its exposed projection), ``Φ_c = proj_c(∇ output_fn)``, ``K_c = Φ_c (Φ_cᵀΦ_c + λI)⁻¹
    φ_c(test)ᵀ`` (the pseudo-inverse when λ = 0); scores ``mean_c K_c · mean_c Q_c`` with ``Q_c = weight_fn``."""
    ks, qs = [], []
    own = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for proj, state in zip(projections, models_state):
            model.load_state_dict(state)

            def feats(x, y, proj=proj):
                grads = func_module_grads(model, x, y, lambda out, t: output_fn(out, t).sum())
                return proj.apply({k: v.double() for k, v in grads.items()}).double()

            phi, phi_test = feats(*train), feats(*test)
            xtx = phi.t() @ phi + regularization * torch.eye(phi.shape[1], dtype=phi.dtype)
            inv = torch.linalg.pinv(xtx) if regularization == 0 else torch.linalg.inv(xtx)
            ks.append(phi @ inv @ phi_test.t())
            with torch.no_grad():
                qs.append(weight_fn(model(train[0]), train[1]).double())
    finally:
        model.load_state_dict(own)
    return torch.stack(ks).mean(0) * torch.stack(qs).mean(0)[:, None]
