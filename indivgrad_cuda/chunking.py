"""How many samples the engine processes at once, and the chunks themselves."""

from typing import Optional

import torch

CPU_CHUNK_BUDGET = 1 << 30  # bytes of intermediate state per chunk on CPU


def chunk_budget(device: torch.device) -> int:
    """Bytes of intermediate state one chunk may take: on CUDA a quarter of the memory
    that is free, counting what PyTorch's caching allocator holds but does not use (the
    driver's free memory alone misses it, and after a large step it can be most of the
    GPU); on CPU a fixed 1 GiB."""
    if device.type != "cuda":
        return CPU_CHUNK_BUDGET
    free_on_device, _ = torch.cuda.mem_get_info(device)
    cached_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free_on_device + cached_free) // 4


def chunk_size(n: int, per_sample_bytes: int, device: torch.device, max_chunk: Optional[int] = None) -> int:
    """Samples per chunk (at least 1): max_chunk if given, else what fits chunk_budget."""
    if max_chunk is not None:
        return max(1, min(n, max_chunk))
    per_sample_bytes = max(1, per_sample_bytes)
    if n * per_sample_bytes <= CPU_CHUNK_BUDGET // 4:
        return max(1, n)  # small enough anywhere: no need to ask the GPU for its free memory every step
    return max(1, min(n, chunk_budget(device) // per_sample_bytes))


def chunks(x: torch.Tensor, target, size: int):
    """(n0, n1, x[n0:n1], target[n0:n1]) for consecutive chunks of at most `size` samples."""
    n = x.shape[0]
    if size < n and target is not None and not (isinstance(target, torch.Tensor) and target.shape[:1] == (n,)):
        raise ValueError(f"target: to split the batch into chunks it must be a Tensor with {n} rows; "
                         f"got {type(target).__name__}")
    for n0 in range(0, n, size):
        n1 = min(n, n0 + size)
        yield n0, n1, x[n0:n1], (target if target is None or (n0, n1) == (0, n) else target[n0:n1])
