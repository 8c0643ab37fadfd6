"""The cost rules of the sequence and convolution norms, measured: ghost against direct
squared norms of per-sample gradients (ig.ops.linear_sq_norms, ig.ops.embedding_sq_norms)
over T, and for Linear beside them the unfused forms they replaced (issue 28: "grams", the
[N, T, T] Grams by bmm of blocks of samples, multiplied and summed; "grads", the [D_out, D_in]
gradients of blocks of samples, squared and summed); for convolutions
(indivgrad_cuda.layers.conv) the per-sample gradients from unfolded patches against a
convolution grouped over the batch, the ghost against the direct norm, and the clipped sum
by the layer's weight gradient against one GEMM over the unfolded rows; each beside the
method "auto" picks, each result checked against the other method first.

    python bench/norms.py [--device cpu|cuda] [--n 32] [--threads K] [--only linear|embedding|conv] [--quick]

Prints one table per layer shape: the median time of each method, the faster one, and
auto's pick (a pick slower than the other method by more than 20% is marked).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch

import common
import indivgrad_cuda as ig
from indivgrad_cuda.layers import Factors, conv

LINEAR_SHAPES = [(128, 128), (256, 1024), (768, 768)]
TOKENS = [4, 16, 64, 256, 1024]
EMBEDDING = (1000, 128)  # vocabulary, width
# (C_in, C_out, kernel, image side, groups): the Opacus CIFAR-10 CNN's and WRN-16-4's layers,
# a 1-D and a 3-D one, depthwise
CONV_SHAPES = [
    (3, 32, 3, 32, 1),
    (32, 64, 3, 16, 1),
    (64, 64, 3, 8, 1),
    (64, 128, 3, 4, 1),
    (16, 64, 3, 32, 1),
    (128, 128, 3, 16, 1),
    (256, 256, 3, 8, 1),
    (64, 64, 3, 32, 64),
    (128, 128, 3, 8, 4),
]


def compare(label, run, pick, device, methods=("ghost", "direct"), among=None):
    """(row text, whether auto's pick, one of ``methods``, is within 20% of the fastest of
    ``among`` (default: all methods)), every method's result checked against the first's."""
    first = run(methods[0])
    for m in methods[1:]:
        torch.testing.assert_close(run(m), first, rtol=1e-4, atol=1e-5 * first.abs().max().item())
    times = common.time_interleaved({m: (lambda m=m: run(m)) for m in methods}, device, budget_s=0.3)
    fastest = min(among or times, key=times.get)
    ok = times[pick] <= 1.2 * times[fastest]
    cells = " ".join(f"{times[m]:>10.3f}" for m in methods)
    return f"  {label:<22} {cells}  {fastest:<8} {pick:<8}{'' if ok else '  <- slower pick'}", ok


def unfused_norms(x, g, method, block_bytes=64 << 20):
    """The Linear squared norms as computed before issue 28 (csrc/layer_ops.cpp at a72f85e):
    "grams" writes the [nb, T, T] Grams of blocks of samples (64 MiB of temporaries), "grads"
    the [nb, D_out, D_in] gradients; each then multiplied or squared and summed."""
    n, t, d_in = x.shape
    d_out = g.shape[2]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    per_sample = 2 * t * t if method == "grams" else d_in * d_out
    nb = max(1, min(n, block_bytes // (per_sample * x.element_size())))
    for n0 in range(0, n, nb):
        xb, gb = x[n0 : n0 + nb], g[n0 : n0 + nb]
        if method == "grams":
            grams = torch.bmm(xb, xb.transpose(1, 2)).mul_(torch.bmm(gb, gb.transpose(1, 2)))
            out[n0 : n0 + nb] = grams.sum((1, 2))
        else:
            w = torch.bmm(gb.transpose(1, 2), xb)
            out[n0 : n0 + nb] = w.mul_(w).sum((1, 2))
    return out


def linear_run(m, x, g):
    if m in ("grams", "grads"):
        return unfused_norms(x, g, m)
    return ig.ops.linear_sq_norms(x, g, method=m)


def header(first, methods):
    return f"  {first:<22} " + " ".join(f"{m:>10}" for m in methods) + f"  {'fastest':<8} {'auto':<8}"


def conv_tables(shapes, n, device):
    """Per convolution shape: per-sample gradients (its forms), norms (ghost, direct),
    clipped sums (the weight gradient, a GEMM over unfolded rows). Whether every auto pick
    is within 20% of the faster."""
    all_ok = True
    rows = {"grads": [], "norms": [], "clipped": []}
    for c_in, c_out, k, side, groups in shapes:
        layer = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups).to(device)
        x = torch.randn(n, c_in, side, side, device=device)
        g = torch.randn(n, c_out, side, side, device=device)
        f = Factors([x], [g])
        rule = conv.ConvRule()  # its own, as grad_method is set below
        geo = conv._Geometry(layer, x)
        label = f"{c_in}->{c_out} {side}x{side} g{groups}"
        coef = torch.rand(n, device=device)

        def grads(method, rule=rule, f=f, layer=layer, n=n):
            rule.grad_method = method
            out = torch.empty(n, *layer.weight.shape, device=device)
            rule.grads(layer, f, "out_in", {"weight": out})
            return out

        def norms(method, rule=rule, f=f, layer=layer):
            rule.grad_method = "auto"
            return rule.sq_norms(layer, f, ["weight"], method)["weight"]

        def clipped(method, rule=rule, f=f, layer=layer, geo=geo, x=x, g=g, coef=coef, groups=groups):
            if method == "wgrad":
                out = torch.empty_like(layer.weight)
                rule.clipped_sum(layer, f, coef, {"weight": out}, False)
                return out
            a, gf = geo.unfold(x), geo.fold_grad(g * coef[:, None, None, None])  # [N·g, T, ...]
            a = a.view(n, groups, -1, a.shape[-1]).transpose(0, 1).flatten(1, 2)  # [g, N·T, d_in]
            gf = gf.reshape(n, groups, -1, gf.shape[-1]).transpose(0, 1).flatten(1, 2)
            return torch.bmm(gf.transpose(1, 2), a).reshape(layer.weight.shape)

        form = conv.grads_form(geo.t, c_in // groups, groups)
        ghost = conv.norm_uses_ghost(geo.t, geo.d_in, geo.d_out)
        for kind, run, pick, methods in (
            ("grads", grads, form, conv.GRAD_FORMS if groups == 1 else ("unfold", "grouped")),
            ("norms", norms, "ghost" if ghost else "direct", ("ghost", "direct")),
            ("clipped", clipped, "wgrad", ("wgrad", "gemm")),
        ):
            row, ok = compare(label, run, pick, device, methods)
            rows[kind].append((row, methods))
            all_ok &= ok
    titles = {
        "grads": "per-sample gradients",
        "norms": "squared norms",
        "clipped": "clipped sum (auto: the weight gradient)",
    }
    for kind, entries in rows.items():
        print(f"\nConv2d {titles[kind]}")
        shown = None
        for row, methods in entries:
            if methods != shown:  # grouped layers have fewer forms
                print(header("layer", methods))
                shown = methods
            print(row)
    return all_ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=32, help="samples")
    parser.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", choices=("linear", "embedding", "conv"), default=None, help="one table group")
    parser.add_argument("--tokens", type=int, nargs="*", default=None, help="Linear/Embedding T values")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, tokens, (v, d) = ([(16, 24)], [2, 90], (50, 8)) if args.quick else (LINEAR_SHAPES, TOKENS, EMBEDDING)
    tokens = args.tokens or tokens
    conv_shapes = [(3, 8, 3, 8, 1), (4, 8, 3, 6, 2)] if args.quick else CONV_SHAPES
    device = torch.device(args.device)
    torch.manual_seed(0)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"bench/norms.py on {common.device_name(device)}, N={args.n}, float32{threads}; times in ms")
    all_ok = True
    linear_methods = ("ghost", "direct", "grams", "grads")
    for d_in, d_out in shapes if args.only in (None, "linear") else ():
        print(f"\nLinear {d_in} -> {d_out}\n{header('T', linear_methods)}")
        for t in tokens:
            x = torch.randn(args.n, t, d_in, device=device)
            g = torch.randn(args.n, t, d_out, device=device)
            row, ok = compare(
                t,
                lambda m, x=x, g=g: linear_run(m, x, g),
                "ghost" if ig.ops.linear_norm_uses_ghost(t, d_in, d_out) else "direct",
                device,
                linear_methods,
                among=("ghost", "direct"),
            )
            print(row)
            all_ok &= ok
    if args.only in (None, "embedding"):
        print(f"\nEmbedding {v} x {d}\n{header('T', ('ghost', 'direct'))}")
    for t in tokens if args.only in (None, "embedding") else ():
        ids = torch.randint(0, v, (args.n, t), device=device)
        g = torch.randn(args.n, t, d, device=device)
        row, ok = compare(
            t,
            lambda m, ids=ids, g=g: ig.ops.embedding_sq_norms(ids, g, 0, method=m),
            "ghost" if ig._C.embedding_norm_uses_ghost(t, "auto") else "direct",
            device,
        )
        print(row)
        all_ok &= ok
    if args.only in (None, "conv"):
        all_ok &= conv_tables(conv_shapes, args.n, device)
    print(
        "\nauto picks " + ("within 20% of the faster method everywhere" if all_ok else "a slower method where marked")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
