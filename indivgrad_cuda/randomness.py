"""The engine's random draws: Dropout masks and DP-SGD noise, once per call for the whole
batch (masks first, in layer order, then the noise), so that results never depend on how
the batch is split into chunks."""

import contextlib
import hashlib
import math
from collections.abc import Sequence
from typing import Optional

import torch


def check_generator(generator, device: torch.device) -> None:
    """A generator must be a torch.Generator on the device the model computes on."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    got, want = _indexed(generator.device), _indexed(device)
    if got != want:
        raise ValueError(f"generator: expected a torch.Generator on {want} (the model's device), got one on {got}")


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current device>, so that devices compare (and print) by their index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def dropout_masks(
    plan, n: int, dtype: torch.dtype, device: torch.device, training: bool, generator: Optional[torch.Generator]
) -> list[Optional[torch.Tensor]]:
    """One scaled mask [N, width] per Dropout, as nn.Dropout: keep with probability 1 - p,
    scale kept values by 1 / (1 - p) (p = 1: all zero). None for each in eval mode."""
    if not training:
        return [None] * len(plan.dropout_ps)
    return [
        dropout_mask((n, width), p, dtype, device, generator) for p, width in zip(plan.dropout_ps, plan.dropout_widths)
    ]


def dropout_mask(shape, p: float, dtype, device, generator) -> torch.Tensor:
    mask = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p, generator=generator)
    return mask.mul_(1 / (1 - p) if p < 1 else 0.0)


class DropoutMasks:
    """The hooks capture's Dropout: while ``rows(n0, n1)`` is active, every ``nn.Dropout`` of
    the model in train mode multiplies by rows n0..n1 of a mask drawn for the whole batch
    (drawn at the module's first call of the call, so in forward order, as the native
    capture draws them). Other random modules and functional randomness draw from torch's
    generators chunk by chunk."""

    def __init__(self, dropouts, n: int, generator: Optional[torch.Generator]):
        """dropouts: (path, module) of the model's nn.Dropout modules."""
        self.dropouts = [m for _, m in dropouts if m.training]
        for path, m in dropouts:
            if m.training and not 0 <= m.p <= 1:
                raise ValueError(f"module '{path}' (Dropout): p={m.p}; expected 0 <= p <= 1")
        self.n, self.generator = n, generator
        self.masks = {}  # (id(module), call index) -> mask of the whole batch

    @contextlib.contextmanager
    def rows(self, n0: int, n1: int):
        calls = {}

        def forward_of(module):
            p = float(module.p)

            def forward(x):
                key = (id(module), calls.setdefault(id(module), 0))
                calls[id(module)] += 1
                if key not in self.masks:
                    self.masks[key] = dropout_mask((self.n, *x.shape[1:]), p, x.dtype, x.device, self.generator)
                return x * self.masks[key][n0:n1]

            return forward

        for m in self.dropouts:
            m.forward = forward_of(m)  # an instance attribute, removed below
        try:
            yield
        finally:
            for m in self.dropouts:
                del m.forward


def add_noise(grads: Sequence[Optional[torch.Tensor]], std: float, generator: Optional[torch.Generator]) -> None:
    """Adds N(0, std²) noise to each gradient, in the order given."""
    for g in grads:
        if g is not None:
            g.add_(torch.normal(0.0, std, g.shape, generator=generator, dtype=g.dtype, device=g.device))


NOISE_BLOCK = 1 << 20  # elements of one block of a parameter's DP-SGD noise (whole rows)


def noise_seed(seed: int, step: int, key) -> int:
    """The seed of one block of DP-SGD's noise: the first 63 bits of the BLAKE2b digest of
    ``f"{seed}:{step}:{key}"`` (``key``: ``"<parameter index>:<block>"``, or a name)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def noise_rows(shape, rows: tuple[int, int], std: float, seed: int, step: int, index: int, dtype, device, generator):
    """Rows ``rows[0]:rows[1]`` (of dim 0) of the noise N(0, std²) of shape ``shape`` that
    parameter ``index`` gets at ``step``: the parameter's rows are drawn in blocks of
    ``max(1, NOISE_BLOCK // row size)`` rows, block b by ``normal_`` from ``generator``
    seeded with ``noise_seed(seed, step, f"{index}:{b}")``. A shard of rows draws only the
    blocks it overlaps, so shards drawn apart on several processes assemble into the noise
    one process draws for the whole parameter (FSDP). A 0-d shape is one row (0-d when drawn whole)."""
    rest = tuple(shape[1:])
    total = shape[0] if len(shape) else 1
    row = math.prod(rest)
    per = max(1, NOISE_BLOCK // max(row, 1))
    r0, r1 = rows
    out = torch.empty((r1 - r0, *rest), dtype=dtype, device=device)
    blocks = range(r0 // per, -(-r1 // per)) if r1 > r0 else ()  # those overlapping the rows
    for b in blocks:
        b0, b1 = b * per, min((b + 1) * per, total)
        generator.manual_seed(noise_seed(seed, step, f"{index}:{b}"))
        lo, hi = max(b0, r0), min(b1, r1)
        if (lo, hi) == (b0, b1):
            out[lo - r0 : hi - r0].normal_(0.0, std, generator=generator)
        else:  # the block's rows outside this shard are drawn too (and dropped): the same numbers
            block = torch.empty((b1 - b0, *rest), dtype=dtype, device=device).normal_(0.0, std, generator=generator)
            out[lo - r0 : hi - r0] = block[lo - b0 : hi - b0]
    return out.reshape(()) if not len(shape) and r1 - r0 == 1 else out


class RandomState:
    """The state of ``generator`` (if given) and torch's default generators, to draw the same
    numbers again (a call the engine restarts: see capture.hooks.Replanned)."""

    def __init__(self, generator: Optional[torch.Generator]):
        self.generator = generator if isinstance(generator, torch.Generator) else None  # others: refused later
        self.states = (
            self.generator.get_state() if self.generator is not None else None,
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        )

    def restore(self) -> None:
        mine, cpu, cuda = self.states
        if mine is not None:
            self.generator.set_state(mine)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
