"""How the reducers of the hooks capture see each layer: its own trainable parameters at
once, and each tied parameter (shared by several layers) once all its uses have arrived."""

from collections import defaultdict
from typing import Optional

from indivgrad_cuda.capture.layers import Layer, tied_names
from indivgrad_cuda.layers import Factors
from indivgrad_cuda.layers.ties import Use, merge


class LayerVisits:
    """``visit(i, f, n)`` -> (the layer's attrs that are its own, [(name, merged uses)] of the
    tied parameters whose last use this was). Every layer is visited once per chunk."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.tied = tied_names(layers)
        self._uses = defaultdict(list)
        self._seen = defaultdict(int)
        # the layers none of whose attrs are tied: their own attrs, visited without a lookup
        self._untied = [
            None if any(layer.names[a] in self.tied for a in layer.trainable()) else list(layer.trainable())
            for layer in layers
        ]

    def visit(self, i: int, f: Optional[Factors], n: int) -> tuple[list[str], list[tuple[str, list[Use]]]]:
        untied = self._untied[i]
        if untied is not None:
            return untied, []
        layer = self.layers[i]
        own, done = [], []
        for attr in layer.trainable():
            name = layer.names[attr]
            if name not in self.tied:
                own.append(attr)
                continue
            if f is not None:
                self._uses[name].append(Use(layer.rule, layer.module, attr, f, n))
            self._seen[name] += 1
            if self._seen[name] == self.tied[name]:
                done.append((name, merge(self._uses.pop(name, []))))
                del self._seen[name]
        return own, done
