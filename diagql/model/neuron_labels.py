"""Neurons' names: ``fc1[5]``, ``conv2[3,1,4]`` (C-order coordinates in the layer's shape), or
``conv2[3]`` for a view of flat units (channels, a sequence's hidden units)."""
from __future__ import annotations

import functools

import numpy as np


def neuron_labels(layer: str, shape: tuple[int, ...], neurons, flat: bool = False) -> list[str]:
    """The names of ``neurons`` (flat indices) of ``layer``. Every neuron in order (an AVG's
    answer) is named once per layer and shape: 4,704 names had been a fifth of a hot conv1
    AVG's 15 ms."""
    neurons = np.asarray(neurons, dtype=np.int64)
    width = int(np.prod(shape)) if len(shape) else 1
    if len(neurons) == width and 1 < width <= KEPT_WIDTH and neurons[0] == 0 and \
            neurons[-1] == width - 1 and bool((np.diff(neurons) == 1).all()):
        return list(_every(layer, tuple(shape), flat or len(shape) <= 1))
    return _named(layer, shape, neurons, flat)


# Layers up to this wide keep their names (about 90 bytes a neuron, 16 layers at most): a
# ResNet's wide maps' had held 233 MB after their answers were gone (sweep SX5).
KEPT_WIDTH = 65_536


@functools.lru_cache(maxsize=16)
def _every(layer: str, shape: tuple[int, ...], flat: bool) -> tuple[str, ...]:
    return tuple(_named(layer, shape, np.arange(int(np.prod(shape)), dtype=np.int64), flat))


def _named(layer: str, shape: tuple[int, ...], neurons: np.ndarray, flat: bool) -> list[str]:
    if flat or len(shape) <= 1:
        return [f"{layer}[{i}]" for i in neurons.tolist()]
    coords = np.unravel_index(neurons, shape)
    return [f"{layer}[{','.join(map(str, c))}]" for c in zip(*(a.tolist() for a in coords))]
