"""Kronecker-factored random projections of per-sample gradients, as in LoGra
(arXiv 2405.13954): a Linear weight's gradient ``G_nᵀ A_n`` [D_out, D_in] is projected to
``P_out G_nᵀ A_n P_inᵀ`` [k_out, k_in], that is ``sum_t (P_out g_t) ⊗ (P_in a_t)``, so only
the factors are ever projected; its bias's ``sum_t g_t`` to ``P_out sum_t g_t``. An
Embedding's [V, D] gradient is projected by ``P_rows`` and ``P_cols`` likewise, a LayerNorm's
vectors by one matrix each.

Dimensions (``dim``): each layer gets the share ``dim · (its trainable parameters) / (all
trainable parameters)`` and splits it between its factors as its rule says
(:meth:`indivgrad_cuda.layers.LayerRule.projection_dims`): a Linear takes ``k_in =
floor(sqrt(share))`` and ``k_out = floor(share / (k_in + 1 if it has a trainable bias else
k_in))``, each at least 1 and at most the width it projects. So the total ``D_proj`` is at
most ``dim`` (unless some layer's share is below its minimum of one dimension per factor),
and is read from :attr:`Projection.dim`.

Entries: independent Gaussians of variance ``1/k`` (k: the matrix's rows), so
``E[PᵀP] = I`` for each matrix and for each Kronecker product: inner products between
projected gradients are unbiased estimates of the gradients' inner products. Matrix ``key``
of the layer at ``path`` is drawn in float64 on the CPU from a generator seeded with
blake2b(seed, path, key), then cast to the model's dtype (float32 for half types) and moved
to its device: the same for a seed on every device, independent of the batch, of the other
layers and of ``dim`` beyond its first k rows.
"""

import hashlib
import math
from dataclasses import dataclass

import torch

from indivgrad_cuda.capture.layers import Layer
from indivgrad_cuda.layers import acc_dtype


@dataclass
class Projection:
    """A seeded Kronecker-factored projection of every trainable parameter's gradient.

    Attributes:
        dim: ``D_proj``, the total projected dimension (columns of ``PerSampleGrads.project``).
        seed: the seed it was drawn from.
        matrices: parameter name -> its factor matrices: ``(P_rows, P_cols)`` for a
            matrix-shaped gradient ``W`` [R, C] (projected to ``vec(P_rows W P_colsᵀ)``,
            row-major), ``(P,)`` for a vector ``w`` (projected to ``P w``). A Linear weight's
            are ``(P_out, P_in)`` in nn.Linear's [D_out, D_in] layout; its bias's ``(P_out,)``.
        columns: parameter name -> its slice of the ``D_proj`` columns (named_parameters() order).
        dtype: the matrices' and the projections' dtype (the model's; float32 for half types).
    """

    dim: int
    seed: int
    matrices: dict[str, tuple[torch.Tensor, ...]]
    columns: dict[str, slice]
    dtype: torch.dtype

    def apply(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projects materialised per-sample gradients ``{name: [N, *param.shape]}`` (every
        parameter of the projection; Linear weights in the "out_in" layout) to ``[N, D_proj]``,
        explicitly: the reference that ``PerSampleGrads.project`` matches without them."""
        missing = [name for name in self.matrices if name not in grads]
        if missing:
            raise ValueError(f"grads: expected every projected parameter, missing {missing}")
        n = next(iter(grads.values())).shape[0] if grads else 0
        device = next(iter(self.matrices.values()))[0].device if self.matrices else torch.device("cpu")
        out = torch.zeros(n, self.dim, dtype=self.dtype, device=device)
        for name, mats in self.matrices.items():
            w = grads[name].to(dtype=self.dtype, device=device)
            if len(mats) == 2:
                rows, cols = mats
                w = rows @ w.reshape(n, rows.shape[1], cols.shape[1]) @ cols.t()
            else:
                w = w.reshape(n, -1) @ mats[0].t()
            out[:, self.columns[name]] = w.flatten(1)
        return out


def build_projection(layers: list[Layer], dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> Projection:
    """The projection of ``layers``' trainable parameters (see the module's docs)."""
    trainable, seen = [], set()  # a tied parameter is projected by the matrices of its first layer
    for layer in layers:
        params = {a: p for a, p in layer.trainable().items() if layer.names[a] not in seen}
        seen.update(layer.names[a] for a in params)
        trainable.append((layer, params))
    total = sum(p.numel() for _, params in trainable for p in params.values())
    matrices, cache, dims = {}, {}, {}
    acc = acc_dtype(dtype)
    for layer, params in trainable:
        if not params:
            continue
        share = dim * sum(p.numel() for p in params.values()) / max(1, total)
        for attr, factors in layer.rule.projection_dims(layer.module, list(params), share).items():
            mats = []
            for key, k, d in factors:
                if (layer.path, key) not in cache:
                    cache[(layer.path, key)] = _gaussian(seed, layer.path, key, k, d).to(acc).to(device)
                mats.append(cache[(layer.path, key)])
            matrices[layer.names[attr]] = tuple(mats)
            dims[layer.names[attr]] = math.prod(k for _, k, _ in factors)
    columns, start = {}, 0
    for name in _parameter_order(layers, matrices):
        columns[name] = slice(start, start + dims[name])
        start += dims[name]
    return Projection(start, seed, {name: matrices[name] for name in columns}, columns, acc)


def _parameter_order(layers, names):
    """The projected names in the order their layers own them (named_parameters() order)."""
    return list(
        dict.fromkeys(layer.names[attr] for layer in layers for attr in layer.names if layer.names[attr] in names)
    )


def _gaussian(seed: int, path: str, key: str, k: int, d: int) -> torch.Tensor:
    digest = hashlib.blake2b(f"{seed}/{path}/{key}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.randn(k, d, generator=generator, dtype=torch.float64) / math.sqrt(k)
