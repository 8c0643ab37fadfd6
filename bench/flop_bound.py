"""The FLOP bound of exact per-sample clipping (issue 28): a DP-SGD step costs at least a
non-private step plus each layer's per-sample gradient norm, since the clipped sum replaces
the weight-gradient GEMM (one GEMM over the batch's rows, each scaled by its sample's
coefficient) and adds nothing else of that order.

    bound = (non-private step FLOPs + sum of the layers' norm FLOPs) / non-private step FLOPs

- The non-private step is 3x the forward's FLOPs (the backward: twice the forward, an input
  gradient and a weight gradient per GEMM), the forward counted by
  torch.utils.flop_counter.FlopCounterMode: every matmul, the attention's two T x T products
  included (its full T x T: a causal mask is not discounted, on either side of the ratio).
- A layer's norm, per sample and per call, is the cheaper of the ghost form, T^2 (D_in + D_out)
  multiply-adds (the two T x T Gram matrices of its inputs and output gradients), and the direct
  form, T D_in D_out (its per-sample gradient), in FLOPs 2 per multiply-add. T is the number of
  rows a sample gives the layer (tokens; 1 for a [N, D_in] input). Layers: nn.Linear (and its
  subclasses), Hugging Face's Conv1D (GPT-2's; weight [D_in, D_out]) and nn.Embedding, which
  counts as D_in = 1 (a one-hot row: the direct form is T D, adding each token's output
  gradient to its row). Every call is counted (a layer called twice, twice; GPT-2's wte and its
  tied lm_head each for its own use, not the cross term of the tied sum, T^2 D); biases,
  norms' scales and the clip's elementwise work are left out (T D_out each).

    from flop_bound import flop_bound, flop_counts
    flop_bound(model, inputs)          # the ratio, e.g. 1.25 for GPT-2 small at T = 512
    flop_counts(model, inputs).layers  # each call's form and FLOPs
"""

import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

BACKWARD_FACTOR = 2  # a non-private step: forward + backward = 3x the forward's FLOPs


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Attention kernels FlopCounterMode has no formula for (torch 2.14): CPU's flash attention, which
# Hugging Face's "sdpa" attention calls on a CPU in eval mode; counted as its CUDA kernels are.
EXTRA_FORMULAS = {
    getattr(torch.ops.aten, name): _sdpa_flops
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(torch.ops.aten, name)
}


@dataclasses.dataclass
class LayerNorm:
    """One call of a layer: its shape and the cheaper form of its per-sample norm."""

    name: str
    kind: str  # "linear", "conv1d" (Hugging Face's) or "embedding"
    t: int  # rows per sample
    d_in: int
    d_out: int
    form: str  # "ghost" or "direct"
    flops: int  # for the whole batch


@dataclasses.dataclass
class FlopCount:
    batch: int
    forward_flops: int
    layers: list
    uncounted: list  # trainable parameters of modules no rule counted (their norms are left out)

    @property
    def step_flops(self):
        return (1 + BACKWARD_FACTOR) * self.forward_flops

    @property
    def norm_flops(self):
        return sum(layer.flops for layer in self.layers)

    @property
    def ratio(self):
        return (self.step_flops + self.norm_flops) / self.step_flops


def norm_cost(t, d_in, d_out):
    """(multiply-adds per sample, form) of one layer call's per-sample gradient norm."""
    ghost, direct = t * t * (d_in + d_out), t * d_in * d_out
    return (ghost, "ghost") if ghost < direct else (direct, "direct")


def _shape(module):
    """(kind, d_in, d_out) of a layer the bound counts, else None."""
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return "embedding", 1, module.embedding_dim
    # Hugging Face's Conv1D (GPT-2): a Linear with its weight stored [D_in, D_out]; by name, so
    # that transformers need not be installed
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return "conv1d", module.weight.shape[0], module.weight.shape[1]
    return None


def _batch(inputs):
    first = next(iter(inputs.values() if isinstance(inputs, dict) else inputs), None)
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("flop_counts: cannot tell the batch size from the inputs; give batch=")
    return first.shape[0]


def flop_counts(model, inputs, *, batch=None):
    """A FlopCount of one forward of model on inputs (a tuple: model(*inputs); a dict:
    model(**inputs); a tensor: model(inputs)), run under no_grad: the forward's FLOPs and each
    counted layer call's norm. batch: the number of samples (default: dim 0 of the first input)."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    n = _batch(inputs) if batch is None else batch
    layers, handles, counted = [], [], set()

    def hook(name, kind, d_in, d_out):
        def record(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            width = 1 if kind == "embedding" else d_in
            t = x.numel() // (n * width)
            macs, form = norm_cost(t, d_in, d_out)
            layers.append(LayerNorm(name, kind, t, d_in, d_out, form, 2 * n * macs))

        return record

    for name, module in model.named_modules():
        shape = _shape(module)
        if shape is not None and module.weight.requires_grad:
            handles.append(module.register_forward_hook(hook(name, *shape), with_kwargs=True))
            counted.add(f"{name}.weight" if name else "weight")
    try:
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter, torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    finally:
        for h in handles:
            h.remove()
    uncounted = [
        k
        for k, p in model.named_parameters()
        if p.requires_grad and k not in counted and not k.endswith("bias") and p.dim() >= 2
    ]
    return FlopCount(n, counter.get_total_flops(), layers, uncounted)


def flop_bound(model, inputs, *, batch=None):
    """The bound as a ratio to a non-private step: (step FLOPs + the layers' norm FLOPs) / step
    FLOPs (see the module's docstring)."""
    return flop_counts(model, inputs, batch=batch).ratio


def describe(count):
    """One line: the bound and what it is made of."""
    ghost = sum(1 for layer in count.layers if layer.form == "ghost")
    return (
        f"FLOP bound {count.ratio:.3f}x a non-private step: step {count.step_flops / 1e9:.3g} GFLOP (3x the "
        f"forward), norms {count.norm_flops / 1e9:.3g} GFLOP over {len(count.layers)} layer calls "
        f"({ghost} ghost, {len(count.layers) - ghost} direct)"
    )


def _main():
    """The bounds of the issue's two full-size setups, counted on CPU with one sample (the
    ratio does not depend on the batch): BERT-base at T = 128, GPT-2 small at T = 512."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2)).eval()
    ids = torch.randint(0, bert.config.vocab_size, (1, 128))
    count = flop_counts(bert, {"input_ids": ids, "position_ids": torch.arange(128)[None]})
    print(f"BERT-base, T 128: {describe(count)}")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    ids = torch.randint(0, gpt2.config.vocab_size, (1, 512))
    count = flop_counts(gpt2, {"input_ids": ids, "position_ids": torch.arange(512)[None]})
    print(f"GPT-2 small, T 512: {describe(count)}")


if __name__ == "__main__":
    _main()
