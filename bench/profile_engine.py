"""Where one call's time goes: torch.profiler over a few calls of the summed step and of the
engine's methods on one setup of bench/run.py. For each method it prints the time per call
(timed without the profiler, medians of interleaved rounds), the time the device was busy per
call (the sum of its kernels), and the kernels (on a CPU: the operators) that take the most.

    python bench/profile_engine.py [--setup tfm:16,256,512,4] [--methods summed indivgrad ...]
                                   [--calls 5] [--top 12] [--device cuda|cpu]

Why: on the H200 (e14e716) the hooks capture took 1.9-2.1x the summed step on run.py's
transformer setups, against 1.02-1.2x on the CPU; a busy time well under the call's time
says the GPU waits on the host (launches, Python), a busy time near it says which kernels
to count (bench/NOTES.md). "extra us per layer" is the method's time over the summed step's,
divided by the layers the engine serves: on a model whose arithmetic is nothing (a CPU run of
tfm:8,8,16,1) it is the engine's host time per layer and call.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import common
import console
import indivgrad_cuda as ig
from methods import METHODS
from run import device_setups, make_task, parse_setup, setup_name

ENGINE_METHODS = ["summed", "indivgrad", "indivgrad_norms", "indivgrad_clipped", "torch_func"]


def profiled(fn, calls, device):
    """(device-busy ms per call, the profiler's table source) over `calls` calls of fn."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        common.sync(device)
    events = prof.key_averages()
    # the kernels' own rows (an operator's row repeats the time of the kernels it launched)
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    busy_us = sum(e.self_device_time_total for e in kernels)
    return busy_us / 1e3 / calls, events


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", type=parse_setup, default=parse_setup("tfm:16,256,512,4"), help="as in run.py")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=ENGINE_METHODS)
    parser.add_argument("--calls", type=int, default=5, help="calls under the profiler (after two warm-up calls)")
    parser.add_argument("--top", type=int, default=12, help="rows of each method's table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.top < 1:
        parser.error(f"--calls and --top must be positive, got {args.calls} and {args.top}")
    console.silence_peer_warnings()
    device = torch.device(args.device)
    args.setup = device_setups([args.setup], device)[0]  # a Hugging Face kind alone: the device's size
    context = common.run_context(device)
    print(f"bench/profile_engine.py on {context['device']}, torch {context['torch']}, commit {context['commit']}")
    torch.manual_seed(0)
    task = make_task(args.setup, device)
    fns = {name: METHODS[name][0](task, max_norm=1.0) for name in args.methods}
    medians = common.time_interleaved(fns, device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"setup {setup_name(args.setup)}, {args.calls} profiled calls per method\n")
    layers = len(ig.PerSampleGrads(task.model)._layers())
    print(f"  {'method':<20} {'ms per call':>12} {'x summed':>9} {'extra us per layer':>19} {'device busy ms':>15}")
    tables = []
    for name, fn in fns.items():
        busy_ms, events = profiled(fn, args.calls, device)
        ratio = medians[name] / medians["summed"] if "summed" in medians else None
        extra = (medians[name] - medians["summed"]) * 1e3 / layers if "summed" in medians and layers else None
        busy = common.fmt(busy_ms) if device.type == "cuda" else "-"
        row = f"{common.fmt(medians[name]):>12} {common.fmt(ratio):>9} {common.fmt(extra):>19} {busy:>15}"
        print(f"  {name:<20} {row}")
        tables.append((name, events.table(sort_by=sort_by, row_limit=args.top)))
    print(
        f"  ({layers} layers with trainable parameters; extra: (method - summed) / layers, the engine's cost per layer)"
    )
    for name, table in tables:
        print(f"\n## {name}: the top {args.top} by {sort_by}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
