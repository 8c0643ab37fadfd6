"""DP-SGD on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): each
process computes its own samples' norms and clip coefficients from the layers' factors
(FSDP all-gathers each layer's parameters for its forward and backward, as in any step),
forms each layer's clipped sums at the parameters' full shapes as soon as its clip group's
coefficients are known, and reduce-scatters each FSDP unit's (a ``fully_shard`` module's
parameters) into the processes' shards once they are all formed (one collective per unit and
dtype, as FSDP's own backward), so a process holds about one unit's full sums at a time,
never the whole gradient; the noise is then drawn for each shard's rows alone
(randomness.noise_rows), the shards' noise together the one process's."""

import math

import torch
import torch.distributed as dist

from indivgrad_cuda.reducers.clipped_sum import is_sharded

# torch 2.14 renames reduce_scatter_tensor (same arguments) and warns on the old name
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_sharded_model(params: dict) -> bool:
    """Whether any of ``params`` ({name: parameter}) is sharded (then all must be: Shards)."""
    return any(is_sharded(p) for p in params.values())


class Shards:
    """The trainable parameters' shards: FSDP2 splits dim 0 as ``torch.chunk`` does,
    ``ceil(rows / world)`` rows per process, the last processes' short or empty."""

    def __init__(self, model, params: dict):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import Shard

        groups = set()
        self.rows, self.chunk = {}, {}
        for name, p in params.items():
            if not is_sharded(p):
                raise ValueError(
                    f"model: parameter '{name}' is not sharded while others are (fully_shard); DP-SGD on a sharded "
                    f"model needs every trainable parameter sharded: call fully_shard on the root module too"
                )
            mesh = p.device_mesh
            if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"model: parameter '{name}' is placed {tuple(p.placements)} on a {mesh.ndim}-D device mesh; DP-SGD "
                    f"supports FSDP2's default placement, Shard(0) on a 1-D mesh"
                )
            if p.dim() == 0:
                raise ValueError(f"model: parameter '{name}' is a sharded 0-d tensor; DP-SGD shards dim 0")
            groups.add(mesh.get_group())
            world, rank = mesh.size(), mesh.get_local_rank()
            rows = p.shape[0]
            chunk = math.ceil(rows / world)
            self.chunk[name] = chunk
            self.rows[name] = (min(rank * chunk, rows), min((rank + 1) * chunk, rows))
        if len(groups) != 1:
            raise ValueError(f"model: its parameters are sharded over {len(groups)} device meshes; DP-SGD needs one")
        self.group = groups.pop()
        self.world = dist.get_world_size(self.group)
        # FSDP's units: each parameter belongs to the innermost fully_shard module above it
        # (FSDP reduce-scatters a unit's gradients together: so do we, once all are formed)
        units = [path for path, m in model.named_modules() if isinstance(m, FSDPModule)]
        self.units: dict = {}
        for name in params:
            unit = max((u for u in units if u == "" or name.startswith(u + ".")), key=len, default=None)
            self.units.setdefault(unit, []).append(name)
        self._unit_of = {name: unit for unit, names in self.units.items() for name in names}
        self._waiting: dict = {}  # a unit's sums formed so far, this batch

    def begin(self) -> None:
        """A new batch: nothing of an earlier one (cut short by an error) waits."""
        self._waiting.clear()

    def finish(self) -> None:
        if self._waiting:
            raise RuntimeError(f"the clipped sums of the FSDP units {sorted(self._waiting)} were left incomplete")

    def collect(self, sums: dict, into: dict) -> None:
        """Takes a layer's full-size sums (the clipped sum's sink); once every trainable
        parameter of an FSDP unit has its sum, reduce-scatters the unit's (scatter) and puts
        this process's rows in ``into``. Every process completes the units in the same order
        (the layers complete in the backward's order)."""
        for name, g in sums.items():
            self._waiting.setdefault(self._unit_of[name], {})[name] = g
        for unit in [u for u, got in self._waiting.items() if len(got) == len(self.units[u])]:
            into.update(self.scatter(self._waiting.pop(unit)))

    def zeros(self, p, name: str) -> torch.Tensor:
        """This process's rows of a zero gradient of ``p``."""
        r0, r1 = self.rows[name]
        return torch.zeros((r1 - r0, *p.shape[1:]), dtype=p.dtype, device=p.to_local().device)

    def scatter(self, sums: dict) -> dict:
        """{name: this process's rows of the sum over the processes of ``sums[name]``} (each of
        the parameter's full shape): one reduce-scatter per dtype, every parameter's chunks
        padded to ``ceil(rows / world)`` rows, laid out process by process."""
        by_dtype: dict = {}
        for name, g in sums.items():
            by_dtype.setdefault(g.dtype, []).append(name)
        out = {}
        world = self.world
        for names in by_dtype.values():
            sizes = [self.chunk[n] * _row_numel(sums[n]) for n in names]
            first = sums[names[0]]
            flat = first.new_zeros((world, sum(sizes)))
            offset = 0
            for name, size in zip(names, sizes):
                g = sums[name]
                padded = g.new_zeros((world * self.chunk[name], *g.shape[1:]))
                padded[: g.shape[0]] = g
                flat[:, offset : offset + size] = padded.reshape(world, size)
                offset += size
            mine = flat.new_empty(flat.shape[1])
            _reduce_scatter(mine, flat.reshape(-1), group=self.group)
            offset = 0
            for name, size in zip(names, sizes):
                r0, r1 = self.rows[name]
                shape = sums[name].shape[1:]
                out[name] = mine[offset : offset + size].view(self.chunk[name], *shape)[: r1 - r0].clone()
                offset += size
        return out

    @staticmethod
    def set_grad(p, local: torch.Tensor) -> None:
        """``p.grad``: a DTensor of p's spec whose shard here is ``local``."""
        from torch.distributed.tensor import DTensor

        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def _row_numel(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:])
