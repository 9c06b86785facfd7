"""The layers a query can name: every submodule, with its output shape found by one probe pass."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from torch import nn

from diagql.model.hooks import evaluation, first_tensor


@dataclass(frozen=True)
class LayerInfo:
    """A queryable module: its qualified name, type, per-item output shape and calls per pass."""

    name: str
    type_name: str
    shape: tuple[int, ...] | None  # None: the module does not run in forward
    calls: int

    @property
    def neurons(self) -> int:
        return int(np.prod(self.shape)) if self.shape is not None else 0

    @property
    def channels(self) -> int | None:
        """Channel count for outputs of rank >= 2 (conv maps, sequences), else None."""
        return self.shape[0] if self.shape is not None and len(self.shape) >= 2 else None

    def shape_text(self) -> str:
        if self.shape is None:
            return "(never runs)"
        return "×".join(str(d) for d in self.shape) if self.shape else "scalar"


class LayerCatalog:
    """Layers in module-registration order, found by running one item through the model."""

    def __init__(self, layers: list[LayerInfo], output_shape: tuple[int, ...]):
        self.layers = layers
        self.by_name = {layer.name: layer for layer in layers}
        self.output_shape = output_shape

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def __getitem__(self, name: str) -> LayerInfo:
        return self.by_name[name]

    def running_names(self) -> list[str]:
        """Names of the layers that run in forward, in order (what messages list)."""
        return [layer.name for layer in self.layers if layer.shape is not None]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The disk cache's encoding (storage/store.py stores dicts of arrays, no pickle)."""
        layers = [[layer.name, layer.type_name, None if layer.shape is None else list(layer.shape),
                   layer.calls] for layer in self.layers]
        return {"layers": np.str_(json.dumps(layers)),
                "output_shape": np.array(self.output_shape, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "LayerCatalog":
        """Decode ``to_arrays``'s output, raising ValueError when it does not list layers."""
        layers = []
        for name, type_name, shape, calls in json.loads(str(arrays["layers"])):
            if not (isinstance(name, str) and isinstance(type_name, str) and isinstance(calls, int)
                    and (shape is None or all(isinstance(d, int) for d in shape))):
                raise ValueError("it does not list layers")
            layers.append(LayerInfo(name, type_name, None if shape is None else tuple(shape),
                                    calls))
        return cls(layers, tuple(int(d) for d in arrays["output_shape"]))


def probe(model: nn.Module, x, call) -> LayerCatalog:
    """Run a batch of one item with a hook on every submodule and record what each returns."""
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    types: dict[str, str] = {}
    handles = []

    def make_hook(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if name not in shapes:
                try:
                    shapes[name] = tuple(first_tensor(output, name).shape[1:])
                except Exception:  # noqa: BLE001 - a module returning no tensor is not queryable
                    shapes[name] = None
        return hook

    for name, module in model.named_modules():
        if name:
            types[name] = type(module).__name__
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with evaluation(model):
            out = first_tensor(call(model, x))
    finally:
        for handle in handles:
            handle.remove()
    layers = [LayerInfo(name, types[name], shapes.get(name), calls.get(name, 0)) for name in types]
    return LayerCatalog(layers, tuple(out.shape[1:]))


def default_latent(model: nn.Module) -> str | None:
    """The final linear layer, whose input is the latent vector the paper samples in."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def neuron_labels(layer: str, shape: tuple[int, ...], neurons: np.ndarray,
                  channels: bool = False) -> list[str]:
    """``fc1[5]``, ``conv2[3,1,4]`` (C-order coordinates) or ``conv2[3]`` for channels."""
    neurons = np.asarray(neurons, dtype=np.int64)
    if channels or len(shape) <= 1:
        return [f"{layer}[{i}]" for i in neurons.tolist()]
    coords = np.unravel_index(neurons, shape)
    return [f"{layer}[{','.join(map(str, c))}]" for c in zip(*(a.tolist() for a in coords))]

