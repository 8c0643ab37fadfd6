"""What the attribution estimators share: their engine, and loading checkpoints in turn."""

import os
from typing import Union

import torch

from indivgrad_cuda.engine import ENGINE_OPTIONS, PerSampleGrads

Checkpoint = Union[dict, str, os.PathLike]


def engine_for(model, options) -> PerSampleGrads:
    """An engine for the attribution estimators (no CUDA graphs: each set is run once)."""
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; engine options are {list(ENGINE_OPTIONS)}")
    return PerSampleGrads(model, cuda_graphs=False, **options)


def each_checkpoint(model, checkpoints, learning_rates, name: str = "checkpoints"):
    """Loads each checkpoint into model and yields its learning rate; restores the model.
    ``name``: the argument errors name (``checkpoints[i]``, or ``name`` itself when it is
    not "checkpoints": one checkpoint)."""
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("checkpoints: expected at least one state dict or path, got none")
    if isinstance(learning_rates, (int, float)):
        learning_rates = [float(learning_rates)] * len(checkpoints)
    learning_rates = list(learning_rates)
    if len(learning_rates) != len(checkpoints):
        raise ValueError(
            f"learning_rates: expected one per checkpoint ({len(checkpoints)}) or a single number, "
            f"got {len(learning_rates)}"
        )
    device = next(model.parameters()).device
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        for i, (ckpt, lr) in enumerate(zip(checkpoints, learning_rates)):
            where = f"{name}[{i}]" if name == "checkpoints" else name
            if isinstance(ckpt, (str, os.PathLike)):
                ckpt = torch.load(ckpt, map_location=device, weights_only=True)
            if not isinstance(ckpt, dict):
                raise TypeError(f"{where}: expected a state dict or a path, got {type(ckpt).__name__}")
            try:
                model.load_state_dict(ckpt)
            except RuntimeError as e:
                raise ValueError(f"{where}: does not fit the model: {e}") from e
            yield float(lr)
    finally:
        model.load_state_dict(own)
