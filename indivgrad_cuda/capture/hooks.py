"""The hooks capture: each trainable layer's factors for any ``nn.Module``.

Forward hooks on the supported layers that have trainable parameters record each call's
input and pass its output through a tap: an identity in the forward whose backward hands
the gradient arriving at the output to the capture and passes it on unchanged. One
``torch.autograd.backward`` from the loss to a probe that every tap feeds (a 0-element leaf)
runs exactly the part of the graph that reaches the layers' outputs, forms no summed weight
gradient, and lets each layer be reduced as soon as its gradient arrives, so the gradients
are freed as a normal backward frees them. A module called several times contributes all its
calls, concatenated along T, once the last of them has its gradient.

The tap's output is a detached alias of the layer's output, not a view: an in-place op on it
afterwards (``ReLU(inplace=True)``, ``+=``) is recorded after the tap, which still receives
the gradient at the unmodified output (the version counter stays shared, so autograd still
refuses in-place changes to tensors a backward saved). What would be silently wrong is
refused: a parameter used outside the calls of the layers serving it (functional code, a
parent using a submodule's weights), whose other uses the rules would miss, found by a walk of
the autograd graph on the first call with each input signature; with the fallback it moves to
the fallback of the module holding its uses instead (:mod:`parameter_uses`).

Rules whose factors come from the module's input and output (Linear, ...) record the input
and tap the output; the fallback records the call's arguments and taps every output that
carries a gradient; an ``inner`` rule (nn.MultiheadAttention) taps tensors inside its
module's forward (its projections) through the rule's intercept.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from indivgrad_cuda import randomness
from indivgrad_cuda.capture import parameter_uses
from indivgrad_cuda.capture.layers import Layer, ModelScan, tied_names
from indivgrad_cuda.capture.losses import loss_grad_seed
from indivgrad_cuda.capture.precision import no_autocast
from indivgrad_cuda.chunking import batch_size, split_batch
from indivgrad_cuda.errors import UnsupportedModuleError
from indivgrad_cuda.layers import Factors, FallbackRule

# visit(layer index, its Factors or None when it had no gradient, n0, n1)
Visit = Callable[[int, Optional[Factors], int, int], None]


class HooksCapture:
    def __init__(self, model: nn.Module, fallback: bool = True):
        self.model = model
        self.fallback = fallback
        self.scan = ModelScan(model, fallback)
        self.scan.check()  # every trainable parameter belongs to a supported layer
        self._checked = set()  # input signatures whose parameter uses were checked

    def layers(self) -> list[Layer]:
        """The supported layers with trainable parameters now (requires_grad is read each call)."""
        self.scan.check()
        return self.scan.wanted_layers()

    def params(self, layers: list[Layer], layout: str) -> dict[str, tuple]:
        """{name: (parameter, one sample's gradient shape in layout)} of the trainable parameters
        (a parameter several layers share takes its own shape whatever the layout)."""
        tied = tied_names(layers)
        out = {}
        for layer in layers:
            for attr, p in layer.trainable().items():
                name = layer.names[attr]
                if name not in out:
                    shape = tuple(p.shape) if name in tied else layer.rule.grad_shape(layer.module, attr, layout)
                    out[name] = (p, shape)
        return dict(sorted(out.items(), key=lambda item: self.scan.order[item[0]]))  # named_parameters() order

    def unchecked(self) -> bool:
        """No call has passed the check of parameter uses yet."""
        return not self._checked

    def device(self) -> torch.device:
        for layer in self.scan.layers:
            return next(iter(layer.module.parameters())).device
        return torch.device("cpu")

    def run(
        self,
        layers: list[Layer],
        inputs,
        target,
        loss_fn: Callable,
        reduction: str,
        generator: Optional[torch.Generator],
        max_chunk: Optional[int],
        visit: Visit,
        end_chunk: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        """Forward, loss and backward chunk by chunk: ``visit`` gets each layer's factors for
        samples n0..n1 during the backward (in the order they complete), ``end_chunk(n0, n1)``
        is called after the chunk's backward."""
        _check_no_batch_statistics(self.scan.batch_norms)
        n = batch_size(inputs)
        size = max(1, n if max_chunk is None else min(n, max_chunk))  # see PerSampleGrads's max_chunk
        masks = randomness.DropoutMasks(self.scan.dropouts, n, generator)
        signature = _signature(inputs, self.model, layers)
        device = self.device()
        for n0, n1, chunk, tc in split_batch(inputs, target, n, size):
            check = signature not in self._checked
            rec = _Recorder(layers, check, n1 - n0, lambda i, f, n0=n0, n1=n1: visit(i, f, n0, n1), device)
            modules = parameter_uses.ModuleUses(self.model, layers) if check else contextlib.nullcontext()
            with masks.rows(n0, n1), rec, modules, no_autocast(device.type), torch.enable_grad():
                output = _call(self.model, chunk)
            seed = loss_grad_seed(output, tc, loss_fn, reduction, n1 - n0)
            if check:
                parameter_uses.check(self.scan, rec, modules, seed.loss, self.fallback)
                self._checked.add(signature)
            if rec.calls_recorded and seed.loss.requires_grad:  # else no layer's output reaches the loss
                torch.autograd.backward(seed.loss, grad_tensors=seed.grad, inputs=[rec.probe])
            rec.finish()
            if rec.refused:
                raise UnsupportedModuleError("\n".join(rec.refused))
            if end_chunk is not None:
                end_chunk(n0, n1)


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


class _Tap(torch.autograd.Function):
    """Identity on a layer's output; its backward hands the gradient to a callback."""

    @staticmethod
    def forward(ctx, x, probe, callback):
        ctx.callback = callback
        return x.detach()  # an alias that is not a view: in-place ops on it are recorded after the tap

    @staticmethod
    def backward(ctx, grad):
        ctx.callback(grad)
        return grad, None, None


@dataclass
class _Call:
    record: object  # what the rule keeps of the input
    # (shape, dtype, device) of each tapped output, for a zero gradient where none arrives; not
    # the outputs themselves, which a normal step frees once the next op has run
    outputs: list
    grads: list  # the gradient at each tapped output, once the backward has reached it (else None)


@dataclass
class _Recording:
    layer: Layer
    calls: list[_Call] = field(default_factory=list)
    expected: int = 0  # tapped outputs over all calls
    arrived: int = 0
    done: bool = False
    local_uses: dict[int, int] = field(default_factory=dict)  # id(param) -> autograd edges inside the calls


class _Recorder:
    """Forward hooks on the layers while active; hands each layer's factors to `on_layer`
    once the gradients of all its calls' tapped outputs have arrived (or, for those that never
    do, in finish())."""

    def __init__(self, layers: list[Layer], check: bool, n: int, on_layer: Callable, device: torch.device):
        self.recordings = [_Recording(layer) for layer in layers]
        self.check = check
        self.n = n
        self.on_layer = on_layer
        self.probe = torch.empty(0, device=device, requires_grad=True)  # every tap feeds it: the backward's target
        self.calls_recorded = 0
        self.handles = []
        self.inside = []  # the intercepts of the inner rules' calls in progress
        self.refused = []  # what the layers' reductions refused (a fallback that cannot run, ...)

    def __enter__(self):
        for i, rec in enumerate(self.recordings):
            m, rule = rec.layer.module, rec.layer.rule
            if rule.inner:
                self.handles.append(m.register_forward_pre_hook(self._begin_inner(i, rec)))
            elif not isinstance(rule, FallbackRule):  # the fallback takes its inputs as they come
                self.handles.append(m.register_forward_pre_hook(self._expand_shared))
            self.handles.append(m.register_forward_hook(self._hook(i, rec), with_kwargs=True))
        return self

    def _begin_inner(self, index: int, rec: _Recording):
        """An inner rule's call: its intercept taps what it needs until the forward hook."""

        def pre_hook(module, inputs):
            call = _Call(None, [], [])

            def tap(t):
                k = len(call.grads)
                call.outputs.append((t.shape, t.dtype, t.device))
                call.grads.append(None)
                rec.expected += 1
                return _Tap.apply(t, self.probe, lambda g: self._arrive(index, call, k, g))

            intercept = rec.layer.rule.intercept(module, self.n, tap)
            intercept.__enter__()
            self.inside.append((call, intercept))

        return pre_hook

    def _expand_shared(self, module, inputs):
        """An input of one row while the batch has N (positions [1, T] shared by every sample,
        as Hugging Face models pass them) is expanded to N rows, so that each sample's share of
        the layer's gradient is its own (the output then has N rows too)."""
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if x is not None and x.dim() >= 2 and x.shape[0] == 1 and self.n > 1:
            return (x.expand(self.n, *x.shape[1:]), *inputs[1:])
        return None

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        while self.inside:  # a forward that raised inside an inner rule's call
            self.inside.pop()[1].__exit__(None, None, None)

    def _hook(self, index: int, rec: _Recording):
        layer = rec.layer

        def hook(module, args, kwargs, output):
            leaves, spec = tree_flatten(output)
            if layer.rule.inner:
                return self._end_inner(rec, module, args, kwargs, leaves)
            taps = layer.rule.taps(output)
            if not taps or not all(isinstance(leaves[i], torch.Tensor) and leaves[i].requires_grad for i in taps):
                raise RuntimeError(
                    f"module '{layer.path}' ({type(module).__name__}) returned no tensor that requires grad; is the "
                    f"forward running under torch.no_grad()?"
                )
            if not isinstance(layer.rule, FallbackRule):
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                why = None if x is None else layer.rule.bad_input(module, x)
                if why:
                    raise ValueError(f"module '{layer.path}' ({type(module).__name__}) {why} (N={self.n})")
                out = leaves[taps[0]]
                if x is None or x.dim() == 0 or x.shape[0] != self.n or out.shape[0] != self.n:
                    got = "no tensor" if x is None else f"shape {list(x.shape)}"
                    raise ValueError(
                        f"module '{layer.path}' ({type(module).__name__}) was called with {got}; per-sample "
                        f"gradients need dim 0 of every supported layer's input to be the batch (N={self.n}), or 1 "
                        f"for an input shared by all samples (e.g. positions [1, T])"
                    )
            if self.check:
                self._count_local_uses(rec, args, kwargs, [leaves[i] for i in taps])
            call = _Call(layer.rule.record(module, args, kwargs, output, self.n, self.check), [], [None] * len(taps))
            for k, i in enumerate(taps):
                call.outputs.append((leaves[i].shape, leaves[i].dtype, leaves[i].device))
                leaves[i] = _Tap.apply(leaves[i], self.probe, lambda g, call=call, k=k: self._arrive(index, call, k, g))
            rec.calls.append(call)
            rec.expected += len(taps)
            self.calls_recorded += 1
            return tree_unflatten(leaves, spec)

        return hook

    def _end_inner(self, rec: _Recording, module, args, kwargs, leaves):
        call, intercept = self.inside.pop()
        intercept.__exit__(None, None, None)
        call.record = intercept.pieces
        if not call.outputs:
            raise RuntimeError(
                f"module '{rec.layer.path}' ({type(module).__name__}) used none of its trainable parameters where its "
                f"rule looks for them; is the forward running under torch.no_grad()?"
            )
        if self.check:
            self._count_local_uses(rec, args, kwargs, [t for t in leaves if isinstance(t, torch.Tensor)])
        rec.calls.append(call)
        self.calls_recorded += 1
        return None

    def _count_local_uses(self, rec: _Recording, args, kwargs, outputs):
        """The edges into the layer's own parameters inside this call (a fallback's forward may
        use others, which stay outside uses until a module holding them serves them)."""
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        stop = {t.grad_fn for t in inputs if t.grad_fn is not None}
        own = {id(p) for p in rec.layer.trainable().values()}
        for pid, count in parameter_uses.param_edges([t.grad_fn for t in outputs], stop).items():
            if pid in own:
                rec.local_uses[pid] = rec.local_uses.get(pid, 0) + count

    def _arrive(self, index: int, call: _Call, k: int, grad: torch.Tensor):
        rec = self.recordings[index]
        call.grads[k] = grad
        rec.arrived += 1
        if rec.arrived == rec.expected:
            self._complete(index)

    def _complete(self, index: int):
        rec = self.recordings[index]
        rule, module = rec.layer.rule, rec.layer.module
        records, grads = [], []
        for call in rec.calls:
            got = [
                g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                for g, (shape, dtype, device) in zip(call.grads, call.outputs)
            ]
            records.append(call.record)
            grads.append(rule.output_grad(module, got))
            call.record = call.grads = call.outputs = None  # nothing of the call outlives the layer's reduction
        rec.done = True
        try:
            self.on_layer(index, rule.combine(records, grads) if records else None)
        except UnsupportedModuleError as e:  # the other layers go on: every such module is named at once
            self.refused.append(str(e))

    def finish(self):
        """Layers whose outputs got no gradient (unused, or not called): zeros, or None."""
        for i, rec in enumerate(self.recordings):
            if not rec.done:
                self._complete(i)

    def params_used_outside(self, total: dict[int, int]) -> dict[int, tuple]:
        """{id(param): (name, a layer serving it)} of the trainable parameters with more autograd
        edges in the loss's graph (``total``) than inside the calls of the layers serving them."""
        local, owners = {}, {}
        for rec in self.recordings:
            for pid, count in rec.local_uses.items():
                local[pid] = local.get(pid, 0) + count
            for attr, p in rec.layer.trainable().items():
                owners.setdefault(id(p), (rec.layer.names[attr], rec.layer))
        return {pid: owner for pid, owner in owners.items() if total.get(pid, 0) > local.get(pid, 0)}


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
    training = [f"'{path}' ({type(m).__name__})" for path, m in batch_norms if m.training]
    if training:
        raise UnsupportedModuleError(
            f"modules {', '.join(training)} are in train mode: they normalise each sample with statistics of the "
            f"whole batch, which mixes samples, so per-sample gradients do not exist. Put them in eval mode "
            f"(model.eval() or m.eval()), or use a per-sample normalisation (GroupNorm, LayerNorm: "
            f"opacus.validators.ModuleValidator.fix(model) swaps BatchNorm for GroupNorm)"
        )
