"""Both captures run the model's forward and backward in the parameters' dtype."""

import contextlib

import torch


def no_autocast(device_type: str):
    """Autocast would hand the passes lower-precision GEMMs; ``loss_fn`` still runs in the
    caller's context. Entering the context costs, so only when needed."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
