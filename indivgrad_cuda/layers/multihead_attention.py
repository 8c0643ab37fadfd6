"""nn.MultiheadAttention, through the per-module fallback with its batch dims known.

All its parameters are served together (``in_proj_weight`` or ``q/k/v_proj_weight``,
``in_proj_bias``, ``bias_k``/``bias_v``, and ``out_proj``'s, which MHA's forward uses without
calling ``out_proj``): ``batch_first`` either way, ``key_padding_mask``, 2-D or 3-D
``attn_mask``, ``need_weights`` either way. The per-sample gradients come from torch.func
over MHA's own forward (a rule from its projections' factors would need the projections'
inputs, which its fused forward never exposes).
"""

import inspect

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from indivgrad_cuda.errors import UnsupportedModuleError
from indivgrad_cuda.layers.fallback import FallbackRule

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class MultiheadAttentionRule(FallbackRule):
    module_type = nn.MultiheadAttention
    owns_subtree = True

    def batch_dims(self, module, args, kwargs, n):
        bound = _SIGNATURE.bind(module, *args, **kwargs)
        named = dict(bound.arguments)
        del named["self"]
        seq = 0 if module.batch_first else 1
        dims, unsqueeze = {}, {}
        for name in ("query", "key", "value"):
            t = named[name]
            if t.dim() != 3 or t.shape[seq] != n:
                raise UnsupportedModuleError(
                    f"'{self.path}' (MultiheadAttention): {name} must be batched with the batch (N={n}) in dim {seq} "
                    f"(batch_first={module.batch_first}), got shape {list(t.shape)}"
                )
            dims[name], unsqueeze[name] = seq, True
        if named.get("key_padding_mask") is not None:
            dims["key_padding_mask"], unsqueeze["key_padding_mask"] = 0, True
        mask = named.get("attn_mask")
        if mask is not None and mask.dim() == 3:  # [N * heads, L, S]: each sample's [heads, L, S]
            named["attn_mask"] = mask.reshape(n, -1, *mask.shape[1:])
            dims["attn_mask"], unsqueeze["attn_mask"] = 0, False
        ids = {id(v): k for k, v in named.items() if isinstance(v, torch.Tensor)}
        leaves = tree_leaves(((), named))
        in_dims = [dims.get(ids.get(id(v))) if isinstance(v, torch.Tensor) else None for v in leaves]
        flags = [bool(unsqueeze.get(ids.get(id(v)))) if isinstance(v, torch.Tensor) else False for v in leaves]
        return (), named, in_dims, flags

    def output_dims(self, module, outputs):
        return [0 if module.batch_first else 1] + [0] * (len(outputs) - 1)


RULE = MultiheadAttentionRule()
