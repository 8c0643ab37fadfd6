"""Mixed precision: what runs under the caller's ``torch.autocast`` and what does not.

The hooks capture runs the model's forward (and ``loss_fn``) in the caller's context, autocast
included, so each op computes in the dtype a normal autocast step gives it. The layer rules
keep each layer's factors in the dtype its op computed in
(:func:`indivgrad_cuda.layers.base.computed_input`). The backward and the reductions of the
factors (which run during it and after it) run with autocast off (:func:`autocast_off`), as a
normal step's backward runs outside autocast: else autocast would round the reductions' GEMMs,
and those inside the ops, to half precision. The fallback replays a module's forward under the
autocast its call ran in (:func:`autocast_state`, :func:`replay`). The native capture runs only
with autocast off (:meth:`indivgrad_cuda.capture.native.NativeCapture.applies`).
"""

import contextlib

import torch

DEVICE_TYPES = ("cpu", "cuda")  # the device types whose autocast the engine looks at

# ((device type, autocast dtype), ...) of the device types with autocast enabled
AutocastState = tuple


def autocast_state() -> AutocastState:
    """The autocast in effect now, per device type (empty when none is on)."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in DEVICE_TYPES if torch.is_autocast_enabled(d))


def replay(state: AutocastState) -> contextlib.ExitStack:
    """A context in which exactly ``state``'s autocast is on (what a recorded call ran under)."""
    stack = contextlib.ExitStack()
    for d in DEVICE_TYPES:
        dtype = dict(state).get(d)
        if dtype is not None:
            stack.enter_context(torch.autocast(d, dtype=dtype))
        elif torch.is_autocast_enabled(d):
            stack.enter_context(torch.autocast(d, enabled=False))
    return stack


def autocast_off() -> contextlib.AbstractContextManager:
    """Autocast off on every device type (the engine's backward and its own arithmetic); a
    no-op context when none is on (entering one costs)."""
    if any(torch.is_autocast_enabled(d) for d in DEVICE_TYPES):
        return replay(())
    return contextlib.nullcontext()
