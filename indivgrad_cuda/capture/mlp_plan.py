"""The native capture's plan: validate an nn.Sequential MLP once and describe it to the
compiled MLP program (csrc/mlp.cpp)."""

from dataclasses import dataclass
from typing import Optional

from torch import nn

from indivgrad_cuda import _C
from indivgrad_cuda.capture.layers import UnsupportedModuleError

SUPPORTED = (
    "nn.Sequential (nested ones are flattened), nn.Linear, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, "
    "nn.GELU, nn.SiLU, nn.Softplus, nn.Identity, nn.Flatten (start_dim=1, end_dim=-1), nn.Dropout"
)


def _unsupported(path, module, why=""):
    why = f" ({why})" if why else ""
    return UnsupportedModuleError(
        f"module '{path}' of type {type(module).__name__} is not supported{why}. Supported: {SUPPORTED}"
    )


def _activation(module):
    """(name, act_outer keyword arguments) for an elementwise activation module, or None."""
    if type(module) is nn.ReLU:
        return "relu", {}
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", {"negative_slope": module.negative_slope}
    if type(module) is nn.ELU:
        return "elu", {"alpha": module.alpha}
    if type(module) is nn.Tanh:
        return "tanh", {}
    if type(module) is nn.Sigmoid:
        return "sigmoid", {}
    if type(module) is nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), {}
    if type(module) is nn.SiLU:
        return "silu", {}
    if type(module) is nn.Softplus:
        return "softplus", {"beta": module.beta, "threshold": module.threshold}
    return None


def _leaves(module, path):
    if type(module) is nn.Sequential:
        for name, child in module._modules.items():  # named_children() would hide a repeated module
            yield from _leaves(child, f"{path}.{name}" if path else name)
    else:
        yield path, module


@dataclass
class Plan:
    program: "_C.MlpProgram"
    linears: list[nn.Linear]  # in order
    weight_names: list[str]
    bias_names: list[Optional[str]]  # None where the layer has no bias
    dropouts: list[nn.Dropout]
    dropout_ps: list[float]  # each Dropout's p, read once like every module setting
    dropout_widths: list[int]  # features per sample at each Dropout (its mask is [N, width])
    in_features: int
    flattens_input: bool  # an nn.Flatten comes before the first Linear

    def weights(self):
        return [m.weight for m in self.linears]

    def biases(self):
        return [m.bias for m in self.linears]


def build_plan(model: nn.Module) -> Plan:
    if type(model) is not nn.Sequential:
        raise _unsupported("(the model)", model, "the engine takes an nn.Sequential")
    names = {id(p): n for n, p in model.named_parameters()}
    program = _C.MlpProgram()
    linears, dropouts, dropout_widths, seen = [], [], [], set()
    flattens_input = False
    for path, m in _leaves(model, ""):
        if id(m) in seen and type(m) is nn.Linear:
            raise _unsupported(path, m, "the same module object appears twice; its per-sample gradient would be a sum")
        seen.add(id(m))
        act = _activation(m)
        if type(m) is nn.Linear:
            program.add_linear()
            linears.append(m)
        elif act is not None:
            name, kw = act
            params = dict(negative_slope=0.01, alpha=1.0, beta=1.0, threshold=20.0)
            params.update(kw)
            program.add_activation(name, params["negative_slope"], params["alpha"], params["beta"], params["threshold"])
        elif type(m) is nn.Identity:
            pass
        elif type(m) is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                raise _unsupported(path, m, f"start_dim={m.start_dim}, end_dim={m.end_dim}; only 1 and -1")
            program.add_flatten()
            flattens_input = flattens_input or not linears
        elif type(m) is nn.Dropout:
            if not 0 <= m.p <= 1:
                raise _unsupported(path, m, f"p={m.p}; expected 0 <= p <= 1")
            program.add_dropout()
            dropouts.append(m)
            dropout_widths.append(linears[-1].out_features if linears else None)  # None: the input's width
        else:
            raise _unsupported(path, m)
    if not linears:
        raise UnsupportedModuleError(
            "the model has no nn.Linear layer, so there are no per-sample gradients to compute"
        )
    return Plan(
        program=program,
        linears=linears,
        weight_names=[names[id(m.weight)] for m in linears],
        bias_names=[names[id(m.bias)] if m.bias is not None else None for m in linears],
        dropouts=dropouts,
        dropout_ps=[float(m.p) for m in dropouts],
        dropout_widths=[linears[0].in_features if w is None else w for w in dropout_widths],
        in_features=linears[0].in_features,
        flattens_input=flattens_input,
    )
