"""Poisson sampling for DP-SGD: each sample joins each batch independently with probability
``sample_rate``, the sampling the accountant's guarantee assumes. Across processes every
rank draws the same global batch and keeps its shard, so the ranks' batches together are
exactly the single-process batch of the same seed."""

import secrets
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, default_collate


def check_sample_rate(sample_rate) -> None:
    if not (isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate: expected a number in (0, 1], got {sample_rate!r}")


class PoissonBatchSampler(Sampler):
    """Batches of indices into ``range(num_samples)``, each sample in each batch
    independently with probability ``sample_rate``; ``steps`` batches per pass (default
    ``round(1 / sample_rate)``, one epoch in expectation). Batches may be empty.

    ``seed``: the sampling is reproducible from it; None draws one from the OS (and, across
    processes, rank 0's is used on every rank). ``rank``/``world_size``: this process's
    shard, global indices ``i`` with ``i % world_size == rank`` (default: from
    torch.distributed when it is initialised, else the whole batch)."""

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        if not (isinstance(num_samples, int) and num_samples > 0):
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        check_sample_rate(sample_rate)
        if steps is not None and not (isinstance(steps, int) and steps > 0):
            raise ValueError(f"steps: expected a positive int or None, got {steps!r}")
        distributed = dist.is_available() and dist.is_initialized()
        world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not (isinstance(world_size, int) and world_size > 0 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got {rank!r}, {world_size!r}")
        if seed is None:
            seed = secrets.randbits(62)
            if distributed and world_size > 1:
                box = [seed]
                dist.broadcast_object_list(box, src=0)
                seed = box[0]
        self.num_samples, self.sample_rate = num_samples, float(sample_rate)
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            picked = (torch.rand(self.num_samples, generator=self.generator) < self.sample_rate).nonzero().flatten()
            yield picked[picked % self.world_size == self.rank].tolist()

    @property
    def expected_batch_size(self) -> float:
        """Of the global batch (all ranks together)."""
        return self.sample_rate * self.num_samples


def poisson_loader(dataset, sample_rate: float, **kwargs) -> DataLoader:
    """A DataLoader over ``dataset`` with :class:`PoissonBatchSampler` batches; ``steps``,
    ``seed``, ``rank`` and ``world_size`` go to the sampler, the rest to the DataLoader. An
    empty batch comes out as tensors of 0 rows shaped like the samples (a DataLoader would
    fail on it), which the DP-SGD step takes as a batch without samples."""
    sampler_options = {k: kwargs.pop(k) for k in ("steps", "seed", "rank", "world_size") if k in kwargs}
    sampler = PoissonBatchSampler(len(dataset), sample_rate, **sampler_options)
    collate = _CollateOrEmpty(dataset, kwargs.pop("collate_fn", None) or default_collate)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **kwargs)


class _CollateOrEmpty:
    """The collate function, and for an empty batch the first sample's collated to 0 rows (a
    class, not a closure, so that DataLoader workers started by spawn can pickle it)."""

    def __init__(self, dataset, collate):
        self.dataset, self.collate = dataset, collate

    def __call__(self, batch):
        return self.collate(batch) if batch else _no_rows(self.collate([self.dataset[0]]))


def _no_rows(batch):
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, dict):
        return {k: _no_rows(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_no_rows(v) for v in batch)
    return batch
