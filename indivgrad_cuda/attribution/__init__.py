"""Data attribution from the engine's layer factors: TracIn (:func:`tracin_scores`), TRAK
(:class:`TRAK`), influence functions with K-FAC or EK-FAC curvature (:class:`Influence`), and
the linear datamodeling score that judges them (:func:`lds`)."""

from indivgrad_cuda.attribution.influence import Influence
from indivgrad_cuda.attribution.lds import LDS, lds
from indivgrad_cuda.attribution.outputs import margin, negative_margin, one_minus_p
from indivgrad_cuda.attribution.trak import TRAK


def __getattr__(name: str):
    if name in ("tracin_scores", "tracin_self_influence"):  # defined beside the package (ig.tracin_scores)
        from indivgrad_cuda import tracin

        return getattr(tracin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LDS",
    "TRAK",
    "Influence",
    "lds",
    "margin",
    "negative_margin",
    "one_minus_p",
    "tracin_scores",
    "tracin_self_influence",
]
