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
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_structure, tree_unflatten

from indivgrad_cuda import randomness
from indivgrad_cuda.capture import parameter_uses
from indivgrad_cuda.capture.layers import Layer, ModelScan, tied_names
from indivgrad_cuda.capture.losses import grads_of_leaves, loss_grad_seed
from indivgrad_cuda.capture.precision import autocast_off, autocast_state
from indivgrad_cuda.chunking import batch_size, split_batch
from indivgrad_cuda.compiled import compiled_in_place, stance
from indivgrad_cuda.cuda_graphs import GraphRunner
from indivgrad_cuda.errors import UnsupportedModuleError
from indivgrad_cuda.layers import Factors, FallbackRule

# visit(layer index, its Factors or None when it had no gradient, n0, n1)
Visit = Callable[[int, Optional[Factors], int, int], None]


class HooksCapture:
    def __init__(self, model: nn.Module, fallback: bool = True, cuda_graphs: bool = False):
        self.model = model
        self.fallback = fallback
        self.graphs = GraphRunner() if cuda_graphs else None
        self.compiled = compiled_in_place(model)  # modules compiled in place run eagerly in the engine's forward
        self.scan = ModelScan(model, fallback)
        self.scan.check()  # every trainable parameter belongs to a supported layer
        self._checked = set()  # input signatures whose parameter uses were checked
        self._recorder_of = None  # (layers, their _Recorder)
        self._graph_outputs = OrderedDict()  # graph key -> the output's structure (see _graphed)
        self._params_of = None  # (layers, {layout: params(layers, layout)})

    def layers(self) -> list[Layer]:
        """The supported layers with trainable parameters now (requires_grad is read each call)."""
        self.scan.check()
        return self.scan.wanted_layers()

    def params(self, layers: list[Layer], layout: str) -> dict[str, tuple]:
        """{name: (parameter, one sample's gradient shape in layout)} of the trainable parameters
        (a parameter several layers share takes its own shape whatever the layout); worked out
        once per list of layers and layout."""
        if self._params_of is None or self._params_of[0] is not layers:
            self._params_of = (layers, {})
        known = self._params_of[1]
        if layout not in known:
            tied = tied_names(layers)
            out = {}
            for layer in layers:
                for attr, p in layer.trainable().items():
                    name = layer.names[attr]
                    if name not in out:
                        shape = tuple(p.shape) if name in tied else layer.rule.grad_shape(layer.module, attr, layout)
                        out[name] = (p, shape)
            known[layout] = dict(sorted(out.items(), key=lambda item: self.scan.order[item[0]]))  # named_parameters()
        return known[layout]

    def graphable(self, layers: list[Layer], inputs, max_chunk: Optional[int]) -> bool:
        """Whether a call may replay CUDA graphs (``run``'s ``graph_key``): graphs on, the
        batch on a device they serve and in one chunk, no Dropout in train mode (its masks are
        drawn per call), its parameter uses checked by an earlier call with its signature, the
        inputs' other values hashable (they join the key)."""
        graphs = self.graphs
        if graphs is None or not graphs.enabled:
            return False
        leaves = tree_leaves(inputs)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors or any(t.device.type not in graphs.device_types or t.dim() == 0 for t in tensors):
            return False
        n = tensors[0].shape[0]
        if n == 0 or (max_chunk is not None and max_chunk < n) or any(m.training for _, m in self.scan.dropouts):
            return False
        try:
            hash(tuple(v for v in leaves if not isinstance(v, torch.Tensor)))
        except TypeError:
            return False
        return _signature(inputs, self.model, layers) in self._checked

    def _graph_key(self, inputs, signature, graph_key: tuple) -> tuple:
        """What a replay cannot see: the caller's key (its buffers' addresses, its settings),
        the input signature and structure, the inputs' other values, the addresses of every
        parameter and buffer of the model (in-place updates need no new capture), the autocast
        in effect."""
        model = self.model
        others = tuple(v for v in tree_leaves(inputs) if not isinstance(v, torch.Tensor))
        state = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
        return (*graph_key, signature, str(tree_structure(inputs)), others, state, autocast_state())

    def _graphed(self, layers, inputs, target, loss_fn, reduction, visit, end_chunk, key, n) -> bool:
        """The call through two CUDA graphs, the forward (the taps included) and the backward
        (the taps' reductions and ``end_chunk`` included), captured on the first call with a
        new key and replayed after, the caller's loss run eagerly between them on the
        forward's static output (as the native capture's graphs, cuda_graphs.py). False: the
        capture failed (the runner has warned), run eagerly."""
        rec = self._recorder(layers)
        # the forward's output structure, kept with the graphs of its key (a replay runs no Python),
        # and the output leaves of the forward just run, with their autograd graph, for the backward
        latest = self._graph_outputs.pop(key, {})
        self._graph_outputs[key] = latest  # the most recent last; as many as the runner keeps graphs
        while len(self._graph_outputs) > self.graphs.max_graphs:
            self._graph_outputs.popitem(last=False)

        def forward(static_inputs):
            rec.start(False, n, lambda i, f: visit(i, f, 0, n))
            with rec, torch.enable_grad(), stance(self.compiled):
                leaves, spec = tree_flatten(call_model(self.model, static_inputs))
            wanted = [isinstance(t, torch.Tensor) and t.requires_grad for t in leaves]
            template = [_TENSOR if isinstance(t, torch.Tensor) else t for t in leaves]
            latest.update(leaves=leaves, spec=spec, wanted=wanted, template=template)
            return [t.detach() for t in leaves if isinstance(t, torch.Tensor)], None

        def grads(outputs):  # the static output's tensors in the last forward's structure
            static = iter(outputs)
            leaves = [next(static) if t is _TENSOR else t for t in latest["template"]]
            got = grads_of_leaves(leaves, latest["spec"], target, loss_fn, reduction, n, latest["wanted"])
            return [g for g in got if g is not None]

        def backward(static_grads, _):
            roots = [t for t, w in zip(latest.pop("leaves"), latest["wanted"]) if w]  # as grads()
            _backward(rec, roots, static_grads, end_chunk, 0, n)
            return ()  # the results are in the caller's buffers

        return self.graphs.run(key, inputs, forward, grads, backward, warmup=False) is not None

    def _recorder(self, layers: list[Layer]) -> "_Recorder":
        """The recorder of this list of layers (layers() returns the same list while the trainable
        parameters stay the same): its forwards are built once."""
        if self._recorder_of is None or self._recorder_of[0] is not layers:
            self._recorder_of = (layers, _Recorder(layers, self.device()))
        return self._recorder_of[1]

    def unchecked(self) -> bool:
        """No call has passed the check of parameter uses yet."""
        return not self._checked

    def device(self) -> torch.device:
        for layer in self.scan.layers:
            for p in layer.module._parameters.values():  # a module's own first: parameters() costs a walk
                if p is not None:
                    return p.device
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
        graph_key: Optional[tuple] = None,
        empty_forward: bool = False,
    ) -> None:
        """Forward, loss and backward chunk by chunk: ``visit`` gets each layer's factors for
        samples n0..n1 during the backward (in the order they complete), ``end_chunk(n0, n1)``
        is called after the chunk's backward. ``graph_key``: the caller's results land in
        buffers whose addresses, and settings, it holds, so the call may replay CUDA graphs
        (:meth:`_graphed`); None: eagerly. ``empty_forward``: an empty batch still runs its
        forward and backward (0 rows; every layer visited with no factors), as a sharded
        model's collectives need every process to (FSDP's all-gathers)."""
        _check_no_batch_statistics(self.scan.batch_norms)
        n = batch_size(inputs)
        size = max(1, n if max_chunk is None else min(n, max_chunk))  # see PerSampleGrads's max_chunk
        masks = randomness.DropoutMasks(self.scan.dropouts, n, generator)
        signature = _signature(inputs, self.model, layers)
        if graph_key is not None:  # the caller has asked graphable()
            key = self._graph_key(inputs, signature, graph_key)
            if self._graphed(layers, inputs, target, loss_fn, reduction, visit, end_chunk, key, n):
                return
        rec = self._recorder(layers)
        chunks = split_batch(inputs, target, n, size) if n or not empty_forward else [(0, 0, inputs, target)]
        for n0, n1, chunk, tc in chunks:
            check = signature not in self._checked
            rec.start(check, n1 - n0, lambda i, f, n0=n0, n1=n1: visit(i, f, n0, n1))
            modules = parameter_uses.ModuleUses(self.model, layers) if check else contextlib.nullcontext()
            # the caller's autocast, as in a step
            with masks.rows(n0, n1), rec, modules, torch.enable_grad(), stance(self.compiled):
                output = call_model(self.model, chunk)
            seed = loss_grad_seed(output, tc, loss_fn, reduction, n1 - n0)
            if check:
                parameter_uses.check(self.scan, rec, modules, seed.loss, self.fallback)
                self._checked.add(signature)
            roots = [seed.loss] if seed.loss.requires_grad else []  # else no layer's output reaches the loss
            _backward(rec, roots, [seed.grad], end_chunk, n0, n1)


def _backward(rec: "_Recorder", roots: list, grads: list, end_chunk, n0: int, n1: int) -> None:
    """The taps' backward from ``roots``, then the layers no gradient reached, then
    ``end_chunk(n0, n1)``: with autocast off, as a normal step's backward runs outside
    autocast (the layers' reductions run in it)."""
    with autocast_off():
        if rec.calls_recorded and roots:
            torch.autograd.backward(roots, grad_tensors=grads, inputs=[rec.probe])
        rec.finish()
        if rec.refused:
            raise UnsupportedModuleError("\n".join(rec.refused))
        if end_chunk is not None:
            end_chunk(n0, n1)


def call_model(model, inputs):
    """model(inputs), model(*inputs) or model(**inputs), as the batch is given."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


_TENSOR = object()  # where a tensor was, in a template of an output's leaves


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


class _Call:
    """One call of a layer: what the rule keeps of its input, the (shape, dtype, device) of
    each tapped output (for a zero gradient where none arrives; not the outputs themselves,
    which a normal step frees once the next op has run), and the gradient at each tapped
    output once the backward has reached it (else None)."""

    __slots__ = ("grads", "outputs", "record")

    def __init__(self, record, outputs, grads):
        self.record, self.outputs, self.grads = record, outputs, grads


class _Recording:
    """One layer's calls in one chunk."""

    def __init__(self, layer: Layer):
        self.layer = layer
        self.bound = None  # the module's own forward while the recorder's is installed
        self.saved = None  # the module's instance attribute 'forward' before (None: it had none)
        self.reset()

    def reset(self):
        self.calls: list[_Call] = []
        self.expected = 0  # tapped outputs over all calls
        self.arrived = 0
        self.done = False
        self.local_uses: dict[int, int] = {}  # id(param) -> autograd edges inside the calls


class _Recorder:
    """While active, each layer's module runs through a forward of the recorder's (an instance
    attribute ``forward``, set on entry and removed on exit: nothing stays on the model to tax
    the user's own forwards, and the module's own hooks run around it as they would); hands
    each layer's factors to ``on_layer`` once the gradients of all its calls' tapped outputs
    have arrived (or, for those that never do, in finish()). Built once per list of layers and
    reused by every chunk and call with it (:meth:`start`)."""

    def __init__(self, layers: list[Layer], device: torch.device):
        self.layers = layers
        self.device = device
        self.recordings = [_Recording(layer) for layer in layers]
        self.forwards = [self._forward(i, rec) for i, rec in enumerate(self.recordings)]
        self.start(False, 0, None)

    def start(self, check: bool, n: int, on_layer: Optional[Callable]) -> "_Recorder":
        """A new chunk of n samples (``check``: the first with its input signature)."""
        self.check, self.n, self.on_layer = check, n, on_layer
        self.probe = torch.empty(0, device=self.device, requires_grad=True)  # every tap feeds it: the backward's target
        self.calls_recorded = 0
        self.inside = []  # the intercepts of the inner rules' calls in progress
        self.refused = []  # what the layers' reductions refused (a fallback that cannot run, ...)
        self.aliases = {}  # on a checked chunk: id(a Parameter swapped in for a call, by FSDP) -> id(the served one)
        for rec in self.recordings:
            rec.reset()
        return self

    def __enter__(self):
        for rec, forward in zip(self.recordings, self.forwards):
            attrs = rec.layer.module.__dict__
            rec.saved = attrs.get("forward")
            rec.bound = rec.layer.module.forward
            attrs["forward"] = forward
        return self

    def __exit__(self, *exc):
        for rec in self.recordings:
            attrs = rec.layer.module.__dict__
            if rec.saved is None:
                attrs.pop("forward", None)
            else:
                attrs["forward"] = rec.saved
            rec.bound = rec.saved = None
        while self.inside:  # a forward that raised inside an inner rule's call
            self.inside.pop()[1].__exit__(None, None, None)

    def _forward(self, index: int, rec: _Recording):
        """The forward the module runs while the recorder is active: its own, then the taps."""
        rule = rec.layer.rule
        if rule.inner:

            def inner_forward(*args, **kwargs):
                self._begin_inner(index, rec)
                output = rec.bound(*args, **kwargs)
                return self._end_inner(rec, args, kwargs, output)

            return inner_forward
        if isinstance(rule, FallbackRule):  # the fallback takes its inputs as they come

            def fallback_forward(*args, **kwargs):
                return self._after(index, rec, args, kwargs, rec.bound(*args, **kwargs))

            return fallback_forward

        def layer_forward(*args, **kwargs):
            if args and isinstance(args[0], torch.Tensor):
                args = self._expand_shared(args)
            return self._after(index, rec, args, kwargs, rec.bound(*args, **kwargs))

        return layer_forward

    def _begin_inner(self, index: int, rec: _Recording):
        """An inner rule's call: its intercept taps what it needs until the call returns."""
        call = _Call(None, [], [])

        def tap(t):
            k = len(call.grads)
            call.outputs.append((t.shape, t.dtype, t.device))
            call.grads.append(None)
            rec.expected += 1
            return _Tap.apply(t, self.probe, lambda g: self._arrive(index, call, k, g))

        intercept = rec.layer.rule.intercept(rec.layer.module, self.n, tap)
        intercept.__enter__()
        self.inside.append((call, intercept))

    def _expand_shared(self, args):
        """An input of one row while the batch has N (positions [1, T] shared by every sample,
        as Hugging Face models pass them) is expanded to N rows, so that each sample's share of
        the layer's gradient is its own (the output then has N rows too; none for an empty batch)."""
        x = args[0]
        if x.dim() >= 2 and x.shape[0] == 1 and self.n != 1:
            return (x.expand(self.n, *x.shape[1:]), *args[1:])
        return args

    def _after(self, index: int, rec: _Recording, args, kwargs, output):
        """Records one call of a layer and returns its output with the taps in place."""
        layer = rec.layer
        module, rule = layer.module, layer.rule
        single = isinstance(output, torch.Tensor)  # the usual case: no pytree to walk
        leaves, spec = ([output], None) if single else tree_flatten(output)
        taps = rule.taps(output)
        if not taps or not all(isinstance(leaves[i], torch.Tensor) and leaves[i].requires_grad for i in taps):
            raise RuntimeError(
                f"module '{layer.path}' ({type(module).__name__}) returned no tensor that requires grad; is the "
                f"forward running under torch.no_grad()?"
            )
        if not isinstance(rule, FallbackRule):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            why = None if x is None else rule.bad_input(module, x)
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
        record = rule.record(module, args, kwargs, output, self.n, self.check) if self.n else None  # 0 rows: nothing
        call = _Call(record, [], [None] * len(taps))
        for k, i in enumerate(taps):
            t = leaves[i]
            call.outputs.append((t.shape, t.dtype, t.device))
            leaves[i] = _Tap.apply(t, self.probe, lambda g, k=k: self._arrive(index, call, k, g))
        rec.calls.append(call)
        rec.expected += len(taps)
        self.calls_recorded += 1
        return leaves[0] if single else tree_unflatten(leaves, spec)

    def _end_inner(self, rec: _Recording, args, kwargs, output):
        call, intercept = self.inside.pop()
        intercept.__exit__(None, None, None)
        call.record = intercept.pieces
        module = rec.layer.module
        if not call.outputs:
            raise RuntimeError(
                f"module '{rec.layer.path}' ({type(module).__name__}) used none of its trainable parameters where its "
                f"rule looks for them; is the forward running under torch.no_grad()?"
            )
        if self.check:
            leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
            self._count_local_uses(rec, args, kwargs, leaves)
        rec.calls.append(call)
        self.calls_recorded += 1
        return output

    def _count_local_uses(self, rec: _Recording, args, kwargs, outputs):
        """The edges into the layer's own parameters inside this call (a fallback's forward may
        use others, which stay outside uses until a module holding them serves them)."""
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        stop = {t.grad_fn for t in inputs if t.grad_fn is not None}
        own = {}  # id of the parameter the call used -> id of the one the engine serves
        module = rec.layer.module
        for attr, p in rec.layer.trainable().items():
            live = module._parameters.get(attr) if "." not in attr else module.get_parameter(attr)
            own[id(p)] = id(p)
            if live is not None and live is not p:  # FSDP's unsharded Parameter, registered for the call
                own[id(live)] = self.aliases[id(live)] = id(p)
        for pid, count in parameter_uses.param_edges([t.grad_fn for t in outputs], stop).items():
            if pid in own:
                rec.local_uses[own[pid]] = rec.local_uses.get(own[pid], 0) + count

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
            got = call.grads
            if any(g is None for g in got):  # not `None in got`: that compares tensors with None (slow)
                got = [
                    g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                    for g, (shape, dtype, device) in zip(got, call.outputs)
                ]
            if self.n:  # an empty chunk's layers have no factors (nothing to reduce)
                records.append(call.record)
                grads.append(rule.output_grad(module, got))
            call.record = call.grads = call.outputs = None  # nothing of the call outlives the layer's reduction
        rec.calls = []
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

    def served_edges(self, edges: dict[int, int]) -> dict[int, int]:
        """``edges`` (id(param) -> autograd edges) with the edges into a Parameter a call swapped
        in for a served one (FSDP's unsharded Parameter) counted as the served one's."""
        if not self.aliases:
            return edges
        out = {}
        for pid, count in edges.items():
            pid = self.aliases.get(pid, pid)
            out[pid] = out.get(pid, 0) + count
        return out

    def params_used_outside(self, total: dict[int, int]) -> dict[int, tuple]:
        """{id(param): (name, a layer serving it)} of the trainable parameters with more autograd
        edges in the loss's graph (``total``, from served_edges) than inside the calls of the
        layers serving them."""
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
