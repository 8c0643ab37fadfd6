"""What a DP-SGD step costs on a model sharded with FSDP2, against FSDP2's own non-private
step, and the same pair data-parallel (DistributedDataParallel, and DPSGD on replicas):
--processes CPU processes with gloo (torch.multiprocessing), one thread each, the digits
bench's models (dp_sgd_digits.py: the MLP, or the sequence encoder), fully_shard on each
Linear (MLP) or encoder block, then the root; --batch samples per process; the median time of
the steps after --warmup, every process starting each step together (a barrier).

    python bench/fsdp_step.py [--model mlp|sequence] [--processes 2] [--steps 40]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

MODES = ("FSDP2 plain step", "DPSGD on FSDP2", "DDP plain step", "DPSGD on replicas")


def _model(kind, world, mode):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dp_sgd_digits

    torch.manual_seed(0)
    model = dp_sgd_digits.make_model(kind)
    if "FSDP2" in mode:
        mesh = init_device_mesh("cpu", (world,))
        units = list(getattr(model, "blocks", [])) or [m for m in model.modules() if isinstance(m, nn.Linear)]
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _step(model, mode, x, y):
    from indivgrad_cuda.privacy import DPSGD

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    if mode.startswith("DPSGD"):
        dp = DPSGD(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=122, seed=0)
        return lambda: dp.step(x, y, loss_fn)
    net = model if "FSDP2" in mode else nn.parallel.DistributedDataParallel(model)

    def step():
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()

    return step


def _worker(rank, world, init_file, out_file, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    shape = (args.batch, 64) if args.model == "mlp" else (args.batch, 8, 8)
    x, y = torch.randn(shape, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    medians = {}
    for mode in MODES:
        step = _step(_model(args.model, world, mode), mode, x, y)
        times = []
        for _ in range(args.warmup + args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        medians[mode] = statistics.median(times[args.warmup :]) * 1e3
    if rank == 0:
        torch.save(medians, out_file)
    dist.barrier()  # as dp_sgd_digits.py: no rank tears gloo down while another still works
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "sequence"), default="mlp")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=61, help="samples per process (61: the digits bench's 122 / 2)")
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "medians.pt")
        mp.spawn(_worker, args=(args.processes, os.path.join(tmp, "init"), out, args), nprocs=args.processes)
        medians = torch.load(out)
    print(
        f"{args.model} model, {args.processes} gloo processes (1 thread each), {args.batch} samples per process, "
        f"median of {args.steps} steps after {args.warmup}"
    )
    for mode in MODES:
        print(f"  {mode:<20} {medians[mode]:>9.2f} ms")
    print(
        f"  DPSGD against the plain step: {medians['DPSGD on FSDP2'] / medians['FSDP2 plain step']:.2f}x sharded, "
        f"{medians['DPSGD on replicas'] / medians['DDP plain step']:.2f}x replicated"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
