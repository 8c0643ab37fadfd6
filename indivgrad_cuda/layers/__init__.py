"""Layer rules: per supported layer type, how its factors (input and output gradient) become
per-sample gradients, squared norms and a clipped sum. ``RULES`` is the one table of the
supported types; a new layer type is a new file here and a row in it."""

from typing import Optional

from torch import nn

from indivgrad_cuda.layers import embedding, layer_norm, linear
from indivgrad_cuda.layers.base import Factors, LayerRule, acc_dtype, squared_rows  # noqa: F401

RULES = dict([linear.RULE, layer_norm.RULE, embedding.RULE])


def rule_for(module: nn.Module) -> Optional[LayerRule]:
    """The rule of a module: its type's, or its base type's when it keeps that forward (as
    nn.MultiheadAttention's NonDynamicallyQuantizableLinear does)."""
    for cls, rule in RULES.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return rule
    return None


def supported_names() -> str:
    return ", ".join(f"nn.{cls.__name__}" for cls in RULES)
