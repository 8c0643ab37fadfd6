"""The engine's per-sample gradient buffers: checking the caller's ``out=`` buffers, and
allocating the others with an error that says how many bytes they need."""

import math

import torch

# name -> (shape [N, ...], dtype, device)
Specs = dict[str, tuple]


def check_out_buffers(out: dict[str, torch.Tensor], specs: Specs, dtype_from: str = "the parameter's dtype") -> None:
    """``dtype_from``: where the specs' dtypes come from, for the error."""
    for name, t in out.items():
        if name not in specs:
            raise ValueError(f"out: '{name}' is not a parameter that requires grad; expected names among {list(specs)}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"out['{name}']: expected a Tensor, got {type(t).__name__}")
        shape, dtype, device = specs[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"out['{name}']: expected shape {list(shape)}, got {list(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"out['{name}']: expected dtype {dtype} ({dtype_from}), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"out['{name}']: expected device {device} (the parameter's device), got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"out['{name}']: expected a contiguous tensor, got strides {list(t.stride())}")
    spans = sorted(
        (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), t.numel() * t.element_size(), name)
        for name, t in out.items()
        if t.numel()
    )
    for (start_a, len_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < start_a + len_a:
            raise ValueError(f"out['{a}'] and out['{b}'] share memory; each needs its own buffer")


def allocate(specs: Specs) -> dict[str, torch.Tensor]:
    total = sum(math.prod(shape) * dtype.itemsize for shape, dtype, _ in specs.values())
    try:
        return {name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype, device) in specs.items()}
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError) or "memory" in str(e).lower():
            n = next(iter(specs.values()))[0][0]
            dtypes = sorted({str(d) for _, d, _ in specs.values()})
            devices = sorted({str(d) for _, _, d in specs.values()})
            raise MemoryError(
                f"per-sample gradients for N={n} need {total} bytes ({total / 2**30:.2f} GiB) of "
                f"{', '.join(dtypes)} on {', '.join(devices)}, which could not be allocated; use norms() or "
                f"clipped_grad_sum(), which form none, or a smaller batch"
            ) from e
        raise


class Kept:
    """Buffers the engine keeps from call to call, by name (reallocated when the shape, dtype
    or device asked for changes): a CUDA graph writes to fixed addresses."""

    def __init__(self):
        self._kept: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = self._kept.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
            self._kept.pop(name, None)  # free the old one first
            t = self._kept[name] = torch.empty(shape, dtype=dtype, device=device)
        return t
