"""End-to-end benchmark: per-sample gradients, norms and clipped sums of MLPs and small
transformers, indivgrad_cuda beside plain autograd, a per-sample loop, the seed's bmm
method, torch.func, Opacus (hooks and ghost clipping) and BackPACK, each checked against a
float64 reference before it is timed.

    python bench/run.py                    # the seed's and the model setups (plus larger MLPs on a GPU)
    python bench/run.py --setups 32,300,50 tfm:32,64,128,2 --device cpu
    python bench/run.py --quick            # a small smoke run

Setups:
  N,D,L           the seed's MLP: N samples, width D, L hidden Linear+ReLU layers, one logit,
                  mean BCE-with-logits loss (the seed's main.py); native capture
  tfm:N,T,D,L     a transformer encoder classifier (tests/models.py): token ids [N, T] with
                  padding and a mask, vocabulary 1000, d_model D, D/32 heads, L blocks, 10
                  classes, mean cross-entropy; hooks capture
  resmlp:N,D,L    a custom nn.Module MLP with residual connections and LayerNorm, width D,
                  L residual layers, one logit, BCE-with-logits; hooks capture
For per-sample gradients the table also gives "x bound": the time over the summed step plus
writing the gradients' bytes at the fill bandwidth measured in the same run.
Rows are appended to bench/results/results.csv.
"""

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch
import torch.nn.functional as F
from torch import nn

import common
import console
from methods import METHODS, Skip, Task
from tests.models import ResidualMLP, TinyEncoder, token_batch
from tests.reference import clipped_sum_ref, func_module_grads

SEED_SETUPS = [
    ("mlp", s) for s in [(2, 3, 1), (10, 100, 10), (100, 100, 10), (100, 300, 3), (32, 300, 50), (1000, 100, 10)]
]
MODEL_SETUPS = [
    ("tfm", (32, 64, 128, 2)),
    ("tfm", (64, 128, 256, 4)),
    ("tfm", (16, 256, 512, 4)),
    ("resmlp", (256, 256, 4)),
]
GPU_SETUPS = [("mlp", s) for s in [(256, 1024, 4), (64, 4096, 2), (512, 300, 50)]]
QUICK_SETUPS = [("mlp", (2, 3, 1)), ("mlp", (16, 20, 3)), ("tfm", (4, 8, 32, 1)), ("resmlp", (8, 16, 2))]
KINDS = {
    "mlp": ("[N, D, L]", 3),
    "tfm": ("transformer [N, T, d_model, layers]", 4),
    "resmlp": ("residual MLP [N, D, L]", 3),
}
VOCAB, CLASSES = 1000, 10
WRITE = "(write)"  # timed beside the methods: a fill of the per-sample gradients' bytes
TOLERANCE = 1e-3  # relative error accepted in float32 (per sample, or of a batch-level result)
MAX_SAMPLES_OFF = 0.01  # the fraction of samples allowed past it (see samples_off)
LOOP_BUDGET_S = 2.0  # the per-sample loop is skipped when one run would take longer


def seed_mlp(d, hidden_layers):
    layers = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(d, d), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(d, 1))


def make_task(setup, device):
    kind, dims = setup
    bce = nn.BCEWithLogitsLoss()
    if kind == "tfm":
        n, t, d, layers = dims
        model = TinyEncoder(vocab=VOCAB, d_model=d, heads=max(1, d // 32), layers=layers, max_len=t, classes=CLASSES)
        ids, mask, labels = token_batch(n, t, VOCAB, CLASSES)
        return Task(
            model.to(device),
            (ids.to(device), mask.to(device)),
            labels.to(device),
            F.cross_entropy,
            functools.partial(F.cross_entropy, reduction="none"),
        )
    n, d, depth = dims
    model = seed_mlp(d, depth) if kind == "mlp" else ResidualMLP(d, d, depth, 1)
    x = torch.randn(n, d, device=device)
    y = torch.randint(0, 2, (n, 1), device=device).float()
    return Task(model.to(device), (x,), y, bce, nn.BCEWithLogitsLoss(reduction="none"), mlp=kind == "mlp")


def setup_name(setup):
    """The CSV's setup column: N x D x L for the seed's MLPs (as before), kind:dims otherwise."""
    kind, dims = setup
    dims = "x".join(map(str, dims))
    return dims if kind == "mlp" else f"{kind}:{dims}"


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
    err = torch.stack(
        [
            (got[k].double() - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-30)
            for k, r in ref.items()
        ]
    ).amax(0)
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


def references(task):
    """float64 per-sample gradients (torch.func), their mean, norms and a clipped sum
    whose max_norm (the median norm) clips about half the samples."""
    m64 = copy.deepcopy(task.model).double()

    def f64(t):
        return t.double() if t.is_floating_point() else t

    grads = func_module_grads(m64, tuple(f64(t) for t in task.inputs), f64(task.target), task.loss)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    max_norm = norms.median().item()
    clipped, _ = clipped_sum_ref(grads, max_norm)
    refs = {"grads": grads, "mean_grad": {k: g.mean(0) for k, g in grads.items()}, "norms": norms, "clipped": clipped}
    return refs, max_norm


def write_gradients(task, device):
    """A fill of a buffer of the per-sample gradients' bytes: writing them, at best."""
    numel = task.n * sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    buf = torch.empty(numel, device=device)
    return lambda: buf.fill_(1.0)


def bench_setup(setup, device, methods, progress):
    torch.manual_seed(0)
    task = make_task(setup, device)
    refs, max_norm = references(task)
    rows, summed_ms, n = [], None, task.n
    timed = {}  # name -> (fn, kind, row): the methods whose results were right, timed together below
    for name in methods:
        factory, kind = METHODS[name]
        progress(f"{setup_name(setup)} {name}")
        row = {"setup": setup_name(setup), "method": name}
        rows.append(row)
        try:
            fn = factory(task, max_norm=max_norm)
        except Skip as e:
            row["note"] = f"skipped: {e}"
            continue
        if name == "loop" and summed_ms is not None and summed_ms * n / 1e3 > LOOP_BUDGET_S:
            row["note"] = f"skipped: about {summed_ms * n / 1e3:.0f} s a run"
            continue
        try:
            first_ms, result = first_call(fn)
        except Exception as e:  # a competitor's failure is a row, not the end of the bench
            if name.startswith("indivgrad"):
                raise
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        if name == "summed":
            summed_ms = first_ms  # only to skip a loop that would take too long
        row["max_rel_err"], row["note"] = check(result, refs[kind], kind)
        if not row["note"].startswith("WRONG"):
            timed[name] = (fn, kind, row)
    progress(f"{setup_name(setup)}: timing {len(timed)} methods in turn")
    medians = common.time_interleaved(
        {WRITE: write_gradients(task, device), **{name: fn for name, (fn, _, _) in timed.items()}}, device, warmup=1
    )
    summed_ms, bound_write_ms = medians.get("summed"), medians[WRITE]
    for name, (_, kind, row) in timed.items():
        row["median_ms"] = medians[name]
        # a fresh instance, so lazily allocated state (indivgrad's reused buffers) is counted
        row["peak_mem_mb"] = common.peak_memory_mb(METHODS[name][0](task, max_norm=max_norm), device)
        row["ratio_vs_summed"] = row["median_ms"] / summed_ms if summed_ms else None
        if kind == "grads" and summed_ms:  # % of the bound: the summed step plus writing the gradients
            row["roofline_pct"] = 100 * (summed_ms + bound_write_ms) / row["median_ms"]
    return rows


def first_call(fn):
    """(wall ms, result) of a first call, whose result is checked before any timing."""
    t0 = time.perf_counter()
    result = fn()
    return (time.perf_counter() - t0) * 1e3, result


def print_table(setup, setup_rows):
    kind, dims = setup
    print(f"\n{KINDS[kind][0]} = {list(dims)}")
    print(f"  {'method':<18} {'median ms':>10} {'x summed':>9} {'x bound':>8} {'peak MB':>9} {'rel err':>9}  note")
    for r in setup_rows:
        bound = 100 / r["roofline_pct"] if r.get("roofline_pct") else None
        print(
            f"  {r['method']:<18} {common.fmt(r.get('median_ms')):>10} {common.fmt(r.get('ratio_vs_summed')):>9} "
            f"{common.fmt(bound):>8} {common.fmt(r.get('peak_mem_mb')):>9} {common.fmt(r.get('max_rel_err'), 2):>9}  "
            f"{r.get('note', '')}"
        )


def parse_setup(text):
    kind, _, dims = text.rpartition(":")
    kind = kind or "mlp"
    try:
        parts = tuple(int(v) for v in dims.split(","))
    except ValueError:
        parts = ()
    if kind not in KINDS or len(parts) != KINDS[kind][1] or min(parts, default=0) < 1:
        raise argparse.ArgumentTypeError(
            f"a setup is N,D,L, tfm:N,T,D,L or resmlp:N,D,L with positive integers, got {text!r}"
        )
    return kind, parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--setups",
        nargs="+",
        type=parse_setup,
        help="N,D,L | tfm:N,T,D,L | resmlp:N,D,L (default: "
        "the seed's six MLPs and the model setups, plus larger MLPs on a GPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="two small setups, for smoke tests")
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--no-plot", action="store_true")
    console.add_quiet_flag(parser)
    args = parser.parse_args(argv)
    console.silence_peer_warnings()
    device = torch.device(args.device)
    setups = args.setups or (
        QUICK_SETUPS if args.quick else SEED_SETUPS + MODEL_SETUPS + (GPU_SETUPS if device.type == "cuda" else [])
    )
    if "summed" not in args.methods:
        args.methods = ["summed", *args.methods]  # every ratio is to the summed gradient
    context = common.run_context(device)
    print(f"bench/run.py on {context['device']}, torch {context['torch']}, commit {context['commit']}")

    # a step per method and setup, and one for timing each setup's methods together
    progress = console.Progress(len(setups) * (len(args.methods) + 1), args.quiet)
    all_rows = []
    for setup in setups:
        rows = bench_setup(setup, device, args.methods, progress.start)
        with progress.paused():
            print_table(setup, rows)
        rows = [{**context, "bench": "run", **r} for r in rows]
        path = common.append_rows(rows, args.results_dir)  # at once: a run stopped early keeps what it measured
        all_rows += rows
    progress.close()
    skipped = sorted({f"{r['method']} ({r['note'][9:]})" for r in all_rows if r.get("note", "").startswith("skipped")})
    if skipped:
        print("\nskipped: " + "; ".join(skipped))
    print(f"\n{len(all_rows)} rows appended to {path}")
    if not args.no_plot:
        import plot

        for png in plot.plot_latest(path, "run"):
            print(f"plot: {png}")
    wrong = [r for r in all_rows if r.get("note", "").startswith("WRONG")]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
