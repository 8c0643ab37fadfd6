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
    return split_batch(x, target, x.shape[0], size)


def batch_size(inputs) -> int:
    """N of a batch given as a Tensor, a tuple or a dict of them (dim 0 of every tensor)."""
    tensors = named_tensors(inputs)
    if not tensors:
        raise TypeError(
            f"inputs: expected a Tensor, or a tuple or dict holding at least one Tensor, got {type(inputs).__name__}"
        )
    for where, t in tensors:
        if t.dim() == 0:
            raise ValueError(f"inputs{where}: expected dim 0 to be the batch, got a 0-dim tensor")
    n = tensors[0][1].shape[0]
    for where, t in tensors:
        if t.shape[0] != n:
            raise ValueError(
                f"inputs{where}: expected {n} rows (dim 0 is the batch, N from inputs"
                f"{tensors[0][0]}), got shape {list(t.shape)}"
            )
    return n


def named_tensors(inputs) -> list:
    """[(where, tensor)] of the tensors in a batch given as a Tensor, a tuple or a dict."""
    if isinstance(inputs, torch.Tensor):
        return [("", inputs)]
    if isinstance(inputs, tuple):
        return [(f"[{i}]", v) for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
    if isinstance(inputs, dict):
        return [(f"[{k!r}]", v) for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    raise TypeError(
        f"inputs: expected a Tensor, a tuple (model(*inputs)) or a dict (model(**inputs)), got {type(inputs).__name__}"
    )


def split_batch(inputs, target, n: int, size: int):
    """(n0, n1, inputs rows n0..n1, target rows n0..n1) for consecutive chunks of at most
    `size` samples: every tensor in `inputs` is split along dim 0, other values passed as they are."""
    if size < n and target is not None and not (isinstance(target, torch.Tensor) and target.shape[:1] == (n,)):
        raise ValueError(
            f"target: to split the batch into chunks it must be a Tensor with {n} rows; got {type(target).__name__}"
        )

    for n0 in range(0, n, size):
        n1 = min(n, n0 + size)
        yield (n0, n1, inputs, target) if (n0, n1) == (0, n) else (n0, n1, *take_rows(inputs, target, n0, n1))


def take_rows(inputs, target, n0: int, n1: int):
    """(inputs, target) cut to samples n0..n1: every tensor in them along dim 0, other values as they are."""

    def rows(v):
        return v[n0:n1] if isinstance(v, torch.Tensor) else v

    if isinstance(inputs, dict):
        return {k: rows(v) for k, v in inputs.items()}, rows(target)
    if isinstance(inputs, tuple):
        return tuple(rows(v) for v in inputs), rows(target)
    return inputs[n0:n1], rows(target)
