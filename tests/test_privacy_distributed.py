"""The DP-SGD step across processes: 2 and 3 CPU processes with gloo, spawned from the test,
each with a shard of the same batches. Every rank must end bit-identical to the others and
equal to the single-process run on the whole batches (to float64 rounding), with uneven
shards (a rank with no samples), clip groups with automatic and adaptive clipping, a
DistributedDataParallel-wrapped model, no seed given, and replicas or settings that differ
refused on every rank. Also the README's recipe launched by torchrun, and (with a GPU) an
NCCL group."""

import contextlib
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from indivgrad_cuda.privacy import DPSGD, AdaptiveClipping, PoissonBatchSampler
from tests.models import TinyEncoder, token_batch

SETTINGS = dict(noise_multiplier=0.8, expected_batch_size=7.0)
# max_grad_norm by model: near the median per-sample norm of its steps (MLP 1.6, encoder 2.3), so
# every run clips some samples and leaves others as they are (test_the_threshold_splits_the_samples)
CLIP = {"mlp": 1.6, "encoder": 2.3}
SEED, LR, STEPS = 77, 0.1, 3


def make_model(kind, init_seed=0):
    torch.manual_seed(init_seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return TinyEncoder(vocab=11, d_model=8, heads=2, layers=1, max_len=5, classes=3).double().eval()


def global_batches(kind, mlp_classes=3):
    """STEPS logical batches of 7, the same in every process."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        if kind == "mlp":
            x = torch.randn(7, 6, dtype=torch.float64, generator=g)
            out.append(((x,), torch.randint(0, mlp_classes, (7,), generator=g)))
        else:
            ids, mask, labels = token_batch(7, 5, 11, 3, generator=g)
            out.append(((ids, mask), labels))
    return out


def shard(batch, rows):
    inputs, target = batch
    inputs = tuple(t[rows] for t in inputs)
    return (inputs[0] if len(inputs) == 1 else inputs), target[rows]


# the clipping variants across replicas: name -> (model, DPSGD's options)
VARIANTS = {
    "encoder automatic, per layer": ("encoder", dict(clip_fn="automatic", clip_groups="layer")),
    "mlp adaptive, per parameter": (
        "mlp",
        dict(clip_groups="param", adaptive_clipping=AdaptiveClipping(0.5, learning_rate=0.3, count_noise_std=1.0)),
    ),
}

# rows of each rank, by world size: interleaved, and uneven with an empty rank
SHARDS = {
    "interleaved": lambda rank, world: list(range(rank, 7, world)),
    "uneven": lambda rank, world: [[], [0, 1, 2], [3, 4, 5, 6]][rank] if world == 3 else [[], list(range(7))][rank],
}


def train(model, batches, rows, group_model=None, seed=SEED, max_grad_norm=CLIP["mlp"], norms=None, **options):
    """STEPS DP-SGD steps on this process's rows of each batch (``options``: DPSGD's clipping
    ones); the final parameters (and each step's per-sample norms appended to `norms`)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dp = DPSGD(
        group_model if group_model is not None else model,
        opt,
        **SETTINGS,
        max_grad_norm=max_grad_norm,
        seed=seed,
        **options,
    )
    for batch in batches:
        stats = dp.step(*shard(batch, rows), nn.CrossEntropyLoss())
        if norms is not None:
            norms.append(stats.norms)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for kind in ("mlp", "encoder"):
            batches = global_batches(kind)
            for name, rows_of in SHARDS.items():
                results[(kind, name)] = train(make_model(kind), batches, rows_of(rank, world), max_grad_norm=CLIP[kind])
        for name, (kind, options) in VARIANTS.items():
            rows = SHARDS["uneven"](rank, world)
            results[name] = train(make_model(kind), global_batches(kind), rows, max_grad_norm=CLIP[kind], **options)
        rows = SHARDS["interleaved"](rank, world)
        batches = global_batches("mlp")
        # rank 0's seed is used everywhere when none is given: the replicas still agree
        results[("mlp", "no_seed")] = train(make_model("mlp"), batches, rows, seed=None)
        # DDP-wrapped, each rank initialised differently: DDP broadcasts rank 0's weights
        model = make_model("mlp", init_seed=rank)
        ddp = nn.parallel.DistributedDataParallel(model)
        results[("mlp", "ddp")] = train(model, batches, rows, group_model=ddp)
        with torch.no_grad():
            ddp(batches[0][0][0])  # evaluation through the DDP wrapper still works
        # replicas that differ are refused at the first step, on every rank
        try:
            train(make_model("mlp", init_seed=rank), batches, rows)
            results["differ"] = None
        except ValueError as e:
            results["differ"] = str(e)
        # settings that differ too
        try:
            model = make_model("mlp")
            dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), **SETTINGS, max_grad_norm=1.0 + rank)
            dp.step(*shard(batches[0], rows), nn.CrossEntropyLoss())
            results["settings"] = None
        except ValueError as e:
            results["settings"] = str(e)
        # Poisson sampling with no seed: rank 0's, so the shards partition one global batch
        sampler = PoissonBatchSampler(50, 0.2, steps=3)
        results["poisson_seed"] = sampler.generator.initial_seed()
        results["poisson"] = list(sampler)
    except Exception:  # noqa: BLE001 - reported to the test, which fails naming it
        results["error"] = traceback.format_exc()
    save_and_leave(results, out_dir, f"rank{rank}.pt")


def save_and_leave(results: dict, out_dir: str, name: str) -> None:
    """Saves a rank's results, then leaves the process group after every rank has saved (a
    barrier, unless this rank failed: the others may be stuck in another collective), so no
    rank tears gloo down while another is still in a collective (which aborted a rank at
    exit once: "terminate called without an active exception"). A barrier broken by a rank
    that failed is let pass: the test then reports that rank's saved error, not this one."""
    torch.save(results, os.path.join(out_dir, name))
    if "error" not in results:
        with contextlib.suppress(RuntimeError):  # a failed rank left without it (gloo: "Connection reset by peer")
            dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(worker, world, out):
    """``worker(rank, world, init_file, out_dir)`` in ``world`` spawned processes; each rank's
    saved results (``rank{r}.pt``), none of which may hold an error (every rank's is shown:
    one rank's failure breaks the others' collectives, so the first may not be the cause)."""
    mp.spawn(worker, args=(world, str(out / "init"), str(out)), nprocs=world, join=True)
    results = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if "error" in res]
    assert not errors, "\n".join(errors)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["2_processes", "3_processes"])
def runs(request, tmp_path_factory):
    world = request.param
    return world, spawn_ranks(worker, world, tmp_path_factory.mktemp(f"dp{world}"))


def single_process(kind, norms=None):
    return train(make_model(kind), global_batches(kind), list(range(7)), max_grad_norm=CLIP[kind], norms=norms)


@pytest.mark.parametrize("kind", ["mlp", "encoder"])
def test_the_threshold_splits_the_samples(kind):
    """Each model's runs clip some samples and leave others unclipped: both sides of
    min(1, C / norm) take part in what the ranks must agree on."""
    norms = []
    single_process(kind, norms)
    norms = torch.cat(norms)
    assert (norms < CLIP[kind]).sum() >= 3 and (norms > CLIP[kind]).sum() >= 3, norms


@pytest.mark.parametrize("kind", ["mlp", "encoder"])
@pytest.mark.parametrize("shards", sorted(SHARDS))
def test_ranks_bit_identical_and_equal_to_one_process(runs, kind, shards):
    _, results = runs
    want = single_process(kind)
    first = results[0][(kind, shards)]
    for rank, res in enumerate(results):
        for name, p in res[(kind, shards)].items():
            assert torch.equal(p, first[name]), f"rank {rank}'s {name} differs from rank 0's"
    for name, p in first.items():
        torch.testing.assert_close(p, want[name], rtol=1e-12, atol=1e-14, msg=name)
    moved = make_model(kind).state_dict()
    assert any(not torch.allclose(first[n], moved[n]) for n in first)  # the steps did something


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_clipping_variants_equal_one_process(runs, variant):
    """Groups, automatic and adaptive clipping across replicas, one of them without samples:
    the group norms, the coefficients and the unclipped count are per process, summed once."""
    _, results = runs
    kind, options = VARIANTS[variant]
    want = train(make_model(kind), global_batches(kind), list(range(7)), max_grad_norm=CLIP[kind], **options)
    for rank, res in enumerate(results):
        for name, p in res[variant].items():
            assert torch.equal(p, results[0][variant][name]), f"rank {rank}'s {name} differs from rank 0's"
            torch.testing.assert_close(p, want[name], rtol=1e-12, atol=1e-14, msg=name)


def test_no_seed_and_ddp_agree(runs):
    _, results = runs
    want = single_process("mlp")
    for scenario in ("no_seed", "ddp"):
        for rank, res in enumerate(results):
            for name, p in res[("mlp", scenario)].items():
                assert torch.equal(p, results[0][("mlp", scenario)][name]), f"{scenario}: rank {rank}, {name}"
    for name, p in results[0][("mlp", "ddp")].items():  # DDP started every rank from rank 0's weights
        torch.testing.assert_close(p, want[name], rtol=1e-12, atol=1e-14, msg=name)


def test_differing_replicas_refused_on_every_rank(runs):
    _, results = runs
    for res in results:
        msg = res["differ"]
        assert msg is not None and "model: the replicas differ at the first step: rank 1's parameters" in msg, msg
        assert "DistributedDataParallel" in msg
        msg = res["settings"]
        assert msg is not None and "settings differ between rank 0 and rank 1: {'max_grad_norm': (1.0, 2.0)}" in msg, (
            msg
        )


def test_poisson_sampler_shares_rank_zeros_seed(runs):
    """With no seed given every rank draws with rank 0's, so the shards are exactly the
    batches of one sampler of that seed, split by index."""
    world, results = runs
    seeds = [res["poisson_seed"] for res in results]
    assert seeds == [seeds[0]] * world, seeds
    whole = list(PoissonBatchSampler(50, 0.2, steps=3, seed=seeds[0], rank=0, world_size=1))
    for step in range(3):
        parts = [res["poisson"][step] for res in results]
        for rank, part in enumerate(parts):
            assert all(i % world == rank for i in part)
        assert sorted(i for part in parts for i in part) == whole[step]
    assert any(whole)  # not all empty


def nccl_worker(rank, world, init_file, out_dir):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = [(tuple(t.cuda() for t in inputs), target.cuda()) for inputs, target in global_batches("mlp")]
        model = make_model("mlp").cuda()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        dp = DPSGD(model, opt, **SETTINGS, max_grad_norm=CLIP["mlp"], seed=SEED, process_group=dist.group.WORLD)
        for batch in batches:
            dp.step(*shard(batch, list(range(7))), nn.CrossEntropyLoss())
        result = {n: p.detach().cpu() for n, p in model.named_parameters()}
    except Exception:  # noqa: BLE001 - reported to the test, which fails naming it
        result = {"error": traceback.format_exc()}
    save_and_leave(result, out_dir, "nccl.pt")


@pytest.mark.cuda
@pytest.mark.skipif(not dist.is_nccl_available(), reason="needs NCCL")
def test_nccl_group_on_one_gpu(tmp_path):
    """NCCL over one GPU (two ranks cannot share one): the all-reduce path runs on CUDA
    tensors and gives the run without a group, bit for bit (CUDA's noise generator)."""
    mp.spawn(nccl_worker, args=(1, str(tmp_path / "init"), str(tmp_path)), nprocs=1, join=True)
    got = torch.load(tmp_path / "nccl.pt")
    assert "error" not in got, got.get("error")
    model = make_model("mlp").cuda()
    want = train(model, [(tuple(t.cuda() for t in i), t.cuda()) for i, t in global_batches("mlp")], list(range(7)))
    for name, p in want.items():
        assert torch.equal(got[name], p.cpu()), name


TORCHRUN_SCRIPT = """
import sys, torch, torch.nn.functional as F, torch.distributed as dist
from torch import nn
from indivgrad_cuda.privacy import DPSGD, poisson_loader

dist.init_process_group("gloo")  # torchrun's environment: rank, world size, rendezvous
g = torch.Generator().manual_seed(1)
dataset = torch.utils.data.TensorDataset(torch.randn(512, 10, generator=g), torch.randint(0, 3, (512,), generator=g))
torch.manual_seed(dist.get_rank())  # replicas initialised apart: DDP broadcasts rank 0's
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)))
q = 64 / len(dataset)
loader = poisson_loader(dataset, sample_rate=q)  # no seed: rank 0's, so the shards make one batch
dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), noise_multiplier=1.0,
           max_grad_norm=1.0, sample_rate=q, dataset_size=len(dataset))  # no seed: rank 0's noise
sizes = []
for x, y in loader:
    sizes.append(len(x))
    dp.step(x, y, F.cross_entropy)
torch.save({"params": model.module.state_dict(), "sizes": sizes, "eps": dp.epsilon(1e-5)},
           f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
dist.barrier()  # no rank tears gloo down while another still works
dist.destroy_process_group()
"""


def test_torchrun_launch(tmp_path):
    """The README's torchrun recipe on CPU (gloo), launched by torchrun itself: no seeds
    given anywhere, replicas initialised differently, and still bit-identical at the end."""
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name
    assert len(ranks[0]["sizes"]) == 8 and sum(ranks[0]["sizes"] + ranks[1]["sizes"]) > 0
    assert ranks[0]["eps"] == ranks[1]["eps"] > 0
