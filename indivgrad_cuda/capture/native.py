"""The native capture: an ``nn.Sequential`` MLP with 2-D inputs runs as one compiled
forward call that keeps each layer's input and pre-activation, dL/d(output) by autograd on
the output alone (any loss), and one compiled backward call that, per layer, fuses act'
with the per-sample outer products (or forms only norms / one GEMM for clipped sums). On
CUDA both calls can be replayed as CUDA graphs (see cuda_graphs.py)."""

import math
from typing import Optional

import torch

from indivgrad_cuda import randomness
from indivgrad_cuda.capture.layers import Layer
from indivgrad_cuda.capture.losses import grad_of_output
from indivgrad_cuda.capture.mlp_plan import build_plan
from indivgrad_cuda.chunking import chunk_size, chunks
from indivgrad_cuda.cuda_graphs import GraphRunner, addresses, parameter_key
from indivgrad_cuda.layers import Factors, rule_for


class NativeCapture:
    def __init__(self, model, cuda_graphs: bool, max_chunk: Optional[int]):
        self.plan = build_plan(model)  # raises UnsupportedModuleError where it does not apply
        self.graphs = GraphRunner() if cuda_graphs else None
        self.max_chunk = max_chunk

    def applies(self, inputs) -> bool:
        """A single Tensor input, 2-D (or more before the model's nn.Flatten), with autocast off
        for the model's device type; other shapes of a Sequential, and any call under autocast
        (whose forward the hooks capture runs as a normal autocast step does), go through the
        hooks capture (``capture="native"`` refuses them)."""
        return (
            isinstance(inputs, torch.Tensor)
            and (inputs.dim() == 2 or (self.plan.flattens_input and inputs.dim() > 2))
            and not torch.is_autocast_enabled(self.device().type)
        )

    def device(self):
        return self.plan.linears[0].weight.device

    def params(self, layout: str) -> dict[str, tuple]:
        """{name: (parameter, one sample's gradient shape in layout)} of the trainable parameters."""
        out = {}
        for m, w_name, b_name in zip(self.plan.linears, self.plan.weight_names, self.plan.bias_names):
            w, b = m._parameters["weight"], m._parameters["bias"]  # not nn.Module.__getattr__: this runs every call
            if w.requires_grad:
                out[w_name] = (w, w.shape if layout == "out_in" else w.shape[::-1])
            if b is not None and b.requires_grad:
                out[b_name] = (b, b.shape)
        return out

    def layers(self) -> list[Layer]:
        """The Linear layers with trainable parameters now, as the hooks capture names them."""
        plan, rule = self.plan, rule_for(self.plan.linears[0])
        out = []
        for m, w_name, b_name in zip(plan.linears, plan.weight_names, plan.bias_names):
            names = {"weight": w_name} if b_name is None else {"weight": w_name, "bias": b_name}
            layer = Layer(w_name.rpartition(".")[0], m, rule, names)
            if layer.wanted():
                out.append(layer)
        return out

    def check_input(self, x):
        plan = self.plan
        width = (
            math.prod(x.shape[1:]) if (plan.flattens_input and x.dim() >= 2) else (x.shape[1] if x.dim() == 2 else None)
        )
        if width != plan.in_features:
            expected = f"[N, {plan.in_features}]" + (" (after nn.Flatten)" if plan.flattens_input else "")
            raise ValueError(f"x: expected shape {expected} for the model's first Linear, got {list(x.shape)}")

    # ---------------------------------------------------------------- the three passes

    def grads(self, x, target, loss_fn, reduction, generator, layout, results: dict[str, torch.Tensor]):
        plan = self.plan
        program, weights = plan.program, plan.weights()
        want_w, want_b = self._wanted()
        out_w = [results.get(name) if want_w[i] else None for i, name in enumerate(plan.weight_names)]
        out_b = [results.get(name) if want_b[i] else None for i, name in enumerate(plan.bias_names)]
        n = x.shape[0]

        def chunk_grads(grad_out, saved, n0, n1):
            sl = (lambda t: t) if (n0, n1) == (0, n) else (lambda t: t if t is None else t[n0:n1])
            program.grads(grad_out, saved, weights, [sl(t) for t in out_w], [sl(t) for t in out_b], layout)

        def graphed_grads(
            grad_out, saved
        ):  # the result buffers are the graph's outputs: their addresses are in the key
            program.grads(grad_out, saved, weights, out_w, out_b, layout)
            return ()

        self._run(
            x,
            target,
            loss_fn,
            reduction,
            generator,
            chunk_grads,
            graphed_grads,
            ("grads", layout, addresses(out_w + out_b)),
        )

    def norms(self, x, target, loss_fn, reduction, generator, sq: torch.Tensor):
        """Fills sq [P, N] with the squared per-sample norms of the trainable parameters."""
        program, weights = self.plan.program, self.plan.weights()
        want_w, want_b = self._wanted()

        def chunk_norms(grad_out, saved, n0, n1):
            sq[:, n0:n1] = program.norms(grad_out, saved, weights, want_w, want_b)

        def graphed_norms(grad_out, saved):
            return program.norms(grad_out, saved, weights, want_w, want_b)

        graphed = self._run(x, target, loss_fn, reduction, generator, chunk_norms, graphed_norms, ("norms",))
        if graphed is not None:
            sq.copy_(graphed)

    def clipped_sum(
        self, x, target, loss_fn, reduction, generator, clipping, grads: dict[str, torch.Tensor], sq: torch.Tensor
    ):
        """The clipped sums into ``grads`` and the squared norms into sq [P, N]; the C++ pass asks
        ``clipping`` (reducers/clipping.py) for each parameter's coefficients from the norms."""
        plan = self.plan
        program, weights = plan.program, plan.weights()
        grads_w = [grads.get(name) for name in plan.weight_names]
        grads_b = [grads.get(name) if name is not None else None for name in plan.bias_names]
        coefficients = clipping.row_coefficients

        def chunk_clipped(grad_out, saved, n0, n1):
            sq[:, n0:n1] = program.clipped_sum(grad_out, saved, weights, grads_w, grads_b, coefficients, n0 > 0)

        def graphed_clipped(grad_out, saved):
            # into the graph's own buffers, copied to p.grad after each replay: p.grad is
            # often a new tensor every step (zero_grad(set_to_none=True))
            gw = [None if g is None else torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads_w]
            gb = [None if g is None else torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads_b]
            return program.clipped_sum(grad_out, saved, weights, gw, gb, coefficients, False), gw, gb

        graphed = self._run(
            x, target, loss_fn, reduction, generator, chunk_clipped, graphed_clipped, ("clipped_sum", clipping.key())
        )
        if graphed is not None:
            sq.copy_(graphed[0])
            for dst, src in zip(grads_w + grads_b, graphed[1] + graphed[2]):
                if dst is not None:
                    dst.copy_(src)

    def run(self, layers: list[Layer], x, target, loss_fn, reduction, generator, max_chunk, visit, end_chunk=None):
        """The hooks capture's contract (HooksCapture.run): ``visit(i, Factors, n0, n1)`` for each
        of ``layers`` (from :meth:`layers`) and chunk, with T = 1; chunks of this capture's size."""
        plan = self.plan
        program, weights = plan.program, plan.weights()
        want_w, want_b = self._wanted()
        index = {id(layer.module): i for i, layer in enumerate(layers)}

        def chunk_factors(grad_out, saved, n0, n1):
            xs, gs = program.factors(grad_out, saved, weights, want_w, want_b)
            for m, x_l, g_l in zip(plan.linears, xs, gs):
                if id(m) in index and x_l is not None:
                    visit(index[id(m)], Factors(x_l[:, None], g_l[:, None]), n0, n1)
            if end_chunk is not None:
                end_chunk(n0, n1)

        self._run(x, target, loss_fn, reduction, generator, chunk_factors)

    # ---------------------------------------------------------------- internals

    def _wanted(self):
        plan = self.plan
        want_w = [m.weight.requires_grad for m in plan.linears]
        want_b = [m.bias is not None and m.bias.requires_grad for m in plan.linears]
        return want_w, want_b

    def _training(self):
        states = {d.training for d in self.plan.dropouts}
        if len(states) > 1:
            raise ValueError("the model's Dropout layers are in mixed train/eval modes; put them all in one")
        return bool(states) and states.pop()

    def _run(self, x, target, loss_fn, reduction, generator, chunk_pass, graphed_pass=None, graph_key=()):
        """Forward → dL/d(output) → backward over the batch. Eagerly, chunk by chunk, calling
        chunk_pass(grad_out, saved, n0, n1): returns None. Or, given graphed_pass, through CUDA
        graphs where they apply, as graphed_pass(grad_out, saved) on the whole batch: returns
        its results."""
        plan = self.plan
        program, weights, biases = plan.program, plan.weights(), plan.biases()
        n = x.shape[0]
        masks = randomness.dropout_masks(plan, n, x.dtype, x.device, self._training(), generator)
        size = self._chunk_size(x)

        def grad_of(output, tc):  # the caller's loss (the native capture runs only with autocast off: applies())
            return grad_of_output(output, tc, loss_fn, reduction)

        graphs = self.graphs
        if (
            graphs is not None
            and graphed_pass is not None
            and size >= n
            and not any(m is not None for m in masks)
            and graphs.applies(x, weights[0])
        ):

            def forward(xs):
                return program.forward(xs, weights, biases, masks)

            key = (*graph_key, parameter_key(weights), parameter_key(biases))
            results = graphs.run(key, x, forward, lambda output: grad_of(output, target), graphed_pass)
            if results is not None:
                return results
        for n0, n1, xc, tc in chunks(x, target, size):
            output, saved = program.forward(xc, weights, biases, [m if m is None else m[n0:n1] for m in masks])
            chunk_pass(grad_of(output, tc), saved, n0, n1)
        return None

    def _chunk_size(self, x):
        widths = sum(m.in_features + 3 * m.out_features for m in self.plan.linears)
        return chunk_size(x.shape[0], widths * x.element_size(), x.device, self.max_chunk)
