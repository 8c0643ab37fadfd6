"""Timing, memory accounting and the results CSV, shared by bench/run.py and bench/kernels.py."""

import csv
import datetime
import os
import statistics
import subprocess
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]

RESULTS_DIR = ROOT / "bench" / "results"
COLUMNS = [
    "date",
    "run_id",
    "commit",
    "device",
    "torch",
    "cuda",
    "bench",
    "setup",
    "method",
    "median_ms",
    "ratio_vs_summed",
    "peak_mem_mb",
    "gbps",
    "roofline_pct",
    "max_rel_err",
    "note",
]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def run_context(device):
    """The columns every row of one run shares. GPU_CHECK_COMMIT, where set, names the commit:
    the device machine's copy of the tree carries a .git that may be older than the tree."""
    try:
        if os.environ.get("GPU_CHECK_COMMIT"):
            commit = os.environ["GPU_CHECK_COMMIT"][:7]
        else:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
            if subprocess.run(
                # the results a bench appends to are not what it measured
                ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip():
                commit += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "date": now.strftime("%Y-%m-%d"),
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "commit": commit,
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, device):
    """fn()'s wall time in ms: CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn, device, *, warmup=2, min_repeats=5, max_repeats=50, budget_s=1.0):
    """Median wall time of fn() in ms, calls back to back."""
    return time_interleaved(
        {"fn": fn}, device, warmup=warmup, min_repeats=min_repeats, max_repeats=max_repeats, budget_s=budget_s, warm=0
    )["fn"]


def time_interleaved(fns, device, *, warmup=2, min_repeats=5, max_repeats=50, budget_s=1.0, warm=None):
    """{name: median wall time of fns[name]() in ms}, timed in rounds that call every fn in
    turn: drift of a shared machine over the run (other tenants, clocks) then affects every
    method alike, so the ratios between them hold. Rounds continue until min_repeats and
    budget_s per method have passed (at most max_repeats). Each timed call follows `warm`
    untimed calls of the same fn (default: 1 on CPU, 0 on a GPU): on CPU, where tensors have no
    caching allocator, a call right after another method's runs on that method's heap, while a
    training loop calls the same step again and again."""
    warm = (1 if device.type == "cpu" else 0) if warm is None else warm
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    first = next(iter(fns))
    start = time.perf_counter()
    budget = budget_s * len(fns)
    while len(times[first]) < max_repeats and (len(times[first]) < min_repeats or time.perf_counter() - start < budget):
        for name, fn in fns.items():
            for _ in range(warm):
                fn()
            times[name].append(_time_once(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


class _CpuAllocations(TorchDispatchMode):
    """Live and peak bytes of the CPU tensors created while active (inputs made before it
    are not counted). A storage counts until the last tensor created on it dies."""

    def __init__(self):
        super().__init__()
        self.refs = {}  # storage data_ptr -> [tensors alive, nbytes]
        self.live = self.peak = 0

    def _release(self, ptr):
        entry = self.refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # plain tensors: a subclass (FSDP's DTensor) wraps a local tensor counted on its own
            if type(t) is torch.Tensor and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if not ptr or not nbytes:
                    continue
                if ptr not in self.refs:
                    self.refs[ptr] = [0, nbytes]
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[ptr][0] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def peak_memory_mb(fn, device):
    """Peak memory fn() allocates beyond what exists before it, in MB (its results included)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return peak / 1e6
    with _CpuAllocations() as tracker:
        result = fn()
        peak = tracker.peak
    del result
    return peak / 1e6


def append_rows(rows, results_dir=RESULTS_DIR, name="results.csv"):
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / name
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    return path


def fmt(v, digits=3):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
