"""Data attribution on scikit-learn's digits (shipped with the package, no download).

Part 1, mislabel detection: 10% of the training labels flipped to another class at random;
a 64-256-256-10 MLP trained with SGD, a checkpoint every few epochs; training samples ranked
by TracIn self-influence (sum over checkpoints of lr · ||per-sample gradient||², exact from
the engine's norms), by the same from gradients projected to --projection-dim (TRAK-style),
by the final model's loss, and at random. Prints the fraction of the flipped labels found in
the top 10% and 20% of each ranking, and the time each ranking took.

Part 2, speed against the libraries people use, on the same model and data in one run:
(a) train x test gradient inner products, N_train in --train-sizes (digits images repeated
with Gaussian pixel noise of std 0.05 on the 0..1 scale to reach N) against --test-size test
samples: PerSampleGrads.inner_products (no per-sample gradient formed); torch.func per-sample
gradients of both sets (train in chunks of 1,000) and a matmul; dattri's TracInAttributor
with its projection off (one checkpoint, weight 1: the same inner products). (b) each
training sample's gradient projected to --dims dimensions (N = the first train size):
PerSampleGrads.project (Kronecker-factored, LoGra-style); torch.func gradients times a dense
Gaussian matrix held in memory (not counted in the peak; its size is printed); traker's and
dattri's "normal" projectors on torch.func gradients (traker's BasicProjector, on either
device: its CudaProjector needs the fast_jl CUDA extension, which has no wheel; dattri's
random_project, which on CUDA draws and holds its dense matrix on the GPU). traker computes
no exact inner products, so it appears in (b) only. On CUDA, last, the fused 2-D Gram kernel
against two GEMMs for a few layer shapes (rows with bench "gram_kernel").

Every result is checked against float64 before it is timed: (a) 200 train rows against
every test column from float64 torch.func gradients; (b) the same projection applied to
float64 torch.func gradients (the exposed matrices for ours, each library's projector for
theirs). Exits 1 if any differs by more than 1e-3 relative to the largest entry.
Times are medians of --repeats calls, interleaved; peak memory is the process's resident
high-water mark during one call above its resident size before it, with glibc returning
every allocation over 64 KiB on free (CPU), or torch's peak allocation (CUDA).

    python bench/attribution_digits.py [--device cpu|cuda] [--part all|mislabel|speed]
"""

import argparse
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch
import torch.nn.functional as F
from torch import nn

import common
import console
import indivgrad_cuda as ig
from tests.reference import func_module_grads

CHECK_ROWS = 200
TOLERANCE = 1e-3


def load_digits_split(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    as_t = torch.tensor
    return (as_t(x_tr, dtype=torch.float32), as_t(y_tr)), (as_t(x_te, dtype=torch.float32), as_t(y_te))


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


# ---------------------------------------------------------------- part 1: mislabel detection


def mislabel(args, device):
    (x, y), (x_te, y_te) = load_digits_split(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    n = len(y)
    flipped = torch.randperm(n, generator=g)[: n // 10]
    y_noisy = y.clone()
    y_noisy[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10  # another class
    x, y_noisy, x_te, y_te = x.to(device), y_noisy.to(device), x_te.to(device), y_te.to(device)
    model = make_model(args.seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    checkpoints = []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        for idx in torch.randperm(n, generator=g).split(args.batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y_noisy[idx]).backward()
            opt.step()
        if (epoch + 1) % args.checkpoint_every == 0:
            checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        final_loss = F.cross_entropy(model(x), y_noisy, reduction="none")
    print(
        f"mislabel detection: digits, {n} training samples, {len(flipped)} labels flipped to another class; "
        f"64-256-256-10 MLP, SGD lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs ({train_s:.1f} s), "
        f"{len(checkpoints)} checkpoints (every {args.checkpoint_every} epochs), test accuracy {acc:.3f}; "
        f"{common.device_name(device)}"
    )
    is_flipped = torch.zeros(n, dtype=torch.bool)
    is_flipped[flipped] = True
    train = (x, y_noisy)

    def timed(fn):
        common.sync(device)
        t = time.perf_counter()
        out = fn()
        common.sync(device)
        return out.cpu(), (time.perf_counter() - t) * 1e3

    rankings = {
        "TracIn self-influence (exact)": timed(
            lambda: ig.tracin_self_influence(model, checkpoints, args.lr, train, F.cross_entropy)
        ),
        f"TracIn self-influence (projected, dim {args.projection_dim})": timed(
            lambda: ig.tracin_self_influence(
                model, checkpoints, args.lr, train, F.cross_entropy, projection_dim=args.projection_dim
            )
        ),
        "loss of the final model": (final_loss.cpu(), 0.0),
        "random": (torch.rand(n, generator=g), 0.0),
    }
    print(f"  {'ranking':<48} {'top 10%':>8} {'top 20%':>8} {'ms':>9}")
    found = {}
    for label, (score, ms) in rankings.items():
        order = score.argsort(descending=True)
        found[label] = [is_flipped[order[: int(n * q)]].sum().item() / len(flipped) for q in (0.1, 0.2)]
        print(f"  {label:<48} {found[label][0]:>8.3f} {found[label][1]:>8.3f} {ms:>9.1f}")
    print(
        "  (found: the fraction of the flipped labels among the top-ranked training samples; "
        "random expects 0.1 and 0.2)"
    )
    return found


# ---------------------------------------------------------------- part 2: speed against the peers


def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_mb(fn, device):
    """Peak memory of one fn() call (see the module's docs)."""
    if device.type == "cuda":
        return common.peak_memory_mb(fn, device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the resident high-water mark
    base = status_mb("VmRSS:")
    result = fn()
    peak = status_mb("VmHWM:") - base
    del result
    return peak


def flat_grads(model, x, y, chunk=1000, dtype=None):
    """[N, P] torch.func per-sample gradients in named_parameters() order, chunk by chunk."""
    m = model if dtype is None else _as(model, dtype)
    x = x if dtype is None else x.to(dtype)
    parts = []
    for i in range(0, len(x), chunk):
        g = func_module_grads(m, x[i : i + chunk], y[i : i + chunk], F.cross_entropy)
        parts.append(torch.cat([t.flatten(1) for t in g.values()], 1))
    return torch.cat(parts)


def _as(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def func_inner_products(model, train, test, chunk=1000):
    g_test = flat_grads(model, *test)
    return torch.cat(
        [
            flat_grads(model, train[0][i : i + chunk], train[1][i : i + chunk]) @ g_test.t()
            for i in range(0, len(train[0]), chunk)
        ]
    )


def dattri_inner_products(model, train, test, batch=1000):
    from dattri.algorithm import tracin
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    def loss(params, data):
        xb, yb = data
        return F.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False, device=str(train[0].device))
    attributor.projector_kwargs = None  # its constructor always sets one (dattri 0.3.0); None: exact inner products
    tracin.tqdm = lambda it, **kw: it  # its progress bars, one per batch, would bury the table
    loaders = [DataLoader(TensorDataset(*s), batch_size=batch, shuffle=False) for s in (train, test)]
    return attributor.attribute(*loaders)


def traker_project(grads, dim, device):
    from trak.projectors import BasicProjector, ProjectionType

    proj = BasicProjector(grads.shape[1], dim, seed=0, proj_type=ProjectionType.normal, device=device)
    return lambda g: proj.project(g, model_id=0)


def dattri_project(grads, dim, device):
    from dattri.func.projection import random_project

    proj = random_project(grads, grads.shape[0], dim, 32, proj_type="normal", device=device)
    return lambda g: proj(g, ensemble_id=0)


def inner_product_methods(model, engine, train, test):
    return {
        "indivgrad inner_products": lambda: engine.inner_products(*train, *test, F.cross_entropy),
        "torch.func grads + matmul": lambda: func_inner_products(model, train, test),
        "dattri TracInAttributor (no projection)": lambda: dattri_inner_products(model, train, test),
    }


def projection_methods(model, engine, train, dim, proj, dense, peers, chunk=1000):
    """Ours, then torch.func gradients (chunk by chunk) through the dense matrix and each peer's projector."""

    def through(project):
        x, y = train
        return torch.cat(
            [project(flat_grads(model, x[i : i + chunk], y[i : i + chunk])) for i in range(0, len(x), chunk)]
        )

    return {
        f"indivgrad project (D_proj {proj.dim})": lambda: engine.project(*train, F.cross_entropy, dim=dim),
        "torch.func grads @ dense matrix": lambda: through(lambda g: g @ dense),
        **{f"torch.func + {k}": (lambda p=p: through(p)) for k, p in peers.items()},
    }


def rel_err(got, ref):
    return ((got.double().cpu() - ref.double().cpu()).abs().max() / ref.abs().max()).item()


def speed(args, device, context):
    (x, y), (x_te, y_te) = load_digits_split(args.seed)
    model = make_model(args.seed).to(device).eval()
    g = torch.Generator().manual_seed(args.seed)

    def pool(n):
        idx = torch.arange(n) % len(x)
        return (x[idx] + 0.05 * torch.randn(n, 64, generator=g) * (idx >= len(x))[:, None]).to(device), y[idx].to(
            device
        )

    test = (x_te[: args.test_size].to(device), y_te[: args.test_size].to(device))
    engine = ig.PerSampleGrads(model)
    ok = True
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\nspeed: 64-256-256-10 MLP ({params:,} parameters), float32, {common.device_name(device)}, "
        f"torch {torch.__version__}; median of {args.repeats} interleaved calls"
    )
    progress = console.Progress(len(args.train_sizes) + len(args.dims), args.quiet, unit="setup")

    def measure(setup, methods, check):
        """Each method's first call is checked and its peak memory taken; then the timed calls."""
        nonlocal ok
        errors, mem = {}, {}
        for name, fn in methods.items():
            result = []
            mem[name] = peak_mb(lambda fn=fn, result=result: result.append(fn()), device)
            errors[name] = check(name, result.pop())
            ok = ok and errors[name] < TOLERANCE
        ms = common.time_interleaved(
            methods, device, warmup=0, min_repeats=args.repeats, max_repeats=args.repeats, budget_s=0, warm=0
        )
        ours = next(iter(methods))
        rows = []
        with progress.paused():
            for name in methods:
                print(
                    f"  {setup:<34} {name:<40} {ms[name]:>10.1f} {ms[name] / ms[ours]:>7.2f}x {mem[name]:>9.1f} "
                    f"{errors[name]:>9.1e}"
                )
                rows.append(
                    dict(
                        context,
                        bench="attribution",
                        setup=setup,
                        method=name,
                        median_ms=ms[name],
                        peak_mem_mb=mem[name],
                        max_rel_err=errors[name],
                        note=f"time vs ours {ms[name] / ms[ours]:.2f}x",
                    )
                )
        common.append_rows(rows, args.results_dir)  # each setup's rows as measured: a run cut short keeps them

    print(f"  {'setup':<34} {'method':<40} {'ms':>10} {'vs ours':>8} {'peak MB':>9} {'rel err':>9}")
    for n in args.train_sizes:
        progress.start(f"inner products, N_train={n}")
        train = pool(n)
        ref = func_inner_products(
            _as(model, torch.float64),
            (train[0][:CHECK_ROWS].double(), train[1][:CHECK_ROWS]),
            (test[0].double(), test[1]),
        )
        methods = inner_product_methods(model, engine, train, test)
        measure(f"inner products {n}x{args.test_size}", methods, lambda name, k, ref=ref: rel_err(k[:CHECK_ROWS], ref))

    n = args.train_sizes[0]
    train = pool(n)
    ref_grads = flat_grads(model, *train, dtype=torch.float64)
    named = {
        k: v.flatten(1)
        for k, v in func_module_grads(_as(model, torch.float64), train[0].double(), train[1], F.cross_entropy).items()
    }
    for dim in args.dims:
        progress.start(f"projections, dim {dim}")
        proj = engine.projection(dim)
        dense = torch.randn(params, dim, generator=torch.Generator().manual_seed(0)).div_(dim**0.5).to(device)
        grads = flat_grads(model, *train)
        peers = {
            "traker BasicProjector": traker_project(grads, dim, device),
            "dattri random_project": dattri_project(grads, dim, device),
        }
        del grads
        refs = {
            f"indivgrad project (D_proj {proj.dim})": proj.apply({k: v.to(device) for k, v in named.items()}),
            "torch.func grads @ dense matrix": ref_grads.to(device) @ dense.double(),
            **{f"torch.func + {k}": p(ref_grads.float().to(device)) for k, p in peers.items()},
        }
        methods = projection_methods(model, engine, train, dim, proj, dense, peers)
        measure(
            f"project {n} to {dim} (dense {params * dim * 4 / 1e6:.0f} MB)",
            methods,
            lambda name, got, refs=refs: rel_err(got, refs[name]),
        )
        del dense
    progress.close()
    return ok


def gram_kernel_sweep(args, device, context):
    """CUDA only: the fused 2-D Gram kernel (ig.ops.linear_gram) against the same inner
    products from two GEMMs and two elementwise passes, for the bench MLP's layer shapes at
    the largest train size (bench/NOTES.md has the prediction); each shape's rows appended."""
    n_a, n_b = args.train_sizes[-1], args.test_size
    print(f"\nthe fused Gram kernel against two GEMMs (FP32, no TF32), {n_a} x {n_b}, {common.device_name(device)}")
    print(
        f"  {'D_in -> D_out':<16} {'kernel ms':>10} {'GEMMs ms':>10} {'kernel MB':>10} {'GEMMs MB':>10} {'rel err':>9}"
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    for d_in, d_out in ((64, 256), (256, 256), (256, 10), (16, 16), (1024, 1024)):
        fns, ref = _gram_pair(n_a, n_b, d_in, d_out, device)
        errs = {k: rel_err(fn(), ref) for k, fn in fns.items()}
        ok = ok and max(errs.values()) < TOLERANCE
        ms = common.time_interleaved(fns, device)
        mem = {k: common.peak_memory_mb(fn, device) for k, fn in fns.items()}
        print(
            f"  {f'{d_in} -> {d_out}':<16} {ms['kernel']:>10.3f} {ms['gemms']:>10.3f} {mem['kernel']:>10.1f} "
            f"{mem['gemms']:>10.1f} {max(errs.values()):>9.1e}"
        )
        rows = [
            dict(
                context,
                bench="gram_kernel",
                setup=f"linear_gram {n_a}x{n_b}, D_in {d_in}, D_out {d_out}, bias 1",
                method={"kernel": "ig.ops.linear_gram (fused kernel)", "gemms": "two GEMMs + elementwise"}[k],
                median_ms=ms[k],
                peak_mem_mb=mem[k],
                max_rel_err=errs[k],
            )
            for k in fns
        ]
        common.append_rows(rows, args.results_dir)
    return ok


def _gram_pair(n_a, n_b, d_in, d_out, device):
    """({"kernel": fn, "gemms": fn}, the float64 reference) on random factors of one layer shape."""
    xa, ga = torch.randn(n_a, d_in, device=device), torch.randn(n_a, d_out, device=device)
    xb, gb = torch.randn(n_b, d_in, device=device), torch.randn(n_b, d_out, device=device)
    fns = {
        "kernel": lambda: ig.ops.linear_gram(xa, ga, xb, gb, bias=1.0),
        "gemms": lambda: (xa @ xb.t()).add_(1.0).mul_(ga @ gb.t()),
    }
    return fns, (xa.double() @ xb.double().t() + 1) * (ga.double() @ gb.double().t())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=["all", "mislabel", "speed"], default="all")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--projection-dim", type=int, default=1024)
    parser.add_argument(
        "--train-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[2000, 5000, 10000, 20000]
    )
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--dims", type=lambda s: [int(v) for v in s.split(",")], default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    console.add_quiet_flag(parser)
    args = parser.parse_args(argv)
    console.silence_peer_warnings()
    device = torch.device(args.device)
    ok = True
    if args.part in ("all", "mislabel"):
        found = mislabel(args, device)
        ok = ok and all(f > r for f, r in zip(found["TracIn self-influence (exact)"], found["random"]))
    if args.part in ("all", "speed"):
        if device.type == "cpu":  # glibc: allocations over 64 KiB are mapped and unmapped, so RSS tracks them
            ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        context = common.run_context(device)
        speed_ok = speed(args, device, context)
        if device.type == "cuda":
            speed_ok = gram_kernel_sweep(args, device, context) and speed_ok
        print(f"rows appended to {Path(args.results_dir) / 'results.csv'}")
        ok = ok and speed_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
