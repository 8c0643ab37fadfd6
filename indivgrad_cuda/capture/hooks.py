"""The hooks capture: each trainable layer's factors for any ``nn.Module``.

Forward hooks on the supported layers that have trainable parameters record each call's
input and output; one ``torch.autograd.grad`` from the loss to those outputs gives the
gradient at each (nothing else: no summed weight gradient is formed). A module called
several times contributes all its calls, concatenated along T.

Two things would make that silently wrong, so they are checked: an output modified in
place after its layer returned it (its gradient would be the modified tensor's), and a
parameter used outside its module's forward (tied weights, functional code), whose other
uses the rules would miss. The second needs a walk of the autograd graph, done on the first
call with each input signature.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from indivgrad_cuda import randomness
from indivgrad_cuda.capture.layers import Layer, ModelScan
from indivgrad_cuda.capture.losses import loss_grad_seed
from indivgrad_cuda.capture.precision import no_autocast
from indivgrad_cuda.chunking import batch_size, split_batch
from indivgrad_cuda.layers import Factors


class HooksCapture:
    def __init__(self, model: nn.Module):
        self.model = model
        self.scan = ModelScan(model)
        self.scan.check()  # every trainable parameter belongs to a supported layer
        self._checked = set()  # input signatures whose parameter uses were checked

    def layers(self) -> List[Layer]:
        """The supported layers with trainable parameters now (requires_grad is read each call)."""
        self.scan.check()
        return self.scan.wanted_layers()

    @staticmethod
    def params(layers: List[Layer], layout: str) -> Dict[str, tuple]:
        """{name: (parameter, one sample's gradient shape in layout)} of the trainable parameters."""
        return {layer.names[attr]: (p, layer.rule.grad_shape(layer.module, attr, layout))
                for layer in layers for attr, p in layer.trainable().items()}

    def device(self) -> torch.device:
        for layer in self.scan.layers:
            return next(iter(layer.module.parameters())).device
        return torch.device("cpu")

    def run(self, layers: List[Layer], inputs, target, loss_fn: Callable, reduction: str,
            generator: Optional[torch.Generator], max_chunk: Optional[int], chunk_pass: Callable) -> None:
        """Forward, loss and backward chunk by chunk; ``chunk_pass(factors, n0, n1)`` gets
        each layer's :class:`Factors` (in ``layers`` order) for samples n0..n1."""
        _check_no_batch_statistics(self.scan.batch_norms)
        n = batch_size(inputs)
        size = max(1, n if max_chunk is None else min(n, max_chunk))  # see PerSampleGrads's max_chunk
        masks = randomness.DropoutMasks(self.scan.dropouts, n, generator)
        signature = _signature(inputs, self.model, layers)
        for n0, n1, chunk, tc in split_batch(inputs, target, n, size):
            check = signature not in self._checked
            with masks.rows(n0, n1), _Recorder(layers, check, n1 - n0) as rec, no_autocast(self.device().type), \
                    torch.enable_grad():
                output = _call(self.model, chunk)
            seed = loss_grad_seed(output, tc, loss_fn, reduction, n1 - n0)
            rec.check_untouched()
            if check:
                rec.check_parameter_uses(seed.loss)
                self._checked.add(signature)
            grads = _grads_at(seed, rec.outputs())
            chunk_pass(rec.factors(grads, n1 - n0), n0, n1)


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _grads_at(seed, outputs: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    if not outputs:
        return []
    return list(torch.autograd.grad(seed.loss, outputs, grad_outputs=seed.grad, allow_unused=True))


@dataclass
class _Call:
    record: torch.Tensor  # what the rule keeps of the input
    output: torch.Tensor
    version: int  # the output's version counter when the layer returned it


@dataclass
class _Recording:
    layer: Layer
    calls: List[_Call] = field(default_factory=list)
    local_uses: Dict[int, int] = field(default_factory=dict)  # id(param) -> autograd edges inside the calls


class _Recorder:
    """Forward hooks on the layers while active; what they recorded."""

    def __init__(self, layers: List[Layer], count_uses: bool, n: int):
        self.recordings = [_Recording(layer) for layer in layers]
        self.count_uses = count_uses
        self.n = n
        self.handles = []

    def __enter__(self):
        for rec in self.recordings:
            self.handles.append(rec.layer.module.register_forward_hook(self._hook(rec)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, rec: _Recording):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                raise RuntimeError(f"module '{rec.layer.path}' ({type(module).__name__}) returned no tensor that "
                                   f"requires grad; is the forward running under torch.no_grad()?")
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            if x is None or x.dim() == 0 or x.shape[0] != self.n or output.shape[0] != self.n:
                got = "no tensor" if x is None else f"shape {list(x.shape)}"
                raise ValueError(
                    f"module '{rec.layer.path}' ({type(module).__name__}) was called with {got}; per-sample "
                    f"gradients need dim 0 of every supported layer's input to be the batch (N={self.n}). Expand "
                    f"shared inputs (e.g. positions) to [N, ...] before the call")
            rec.calls.append(_Call(rec.layer.rule.record(module, inputs, output), output, output._version))
            if self.count_uses:
                stop = {t.grad_fn for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is not None}
                for pid, count in _param_edges([output.grad_fn], stop).items():
                    rec.local_uses[pid] = rec.local_uses.get(pid, 0) + count
        return hook

    def outputs(self) -> List[torch.Tensor]:
        return [call.output for rec in self.recordings for call in rec.calls]

    def check_untouched(self):
        for rec in self.recordings:
            for call in rec.calls:
                if call.output._version != call.version:
                    raise RuntimeError(
                        f"the output of module '{rec.layer.path}' ({type(rec.layer.module).__name__}) was modified in "
                        f"place after the module returned it (e.g. by ReLU(inplace=True) or `+=`); per-sample "
                        f"gradients need the gradient at the unmodified output: use the out-of-place form")

    def check_parameter_uses(self, loss: torch.Tensor):
        total = _param_edges([loss.grad_fn], set())
        for rec in self.recordings:
            for attr, p in rec.layer.trainable().items():
                outside = total.get(id(p), 0) - rec.local_uses.get(id(p), 0)
                if outside > 0:
                    raise RuntimeError(
                        f"parameter '{rec.layer.names[attr]}' of module '{rec.layer.path}' "
                        f"({type(rec.layer.module).__name__}) is used outside that module's forward (tied to another "
                        f"layer, or used by functional code such as nn.MultiheadAttention's); its per-sample gradient "
                        f"would miss those uses. Call the module instead, or freeze the parameter")

    def factors(self, grads: List[Optional[torch.Tensor]], n: int) -> List[Optional[Factors]]:
        """Each layer's factors (None for a layer not called in this forward: its gradients are 0)."""
        out, k = [], 0
        for rec in self.recordings:
            rule, module = rec.layer.rule, rec.layer.module
            records, gs = [], []
            for call in rec.calls:
                g = grads[k]
                k += 1
                records.append(call.record)
                gs.append(rule.output_grad(module, torch.zeros_like(call.output) if g is None else g))
            out.append(rule.combine(records, gs) if records else None)
        return out


def _param_edges(roots, stop) -> Dict[int, int]:
    """id(parameter) -> number of autograd edges into its AccumulateGrad node, over the graph
    reachable from `roots` without entering the nodes in `stop`."""
    counts, seen, todo = {}, set(stop), [r for r in roots if r is not None]
    seen.update(todo)
    while todo:
        node = todo.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                counts[id(var)] = counts.get(id(var), 0) + 1
            elif nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return counts


def _signature(inputs, model, layers):
    def sig(t):
        return (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__

    if isinstance(inputs, dict):
        parts = tuple((k, sig(v)) for k, v in inputs.items())
    elif isinstance(inputs, tuple):
        parts = tuple(sig(v) for v in inputs)
    else:
        parts = sig(inputs)
    trainable = tuple(id(p) for layer in layers for p in layer.trainable().values())
    return parts, model.training, trainable


def _check_no_batch_statistics(batch_norms) -> None:
    for path, m in batch_norms:
        if m.training:
            raise ValueError(
                f"module '{path}' ({type(m).__name__}) is in train mode: it normalises each sample with statistics "
                f"of the whole batch, which mixes samples, so per-sample gradients do not exist. Put it in eval "
                f"mode (model.eval() or m.eval()), or use a per-sample normalisation (LayerNorm, GroupNorm)")

