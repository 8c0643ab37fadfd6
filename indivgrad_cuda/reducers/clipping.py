"""How DP-SGD clips each sample's gradient: the trainable parameters split into G groups
(``clip_groups``), each group's part of the gradient scaled by a coefficient from its norm
(``clip_fn``) so that its norm is at most ``max_norm / sqrt(G)``; the whole clipped gradient's
norm is then at most ``max_norm``, whatever G, and noise of std ``noise_multiplier *
max_norm`` keeps its meaning. One place for the rule: the hooks path, the native MLP's C++
pass (through :meth:`Clipping.row_coefficients`) and DP-SGD all call it."""

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

CLIP_FNS = ("abadi", "automatic")  # fastDP's clipping_fn names ("Abadi", "automatic")
GROUPINGS = ("layer", "param")  # besides None (one group) and a list of lists of names
ABADI_EPS = 1e-6  # min(1, C / (norm + 1e-6)), as Opacus
DEFAULT_STABILITY = 0.01  # Bu et al.'s AUTO-S gamma, fastDP's default

ClipGroups = Union[None, str, Sequence[Sequence[str]]]


def resolve_groups(names: Sequence[str], clip_groups: ClipGroups) -> list[list[str]]:
    """The groups as lists of parameter names, from the trainable ``names`` (in
    ``named_parameters()`` order): None, one group of all; ``"layer"``, the parameters of each
    module (by the module part of the name, in order of first appearance); ``"param"``, one
    group per parameter; or the caller's list of lists, which must name every trainable
    parameter exactly once."""
    names = list(names)
    if clip_groups is None:
        return [names]
    if isinstance(clip_groups, str):
        if clip_groups == "param":
            return [[n] for n in names]
        if clip_groups == "layer":
            by_module: dict[str, list[str]] = {}
            for n in names:
                by_module.setdefault(n.rpartition(".")[0], []).append(n)
            return list(by_module.values())
        raise ValueError(
            f"clip_groups: expected None, one of {GROUPINGS} or a list of lists of parameter names, got {clip_groups!r}"
        )
    if not isinstance(clip_groups, Sequence) or not all(
        isinstance(g, Sequence) and not isinstance(g, str) and all(isinstance(n, str) for n in g) for g in clip_groups
    ):
        raise TypeError(
            f"clip_groups: expected None, one of {GROUPINGS} or a list of lists of parameter names, got {clip_groups!r}"
        )
    groups = [list(g) for g in clip_groups]
    listed = [n for g in groups for n in g]
    known = set(names)
    unknown = sorted({n for n in listed if n not in known})
    repeated = sorted({n for n in listed if listed.count(n) > 1})
    missing = [n for n in names if n not in set(listed)]
    empty = [i for i, g in enumerate(groups) if not g]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if repeated:
        problems.append(f"repeated {repeated}")
    if unknown:
        problems.append(f"not trainable parameters of the model {unknown}")
    if empty:
        problems.append(f"empty groups at {empty}")
    if problems:
        raise ValueError(
            f"clip_groups: every trainable parameter must be in exactly one group; {'; '.join(problems)} "
            f"(the trainable parameters: {names})"
        )
    return groups


def check_clip_fn(clip_fn: str, stability: float) -> None:
    if clip_fn not in CLIP_FNS:
        raise ValueError(f"clip_fn: expected one of {CLIP_FNS}, got {clip_fn!r}")
    if not (isinstance(stability, (int, float)) and not isinstance(stability, bool) and stability > 0):
        raise ValueError(f"stability: expected a number > 0, got {stability!r}")
    if not math.isfinite(stability):
        raise ValueError(f"stability: expected a finite number > 0, got {stability!r}")


class Clipping:
    """The clipping of one call: ``groups`` (lists of names) over the parameters ``names``
    (the rows of the squared norms ``sq [P, N]``, in that order), each group's threshold
    ``max_norm / sqrt(G)``, and its coefficient per sample:

    - ``"abadi"``: ``min(1, threshold / (norm + 1e-6))`` (Abadi et al. 2016; Opacus);
    - ``"automatic"``: ``threshold / (norm + stability)`` (Bu et al. 2023's AUTO-S; fastDP's
      default): every gradient normalised, none left as it is, no threshold to tune (the
      threshold only scales the step, as a learning rate does).
    """

    def __init__(
        self,
        max_norm: float,
        clip_fn: str,
        stability: float,
        groups: Optional[list[list[str]]],
        names: Sequence[str],
    ):
        if not (
            isinstance(max_norm, (int, float))
            and not isinstance(max_norm, bool)
            and max_norm > 0
            and math.isfinite(max_norm)
        ):
            raise ValueError(f"max_norm: expected a positive finite number, got {max_norm!r}")
        check_clip_fn(clip_fn, stability)
        self.names = list(names)
        self.flat = groups is None  # one group: norms [N]; else [N, G]
        self.groups = [self.names] if groups is None else groups
        self.max_norm, self.clip_fn, self.stability = float(max_norm), clip_fn, float(stability)
        self.threshold = group_threshold(self.max_norm, len(self.groups))
        row = {n: i for i, n in enumerate(self.names)}
        self.rows = [[row[n] for n in g] for g in self.groups]
        self.group_of = {n: k for k, g in enumerate(self.groups) for n in g}

    def key(self) -> tuple:
        """What a CUDA graph of the clipped sum depends on."""
        return (self.max_norm, self.clip_fn, self.stability, tuple(map(tuple, self.groups)))

    def coefficients(self, group_sq: torch.Tensor) -> torch.Tensor:
        """The coefficients from the squared norms of a group's part (any shape)."""
        if self.clip_fn == "abadi":
            return (self.threshold / (group_sq.sqrt() + ABADI_EPS)).clamp_max(1.0)
        return self.threshold / (group_sq.sqrt() + self.stability)

    def group_coefficients(self, k: int, sq: torch.Tensor) -> torch.Tensor:
        """Group k's coefficients [N'] from sq's columns at hand ([P, N'])."""
        return self.coefficients(self._group_sum(k, sq))

    def group_sq(self, sq: torch.Tensor) -> torch.Tensor:
        """[G, N] squared norms of each group's part."""
        if len(self.groups) == 1:
            return sq.sum(0, keepdim=True)
        return torch.stack([self._group_sum(k, sq) for k in range(len(self.groups))])

    def row_coefficients(self, sq: torch.Tensor) -> torch.Tensor:
        """[P, N]: each parameter's coefficients (its group's), from sq [P, N]."""
        coef = self.coefficients(self.group_sq(sq))
        if len(self.groups) == 1:
            return coef.expand(sq.shape[0], -1)
        return torch.stack([coef[self.group_of[n]] for n in self.names])

    def norms(self, sq: torch.Tensor) -> torch.Tensor:
        """What the clipped sum returns: the norms ``[N]`` (one group) or ``[N, G]``."""
        return sq.sum(0).sqrt() if self.flat else self.group_sq(sq).sqrt().t()

    def _group_sum(self, k: int, sq: torch.Tensor) -> torch.Tensor:
        """Sum of group k's rows of sq, by views (slices and integer rows): no index tensor, which
        a CUDA graph would record by address or a capture refuse to copy to the device."""
        rows = self.rows[k]
        r0 = rows[0]
        if rows == list(range(r0, r0 + len(rows))):
            return sq[r0 : r0 + len(rows)].sum(0)
        total = sq[rows[0]].clone()
        for r in rows[1:]:
            total += sq[r]
        return total


def group_threshold(max_norm: float, groups: int) -> float:
    """Each of ``groups`` groups' threshold: the whole clipped gradient's norm stays <= max_norm."""
    return max_norm / math.sqrt(groups)


def unclipped(norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N] bool: the samples of which no part was scaled by ``"abadi"`` (norms ``[N]`` or
    ``[N, G]`` from the clipped sum, each group's at most ``threshold``)."""
    kept = norms + ABADI_EPS <= threshold
    return kept if kept.dim() == 1 else kept.all(dim=1)
