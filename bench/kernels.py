"""The ops alone: indivgrad's outer / act_outer against torch.bmm, a broadcast multiply and
torch.compile of the broadcast multiply, beside the write roofline of the same buffer
(a fill, the same bytes filled as 32-bit words, and a device-to-device copy), over a sweep
of shapes in float32 and bfloat16: by default the large shapes (LARGE: two a device; `make
bench`), with --all every shape of the device's sweep (`make bench-all`).

    python bench/kernels.py [--quick | --all] [--device cuda|cpu] [--dtypes float32 bfloat16]
                            [--layouts out_in in_out]

Every method writes an [N, D_out, D_in] buffer ("out_in", nn.Linear's layout; the setup
name ends in /in_out for [N, D_in, D_out], with --layouts out_in in_out); µs are
medians, GB/s count the bytes of that buffer, % is of the faster fill's bandwidth (torch's
fill of a 2-byte dtype writes slower than its fill of the same bytes as 32-bit words, so the
word fill is the honest roofline for bfloat16). Results are
checked against the float64 reference first and appended to bench/results/results.csv.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch

import common
import console
import indivgrad_cuda as ig
from tests.reference import act_outer_ref, broadcast_outer, outer_ref

CPU_SHAPES = [(1000, 100, 100), (256, 300, 300), (64, 1024, 1024), (128, 1023, 257), (32, 300, 1)]
GPU_SHAPES = [
    (256, 1024, 1024),
    (64, 4096, 4096),
    (512, 300, 300),
    (1000, 100, 100),
    (128, 1023, 257),
    (4096, 256, 256),
    (32, 300, 1),
]
# The default run: the large shapes of each sweep, where the write bandwidth is the bound (on a
# GPU the two the README's roofline claims are about; on a CPU their scaled-down counterparts).
LARGE = {"cuda": [(256, 1024, 1024), (64, 4096, 4096)], "cpu": [(256, 300, 300), (64, 1024, 1024)]}
QUICK_SHAPES = [(16, 33, 17)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def methods(x, g, pre, out, bias_out, compile_broadcast, layout):
    """name -> (fn, expected result or None). Each writes (or returns) out's layout."""
    src = torch.empty_like(out)
    compiled = torch.compile(lambda a, b: broadcast_outer(a, b, layout)) if compile_broadcast else None
    w_ref, _ = act_outer_ref(x, g, pre, "relu", layout)
    plain_ref = outer_ref(x, g, layout)
    rows, cols = (g, x) if layout == "out_in" else (x, g)
    table = {
        "roofline_fill": (lambda: out.fill_(1.0), None),
        "roofline_copy": (lambda: out.copy_(src), None),
        "indivgrad_outer": (lambda: ig.outer(x, g, layout=layout, out=out), plain_ref),
        "indivgrad_act_outer": (
            lambda: ig.act_outer(x, g, pre, "relu", layout=layout, out=out, bias_out=bias_out)[0],
            w_ref,
        ),
        "bmm": (lambda: torch.bmm(rows.unsqueeze(2), cols.unsqueeze(1), out=out), plain_ref),
        "broadcast_mul": (lambda: torch.mul(rows[:, :, None], cols[:, None, :], out=out), plain_ref),
    }
    if compiled is not None:
        table["compiled_broadcast_mul"] = (lambda: compiled(x, g), plain_ref)
    if out.element_size() < 4 and out.numel() * out.element_size() % 4 == 0:
        words = out.view(-1).view(torch.int32)
        table = {"roofline_fill_words": (lambda: words.fill_(1), None), **table}
    return table


def bench_shape(shape, dtype, device, compile_broadcast, layout="out_in"):
    n, d_in, d_out = shape
    x = torch.randn(n, d_in, device=device, dtype=dtype)
    g = torch.randn(n, d_out, device=device, dtype=dtype)
    pre = torch.randn(n, d_out, device=device, dtype=dtype)
    out = torch.empty((n, d_out, d_in) if layout == "out_in" else (n, d_in, d_out), device=device, dtype=dtype)
    bias_out = torch.empty(n, d_out, device=device, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    setup = f"{n}x{d_in}x{d_out}/{str(dtype).replace('torch.', '')}" + ("" if layout == "out_in" else "/in_out")
    rows = []
    for name, (fn, ref) in methods(x, g, pre, out, bias_out, compile_broadcast, layout).items():
        row = {"setup": setup, "method": name}
        if ref is not None:
            got = fn()
            err = ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            row["max_rel_err"] = err
            if not err <= TOL[dtype]:
                row["note"] = f"WRONG: relative error {err:.2e}"
                rows.append(row)
                continue
        ms = common.time_ms(fn, device, warmup=3)
        gbps = nbytes / ms / 1e6
        row.update(median_ms=ms, gbps=gbps)
        rows.append(row)
    fill_gbps = max(r["gbps"] for r in rows if r["method"].startswith("roofline_fill"))
    for r in rows:
        if "gbps" in r:
            r["roofline_pct"] = 100 * r["gbps"] / fill_gbps
    return rows


def chosen_shapes(args, device):
    """--quick's shape, --all's sweep for the device, or its large shapes."""
    if args.quick:
        return QUICK_SHAPES
    if args.all:
        return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    return LARGE["cuda" if device.type == "cuda" else "cpu"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16", "float64"]
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["out_in"],
        choices=["out_in", "in_out"],
        help="out_in: [N, D_out, D_in] (nn.Linear's); in_out: [N, D_in, D_out]",
    )
    parser.add_argument("--quick", action="store_true", help="one small shape, for smoke tests")
    parser.add_argument(
        "--all", action="store_true", help="every shape of the device's sweep (default: the large ones)"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (slow to warm up)")
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--no-plot", action="store_true")
    console.add_quiet_flag(parser)
    args = parser.parse_args(argv)
    if args.quick and args.all:
        parser.error("--quick and --all: give one")
    console.silence_peer_warnings()
    device = torch.device(args.device)
    shapes = chosen_shapes(args, device)
    context = common.run_context(device)
    print(f"bench/kernels.py on {context['device']}, torch {context['torch']}, commit {context['commit']}")
    print(f"  {'shape/dtype':<30} {'method':<24} {'µs':>10} {'GB/s':>8} {'% fill':>7}  note")
    cases = [(lay, getattr(torch, d), s) for lay in args.layouts for d in args.dtypes for s in shapes]
    progress = console.Progress(len(cases), args.quiet, unit="shape")
    all_rows = []
    for layout, dtype, shape in cases:
        progress.start(f"{shape} {str(dtype).removeprefix('torch.')} {layout}")
        rows = bench_shape(shape, dtype, device, not args.no_compile, layout)
        with progress.paused():
            for r in rows:
                us = r["median_ms"] * 1e3 if "median_ms" in r else None
                print(
                    f"  {r['setup']:<30} {r['method']:<24} {common.fmt(us):>10} {common.fmt(r.get('gbps')):>8} "
                    f"{common.fmt(r.get('roofline_pct')):>7}  {r.get('note', '')}"
                )
        rows = [{**context, "bench": "kernels", **r} for r in rows]
        path = common.append_rows(rows, args.results_dir)  # at once: a run stopped early keeps what it measured
        all_rows += rows
    progress.close()
    print(f"\n{len(all_rows)} rows appended to {path}")
    if not args.no_plot:
        import plot

        for png in plot.plot_latest(path, "kernels"):
            print(f"plot: {png}")
    return 1 if any(r.get("note", "").startswith("WRONG") for r in all_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
