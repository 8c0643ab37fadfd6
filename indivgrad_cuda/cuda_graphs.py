"""CUDA graphs for the engine: one replay instead of a few kernel launches per layer.

A deep MLP's per-sample backward is launch-bound on a GPU (about two kernels per layer plus
the dispatcher's overhead each), so the engine replays it as a CUDA graph. A graph reads and
writes fixed addresses, so its inputs must be static. We capture the forward too, into a
first graph: a static input x is copied in, and the tensors the forward saves for the
backward become that graph's static outputs, which the second (backward) graph reads where
they are. The other choice, copying each call's saved tensors into static buffers for a
backward-only graph, would copy every layer's input and pre-activation every call. Between
the two graphs the caller's loss runs eagerly on the forward graph's static output (it is
arbitrary user code, and may sync or branch), and its gradient is copied into a static
dL/d(output).

A graph is keyed by everything it depends on that a replay cannot see: input shape, dtype
and device; the parameters' addresses, strides and requires_grad flags; the output buffers'
addresses; the engine's own settings (layout, max_norm); the float matmul precision. Values
at those addresses may change freely between replays (an optimiser updating parameters in
place, new data copied into the static input).

The capture itself is a strategy (CudaGraphCapture here), so that the plumbing around it
(static inputs, keys, invalidation, where results land) can be exercised on a CPU with an
eager stand-in that re-runs the function and copies its results into the first run's
outputs, as a replay writes a graph's static outputs.
"""

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_leaves, tree_map


@dataclass
class Captured:
    replay: Callable[[], None]
    outputs: Any  # what the captured function returned; rewritten in place by replay()
    pool: Any  # the memory pool a later capture may share


class CudaGraphCapture:
    """Captures ``fn()`` into a ``torch.cuda.CUDAGraph``. ``warmup``: run fn once on a side
    stream first (lazy initialisation, cuBLAS handles and workspaces, must not happen during
    capture); False for a fn that cannot run twice (an autograd backward consumes its graph),
    whose ops have run eagerly before."""

    def __call__(self, fn: Callable[[], Any], pool=None, warmup: bool = True) -> Captured:
        if warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
        return Captured(graph.replay, outputs, graph.pool())


@dataclass
class _Entry:
    x: Any  # static input: a tensor, or a pytree of them
    forward: Captured  # outputs: (network output, saved tensors)
    grad: Any  # static dL/d(output), a tensor or a pytree of them
    backward: Captured


class GraphRunner:
    """Runs forward → dL/d(output) → backward of one whole batch through captured graphs,
    capturing on a new key. At most ``max_graphs`` graph pairs are kept (each keeps its
    batch's intermediate state allocated), least recently used dropped first. If a capture
    fails the runner warns once and turns itself off; the caller then runs eagerly."""

    def __init__(
        self, capture: Optional[Callable] = None, device_types: Sequence[str] = ("cuda",), max_graphs: int = 4
    ):
        self.capture = capture if capture is not None else CudaGraphCapture()
        self.device_types = tuple(device_types)
        self.max_graphs = max_graphs
        self.enabled = True
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def applies(self, x: torch.Tensor, like: torch.Tensor) -> bool:
        """Whether a batch x for a model whose parameters are like `like` can be graphed
        (anything else runs eagerly, where the passes report what is wrong)."""
        return (
            self.enabled
            and x.device.type in self.device_types
            and x.shape[0] > 0
            and x.dtype == like.dtype
            and x.device == like.device
        )

    def run(
        self,
        key: tuple,
        x,
        forward: Callable,
        grad_of_output: Callable,
        backward: Callable,
        warmup: bool = True,
    ):
        """forward(x) -> (output, saved); grad_of_output(output) -> dL/d(output), eager;
        backward(grad, saved) -> results (not None). x, and the gradient, may be a tensor or a
        pytree holding tensors (the key then holds each one's shape, dtype and device; the
        caller's key its other values). forward and
        backward may read only their arguments and tensors whose addresses are in `key`
        (``warmup``: see CudaGraphCapture). Returns backward's static results, rewritten by
        the next run; None if capture failed (run eagerly then)."""
        tensors = [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]
        shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        key = (shapes, _matmul_settings() if tensors[0].is_cuda else (), *key)
        with _on_device(tensors[0].device):
            entry = self._entries.get(key)
            if entry is None:
                return self._capture(key, x, forward, grad_of_output, backward, warmup)
            self._entries.move_to_end(key)
            _copy_leaves(entry.x, x)
            entry.forward.replay()
            _copy_leaves(entry.grad, grad_of_output(entry.forward.outputs[0]))
            entry.backward.replay()
            return entry.backward.outputs

    def _capture(self, key, x, forward, grad_of_output, backward, warmup):
        static_x = _static(x)
        try:
            fwd = self.capture(lambda: forward(static_x), warmup=warmup)
        except Exception as e:  # noqa: BLE001 - any failure to capture means: run eagerly
            return self._give_up(e)
        fwd.replay()
        output, saved = fwd.outputs
        grad = _static(grad_of_output(output))  # the loss's errors are the caller's
        try:  # replayed after fwd: may share its pool
            bwd = self.capture(lambda: backward(grad, saved), pool=fwd.pool, warmup=warmup)
        except Exception as e:  # noqa: BLE001
            return self._give_up(e)
        bwd.replay()
        while len(self._entries) >= self.max_graphs:
            self._entries.popitem(last=False)
        self._entries[key] = _Entry(static_x, fwd, grad, bwd)
        return bwd.outputs

    def _give_up(self, error: Exception):
        self.enabled = False
        self._entries.clear()
        warnings.warn(
            f"indivgrad_cuda: capturing a CUDA graph failed ({type(error).__name__}: {error}); this engine "
            f"runs without CUDA graphs from now on (PerSampleGrads(..., cuda_graphs=False) skips the attempt)",
            RuntimeWarning,
            stacklevel=6,
        )  # the caller of the engine
        return None


def _static(tree):
    """A contiguous copy of every tensor in a tensor or pytree (other values as they are)."""
    return tree_map(
        lambda t: t.clone(memory_format=torch.contiguous_format) if isinstance(t, torch.Tensor) else t, tree
    )


def _copy_leaves(dst, src) -> None:
    for d, v in zip(tree_leaves(dst), tree_leaves(src)):
        if isinstance(d, torch.Tensor):
            d.copy_(v)


def parameter_key(params: Sequence[Optional[torch.Tensor]]) -> tuple:
    """What a graph depends on of each parameter: a replaced Parameter or one whose
    requires_grad changed needs a new graph; in-place updates do not."""
    return tuple(None if p is None else (p.data_ptr(), p.stride(), p.requires_grad) for p in params)


def addresses(tensors: Sequence[Optional[torch.Tensor]]) -> tuple:
    return tuple(None if t is None else t.data_ptr() for t in tensors)


def _matmul_settings():
    """cuBLAS settings a captured GEMM keeps: changing them needs a new graph."""
    m = torch.backends.cuda.matmul
    return (
        torch.get_float32_matmul_precision(),
        m.allow_fp16_reduced_precision_reduction,
        m.allow_bf16_reduced_precision_reduction,
    )


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
