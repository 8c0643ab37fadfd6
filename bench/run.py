"""End-to-end benchmark: per-sample gradients, norms and clipped sums of the seed's MLPs,
indivgrad_cuda beside plain autograd, a per-sample loop, the seed's bmm method, torch.func,
Opacus and BackPACK, each checked against a float64 reference before it is timed.

    python bench/run.py                    # the seed's setups (plus larger ones on a GPU)
    python bench/run.py --setups 32,300,50 1000,100,10 --device cpu
    python bench/run.py --quick            # a small smoke run

Setups are [N, D, L]: N samples, width D, L hidden Linear+ReLU layers, one logit, mean
BCE-with-logits loss (the seed's main.py). Rows are appended to bench/results/results.csv.
"""

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from methods import METHODS, MissingDependency  # noqa: E402
from tests.reference import clipped_sum_ref, func_per_sample_grads  # noqa: E402

SEED_SETUPS = [(2, 3, 1), (10, 100, 10), (100, 100, 10), (100, 300, 3), (32, 300, 50), (1000, 100, 10)]
GPU_SETUPS = [(256, 1024, 4), (64, 4096, 2), (512, 300, 50)]
QUICK_SETUPS = [(2, 3, 1), (16, 20, 3)]
TOLERANCE = 1e-3  # relative error accepted in float32 (per sample, or of a batch-level result)
MAX_SAMPLES_OFF = 0.01  # the fraction of samples allowed past it (see samples_off)
LOOP_BUDGET_S = 2.0  # the per-sample loop is skipped when one run would take longer


def seed_mlp(d, hidden_layers):
    layers = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(d, d), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(d, 1))


def rel_err(got, ref):
    """Relative error (Frobenius) of a tensor, or the largest over a dict's entries."""
    if isinstance(ref, dict):
        return max(rel_err(got[k], v) for k, v in ref.items())
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def samples_off(got, ref):
    """How many samples' per-sample gradients are off by more than TOLERANCE (relative).
    A float32 forward can put a pre-activation that float64 sees just above 0 just below
    it, which changes that one sample's gradient: a rounding effect, not a wrong method,
    as long as it stays rare."""
    err = torch.stack([(got[k].double() - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-30)
                       for k, r in ref.items()]).amax(0)
    return int((err > TOLERANCE).sum())


def check(result, ref, kind):
    """(max relative error, note): the note starts with WRONG when the result is not accepted."""
    err = rel_err(result, ref)
    if kind == "grads":
        off, n = samples_off(result, ref), len(next(iter(ref.values())))
        if off > MAX_SAMPLES_OFF * n:
            return err, f"WRONG: {off} of {n} samples off by more than {TOLERANCE}"
        return err, f"{off} of {n} samples off by more than {TOLERANCE} (float32 at a ReLU kink)" if off else ""
    return err, (f"WRONG: relative error {err:.2e} > {TOLERANCE}" if err > TOLERANCE else "")


def references(model, x, y):
    """float64 per-sample gradients (torch.func), their mean, norms and a clipped sum
    whose max_norm (the median norm) clips about half the samples."""
    m64 = copy.deepcopy(model).double()
    grads = func_per_sample_grads(m64, x.double(), y.double(), nn.BCEWithLogitsLoss())
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    max_norm = norms.median().item()
    clipped, _ = clipped_sum_ref(grads, max_norm)
    refs = {"grads": grads, "mean_grad": {k: g.mean(0) for k, g in grads.items()}, "norms": norms,
            "clipped": clipped}
    return refs, max_norm


def bench_setup(setup, device, methods, progress):
    n, d, hidden = setup
    torch.manual_seed(0)
    model = seed_mlp(d, hidden).to(device)
    x = torch.randn(n, d, device=device)
    y = torch.randint(0, 2, (n, 1), device=device).float()
    refs, max_norm = references(model, x, y)
    rows, summed_ms = [], None
    for name in methods:
        factory, kind = METHODS[name]
        progress(f"{list(setup)} {name}")
        row = {"setup": "x".join(map(str, setup)), "method": name}
        try:
            fn = factory(model, x, y, max_norm=max_norm)
        except MissingDependency as e:
            row["note"] = f"skipped: {e}"
            rows.append(row)
            continue
        if name == "loop" and summed_ms is not None and summed_ms * n / 1e3 > LOOP_BUDGET_S:
            row["note"] = f"skipped: about {summed_ms * n / 1e3:.0f} s a run"
            rows.append(row)
            continue
        row["max_rel_err"], row["note"] = check(fn(), refs[kind], kind)
        if row["note"].startswith("WRONG"):
            rows.append(row)
            continue
        row["median_ms"] = common.time_ms(fn, device)
        # a fresh instance, so lazily allocated state (indivgrad's reused buffers) is counted
        row["peak_mem_mb"] = common.peak_memory_mb(factory(model, x, y, max_norm=max_norm), device)
        if name == "summed":
            summed_ms = row["median_ms"]
        row["ratio_vs_summed"] = row["median_ms"] / summed_ms if summed_ms else None
        rows.append(row)
    return rows


def print_table(setup_rows):
    setup = setup_rows[0]["setup"]
    print(f"\n[N, D, L] = [{setup.replace('x', ', ')}]")
    print(f"  {'method':<18} {'median ms':>10} {'x summed':>9} {'peak MB':>9} {'rel err':>9}  note")
    for r in setup_rows:
        print(f"  {r['method']:<18} {common.fmt(r.get('median_ms')):>10} {common.fmt(r.get('ratio_vs_summed')):>9} "
              f"{common.fmt(r.get('peak_mem_mb')):>9} {common.fmt(r.get('max_rel_err'), 2):>9}  {r.get('note', '')}")


def parse_setup(text):
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a setup is N,D,L with positive integers, got {text!r}")
    return tuple(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", type=parse_setup, help="N,D,L triples (default: the seed's six, "
                        "plus larger ones on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="two small setups, for smoke tests")
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    setups = args.setups or (QUICK_SETUPS if args.quick else SEED_SETUPS + (GPU_SETUPS if device.type == "cuda" else []))
    if "summed" not in args.methods:
        args.methods = ["summed"] + args.methods  # every ratio is to the summed gradient
    context = common.run_context(device)
    print(f"bench/run.py on {context['device']}, torch {context['torch']}, commit {context['commit']}")

    def progress(msg):
        print(f"\r  running {msg:<60}", end="", file=sys.stderr, flush=True)

    all_rows = []
    for setup in setups:
        rows = bench_setup(setup, device, args.methods, progress)
        print("\r" + " " * 72 + "\r", end="", file=sys.stderr)
        print_table(rows)
        all_rows += [{**context, "bench": "run", **r} for r in rows]
    skipped = sorted({f"{r['method']} ({r['note'][9:]})" for r in all_rows if r.get("note", "").startswith("skipped")})
    if skipped:
        print("\nskipped: " + "; ".join(skipped))
    path = common.append_rows(all_rows, args.results_dir)
    print(f"\n{len(all_rows)} rows appended to {path}")
    if not args.no_plot:
        import plot
        for png in plot.plot_latest(path, "run"):
            print(f"plot: {png}")
    wrong = [r for r in all_rows if r.get("note", "").startswith("WRONG")]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
