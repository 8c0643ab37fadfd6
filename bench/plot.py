"""Draw PNG plots from bench/results/results.csv (the latest run of a bench, per device).

python bench/plot.py [results.csv]
"""

import csv
import re
import sys
from collections import defaultdict
from pathlib import Path


def _latest(rows, bench):
    rows = [r for r in rows if r["bench"] == bench]
    if not rows:
        return None, []
    run_id = max(r["run_id"] for r in rows)
    return run_id, [r for r in rows if r["run_id"] == run_id]


def _bars(ax, groups, series, values, ylabel, log=False):
    from matplotlib import colormaps

    colors = colormaps["tab20"]
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((grp, s), 0) or 0 for grp in groups]
        ax.bar(xs, ys, width, label=s, color=colors(i % 20))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)


def plot_latest(csv_path, bench):
    """Plots the latest run of `bench` ("run" or "kernels") in csv_path; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    with csv_path.open() as f:
        run_id, rows = _latest(list(csv.DictReader(f)), bench)
    if not rows:
        return []
    device = rows[0]["device"]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()
    if bench == "run":
        key, label, log = "ratio_vs_summed", "time / summed-gradient time (log)", True
        title = (
            f"per-sample gradients: time relative to the summed gradient\n{device}, torch {rows[0]['torch']}, {run_id}"
        )
    else:
        key, label, log = "roofline_pct", "% of the write roofline (fill)", False
        title = f"kernels: % of write roofline\n{device}, torch {rows[0]['torch']}, {run_id}"
    groups = list(dict.fromkeys(r["setup"] for r in rows))
    series = list(dict.fromkeys(r["method"] for r in rows if r[key] and not r["method"].startswith("roofline")))
    values = defaultdict(float)
    for r in rows:
        if r[key]:
            values[(r["setup"], r["method"])] = float(r[key])
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(groups) + 4), 5))
    _bars(ax, groups, series, values, label, log=log)
    if bench == "run":
        ax.axhline(1.0, color="black", lw=0.8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = csv_path.parent / f"{bench}_{slug}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "results.csv"
    for bench in ("run", "kernels"):
        for png in plot_latest(path, bench):
            print(png)
