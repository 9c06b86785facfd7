"""Mergeable aggregate states, reduced batch by batch: update(values), merge(other), finalize().

``values`` is a float64 tensor (items × neurons). Sums are float64 so that a streamed mean
agrees with a mean over the materialised activations to far better than 1e-5.
"""
from __future__ import annotations

import numpy as np
import torch


class MeanState:
    """Per-neuron mean: (sum, sum of squares, count); the squares give the standard error."""

    def __init__(self, n_neurons: int):
        self.sum = torch.zeros(n_neurons, dtype=torch.float64)
        self.sumsq = torch.zeros(n_neurons, dtype=torch.float64)
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        self.sum += values.sum(dim=0).cpu()
        self.sumsq += values.square().sum(dim=0).cpu()
        self.count += values.shape[0]

    def merge(self, other: "MeanState") -> "MeanState":
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.count += other.count
        return self

    def finalize(self) -> np.ndarray:
        return (self.sum / max(self.count, 1)).numpy()


class MaxState:
    """Per-neuron running maximum."""

    def __init__(self, n_neurons: int):
        self.max = torch.full((n_neurons,), -torch.inf, dtype=torch.float64)
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        if values.shape[0]:
            self.max = torch.maximum(self.max, values.max(dim=0).values.cpu())
        self.count += values.shape[0]

    def merge(self, other: "MaxState") -> "MaxState":
        self.max = torch.maximum(self.max, other.max)
        self.count += other.count
        return self

    def finalize(self) -> np.ndarray:
        return self.max.numpy().copy()


class ArgmaxState:
    """How often each neuron is an item's maximally activated one (ties: the lowest index)."""

    def __init__(self, n_neurons: int):
        self.counts = torch.zeros(n_neurons, dtype=torch.int64)
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        if values.shape[0]:
            winners = values.argmax(dim=1).cpu()
            self.counts += torch.bincount(winners, minlength=self.counts.shape[0])
        self.count += values.shape[0]

    def merge(self, other: "ArgmaxState") -> "ArgmaxState":
        self.counts += other.counts
        self.count += other.count
        return self

    def finalize(self) -> np.ndarray:
        """The distribution: the fraction of items whose maximal neuron each neuron is."""
        return (self.counts.to(torch.float64) / max(self.count, 1)).numpy()


STATES = {"avg": MeanState, "argmax": ArgmaxState, ("topk", "mean"): MeanState,
          ("topk", "max"): MaxState}


def state_for(aggregate: str, order: str, n_neurons: int):
    key = aggregate if aggregate != "topk" else (aggregate, order)
    return STATES[key](n_neurons)


def rank(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties go to the lower neuron index."""
    order = np.argsort(-values, kind="stable")
    return order[:k]
