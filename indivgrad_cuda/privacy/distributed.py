"""torch.distributed for the DP-SGD step: which process group, whether its backend serves the
model's device, one all-reduce of the clipped sums, and the first step's check that every
rank holds the same model and settings."""

import hashlib
from typing import Optional

import torch
import torch.distributed as dist

# the collective backends that serve each device type's tensors (gloo can carry CUDA tensors
# through the host, but every step would pay for it: NCCL is the one for GPUs)
BACKENDS = {"cpu": ("gloo", "mpi"), "cuda": ("nccl",)}


def resolve_group(group):
    """The group to reduce over: the one given, else the default group when torch.distributed
    is initialised with more than one process, else None (one process, nothing to reduce)."""
    if group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group: given, but torch.distributed is not initialised")
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def check_backend(config: str, device: torch.device) -> None:
    """``config`` is ``dist.get_backend_config(group)``: ``"gloo"``, ``"cpu:gloo,cuda:nccl"``..."""
    per_device = {}
    for part in config.split(","):
        dev, _, backend = part.strip().rpartition(":")
        for d in [dev] if dev else BACKENDS:
            per_device[d] = backend
    want = BACKENDS.get(device.type)
    if want is None:
        raise ValueError(f"process_group: DP-SGD across processes supports models on {sorted(BACKENDS)}, got {device}")
    if per_device.get(device.type) not in want:
        raise ValueError(
            f"process_group: the model is on {device.type}, whose tensors need the {' or '.join(want)} backend, "
            f"but the group's backends are '{config}'; initialise it with "
            f"torch.distributed.init_process_group('{want[0]}') (or 'cpu:gloo,cuda:nccl')"
        )


def all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    """Sums each tensor over the group's ranks, in place: one all-reduce per dtype, of the
    tensors concatenated (each rank then holds the same bits)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group_tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for t, part in zip(group_tensors, flat.split([t.numel() for t in group_tensors])):
            t.copy_(part.view_as(t))


def parameter_digests(params: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: a hash of the parameter's shape, dtype and bytes}: exact, unlike a float sum,
    whose rounding could depend on each rank's thread count."""
    out = {}
    for name, p in params.items():
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{tuple(p.shape)} {p.dtype}".encode())
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def check_ranks_agree(group, params: dict[str, torch.Tensor], settings: dict, seed: Optional[int]) -> Optional[int]:
    """All-gathers every rank's parameter digests, settings and seed once; raises on every
    rank, naming what differs, unless all ranks agree. Returns rank 0's seed (the one used
    everywhere when no rank was given one)."""
    mine = (parameter_digests(params), settings, seed)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    digests0, settings0, seed0 = gathered[0]
    for rank, (digests, rank_settings, _) in enumerate(gathered[1:], start=1):
        if rank_settings != settings0:
            diff = {
                k: (settings0.get(k), rank_settings.get(k))
                for k in settings0
                if settings0.get(k) != rank_settings.get(k)
            }
            raise ValueError(f"DP-SGD settings differ between rank 0 and rank {rank}: {diff} (rank 0, rank {rank})")
        if digests.keys() != digests0.keys():
            raise ValueError(
                f"model: rank {rank}'s trainable parameters {sorted(digests)} differ from rank 0's {sorted(digests0)}"
            )
        differ = [name for name in digests0 if digests[name] != digests0[name]]
        if differ:
            raise ValueError(
                f"model: the replicas differ at the first step: rank {rank}'s parameters {differ} are not rank 0's "
                f"(every rank must start from the same weights: wrap the model in DistributedDataParallel, which "
                f"broadcasts rank 0's, or seed the initialisation identically)"
            )
    return seed0
