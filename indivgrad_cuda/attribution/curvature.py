"""Per-layer curvature for influence functions, from the layer factors the engine captures.

A Linear-like layer (nn.Linear, GPT-2's Conv1D; on [N, D_in] or sequences [N, T, D_in]) whose
weight is trainable gets a Kronecker-factored curvature, exactly as Kronfluence 1.0.1 defines
it. With ``a'`` the layer's input with a 1 appended when its bias is trainable, and ``g`` the
gradient at its output of sample n's own loss (labels sampled from the model for the true
Fisher):

- ``A = sum a' a'ᵀ / rows``, ``S = sum g gᵀ / rows`` (rows: samples x positions);
  ``A = U_a diag(alpha) U_aᵀ``, ``S = U_g diag(sigma) U_gᵀ``;
- K-FAC: ``Λ_ij = sigma_i alpha_j``, so ``(Λ + λ)⁻¹`` in the eigenbasis is ``(S ⊗ A + λI)⁻¹``;
- EK-FAC: ``Λ = mean_n (U_gᵀ W_n U_a)²`` (elementwise), ``W_n = sum_t g_t a'_tᵀ`` being
  sample n's gradient of [weight | bias]; on [N, D_in] inputs ``W_n`` is an outer product, so
  ``Λ = (Ĝ²)ᵀ Â² / N`` with ``Ĝ = G U_g``, ``Â = A' U_a``: no per-sample gradient is formed.

Every other trainable parameter (LayerNorm, RMSNorm, GroupNorm, Embedding, convolutions,
MultiheadAttention's projections, the per-module fallback, and a Linear's bias when its weight
is frozen) gets a diagonal curvature, ``Λ = mean_n w_n²`` from its per-sample gradients (EK-FAC
in the parameter's own basis), under both strategies.

Damping ``λ``: a given number for every layer, or (``None``) Kronfluence's heuristic, 0.1
times the mean of the layer's ``Λ``. The preconditioned gradient is
``U_g ((U_gᵀ W U_a) / (Λ + λ)) U_aᵀ`` (diagonal: ``w / (Λ + λ)``).
"""

from typing import Optional

import torch

from indivgrad_cuda import ops
from indivgrad_cuda.layers import acc_dtype
from indivgrad_cuda.layers.linear import LinearRule

HEURISTIC_DAMPING = 0.1  # Kronfluence's HEURISTIC_DAMPING_SCALE
BLOCK_ELEMENTS = 1 << 24  # the most elements of a temporary block of per-sample gradients (64 MiB in float32)


def is_kronecker(layer) -> bool:
    return isinstance(layer.rule, LinearRule) and "weight" in layer.trainable()


def augmented_input(layer, f) -> torch.Tensor:
    """[N, T, D_in (+1)]: the layer's input, with a column of ones when its bias is trainable."""
    a = f.a.to(acc_dtype(f.a.dtype))
    if "bias" in layer.trainable():
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
    return a


def output_grad(f) -> torch.Tensor:
    return f.g.to(acc_dtype(f.g.dtype))


def per_sample_kron(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[N, D_out, D_in']: each sample's ``sum_t g_t a_tᵀ``."""
    return g.transpose(1, 2) @ a


class Eigenvalues:
    """What both curvatures share: eigenvalues ``Λ`` summed over ``samples``, damped and inverted."""

    lam: Optional[torch.Tensor]
    samples: int

    def inverse_eigenvalues(self, damping: Optional[float]) -> torch.Tensor:
        lam = self.lam / self.samples
        d = HEURISTIC_DAMPING * lam.mean() if damping is None else damping
        return 1.0 / (lam + d)


class Kronecker(Eigenvalues):
    """One Linear-like layer's K-FAC / EK-FAC curvature (see the module's docs)."""

    kind = "kronecker"

    def __init__(self, names: list[str]):
        self.names = names  # [weight name] or [weight name, bias name]
        self.a_cov = self.g_cov = self.lam = None
        self.rows = self.samples = 0
        self.u_a = self.u_g = self.alpha = self.sigma = None

    # fitting

    def add_covariances(self, layer, f) -> None:
        a, g = augmented_input(layer, f), output_grad(f)
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        if self.a_cov is None:
            self.a_cov = a2.new_zeros(a2.shape[1], a2.shape[1])
            self.g_cov = g2.new_zeros(g2.shape[1], g2.shape[1])
        self.a_cov.addmm_(a2.t(), a2)
        self.g_cov.addmm_(g2.t(), g2)
        self.rows += a2.shape[0]

    def eigendecompose(self) -> None:
        """The covariances' eigenbases (in float64, as Kronfluence's default), the K-FAC eigenvalues."""
        dtype = self.a_cov.dtype
        for cov, which in ((self.a_cov, "a"), (self.g_cov, "g")):
            c = cov.double() / max(1, self.rows)
            vals, vecs = torch.linalg.eigh((c + c.t()) / 2)
            setattr(self, f"u_{which}", vecs.to(dtype))
            setattr(self, "alpha" if which == "a" else "sigma", vals.to(dtype))
        self.a_cov = self.g_cov = None  # the eigenbases replace them

    def kfac_eigenvalues(self) -> None:
        self.lam, self.samples = torch.outer(self.sigma, self.alpha), 1

    def add_eigenvalues(self, layer, f) -> None:
        """EK-FAC: adds the squared rotated per-sample gradients of a chunk."""
        a, g = augmented_input(layer, f) @ self.u_a, output_grad(f) @ self.u_g
        if self.lam is None:
            self.lam = a.new_zeros(g.shape[-1], a.shape[-1])
        if a.shape[1] == 1:  # W_n = ĝ_n â_nᵀ: its square is ĝ_n² (â_n²)ᵀ
            self.lam.addmm_(g[:, 0].square().t(), a[:, 0].square())
        else:
            step = max(1, BLOCK_ELEMENTS // self.lam.numel())
            for n0 in range(0, a.shape[0], step):
                self.lam += per_sample_kron(a[n0 : n0 + step], g[n0 : n0 + step]).square_().sum(0)
        self.samples += a.shape[0]

    # scoring

    def precondition(self, layer, f, inv: torch.Tensor) -> torch.Tensor:
        """[M, D_out, D_in']: each test sample's gradient times ``(H + λI)⁻¹``, formed a
        block of BLOCK_ELEMENTS at a time (its temporaries would be four times the result)."""
        a, g = augmented_input(layer, f), output_grad(f)
        out = a.new_empty(len(a), *inv.shape)
        step = max(1, BLOCK_ELEMENTS // inv.numel())
        for i in range(0, len(a), step):
            r = (self.u_g.t() @ per_sample_kron(a[i : i + step], g[i : i + step]) @ self.u_a).mul_(inv)
            torch.matmul(self.u_g @ r, self.u_a.t(), out=out[i : i + step])
        return out

    def score(self, layer, f, q: torch.Tensor) -> torch.Tensor:
        """[B, M]: ``<q_m, W_n>`` for the chunk's samples n against the preconditioned q.
        Each ``W_n`` is formed (ops.seq_outer), a block of at most BLOCK_ELEMENTS at a time,
        and multiplied by q in one GEMM: the Gram form ``g_nᵀ Q_m a_n`` costs the same
        multiply-adds on [N, D_in] inputs and T times more on sequences, and its batched
        contractions ran slower than the GEMM (bench/NOTES.md)."""
        a, g = augmented_input(layer, f), output_grad(f)
        m = q.shape[0]
        qf = q.reshape(m, -1).t()
        step = max(1, BLOCK_ELEMENTS // qf.shape[0])
        w = a.new_empty(min(step, len(a)), *q.shape[1:])
        parts = []
        for i in range(0, len(a), step):
            wi = w[: len(a[i : i + step])]
            ops.seq_outer(a[i : i + step], g[i : i + step], layout="out_in", out=wi)
            parts.append(wi.view(len(wi), -1) @ qf)
        return torch.cat(parts) if parts else a.new_zeros(0, m)

    def state(self) -> dict:
        return {"u_a": self.u_a, "u_g": self.u_g, "lam": self.lam / self.samples}

    def load(self, state: dict) -> None:
        self.u_a, self.u_g, self.lam, self.samples = state["u_a"], state["u_g"], state["lam"], 1


class Diagonal(Eigenvalues):
    """One parameter's diagonal curvature ``mean_n w_n²`` (see the module's docs)."""

    kind = "diagonal"

    def __init__(self, names: list[str]):
        self.names = names
        self.lam, self.samples = None, 0

    def add(self, grads: torch.Tensor) -> None:
        """grads: [N, P] per-sample gradients."""
        sq = grads.square().sum(0)
        self.lam = sq if self.lam is None else self.lam.add_(sq)
        self.samples += grads.shape[0]

    def state(self) -> dict:
        return {"lam": self.lam / self.samples}

    def load(self, state: dict) -> None:
        self.lam, self.samples = state["lam"], 1
