"""Layer rules: per supported layer type, how its factors (input and output gradient) become
per-sample gradients, squared norms, a clipped sum, inner products and projections.
``RULES`` is the one table of the layer types served by a rule; a new layer type is a new
file here and a row in it. What no rule matches is served by the per-module fallback
(:mod:`indivgrad_cuda.layers.fallback`) or refused."""

from typing import Optional

from torch import nn

from indivgrad_cuda.layers import conv, embedding, group_norm, layer_norm, linear, multihead_attention, rms_norm
from indivgrad_cuda.layers.base import Factors, LayerRule, acc_dtype, squared_rows  # noqa: F401
from indivgrad_cuda.layers.fallback import FallbackRule

# the first rule that matches a module serves it; (what users read in errors, the rule)
RULES = [
    ("nn.Linear on [N, *, D_in]", linear.RULE),
    ("nn.LayerNorm with elementwise affine", layer_norm.RULE),
    ("nn.Embedding without max_norm or scale_grad_by_freq", embedding.RULE),
    ("nn.Conv1d/2d/3d (any stride, padding, padding_mode, dilation, groups)", conv.RULE),
    ("nn.GroupNorm with affine parameters", group_norm.GROUP_NORM),
    ("nn.InstanceNorm1d/2d/3d with affine=True", group_norm.INSTANCE_NORM),
    ("nn.RMSNorm", rms_norm.RULE),
    ("nn.MultiheadAttention", multihead_attention.RULE),
    ("Hugging Face's Conv1D (GPT-2)", linear.CONV1D_RULE),
    ("RMS norms of Hugging Face models (LlamaRMSNorm and its copies, Gemma's, T5LayerNorm)", rms_norm.FAMILY_RULE),
]
FALLBACK = FallbackRule()


def rule_for(module: nn.Module, path: str = "", fallback: bool = False) -> Optional[LayerRule]:
    """The rule serving a module (bound to it), the fallback when ``fallback`` and none
    matches, else None."""
    for _, rule in RULES:
        if rule.matches(module):
            return rule.bind(path, module, fallback)
    return FALLBACK.bind(path, module) if fallback else None


def supported_names() -> str:
    return "; ".join(what for what, _ in RULES)
