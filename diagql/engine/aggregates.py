"""Mergeable aggregate states, reduced batch by batch: update(values), merge(other), finalize().

``values`` is a tensor (items × neurons) in the model's dtype. Sums accumulate in float64 so
that a streamed mean agrees with a mean over the materialised activations to far better than
1e-5; no float64 copy of a batch is made where a reduction can upcast as it goes.
``update`` returns False, leaving the state as it was, when the batch holds NaN or inf.
"""
from __future__ import annotations

import numpy as np
import torch


class MeanState:
    """Per-neuron mean: (sum, sum of squares, count); the squares give the standard error.

    ``spread=False`` (an exact answer, which needs no standard error) skips the squares."""

    def __init__(self, n_neurons: int, spread: bool = True):
        self.sum = torch.zeros(n_neurons, dtype=torch.float64)
        self.sumsq = torch.zeros(n_neurons, dtype=torch.float64) if spread else None
        self.count = 0

    def update(self, values: torch.Tensor) -> bool:
        # With squares to sum, one float64 copy serves both sums; without, sum() upcasts alone.
        wide = values.to(torch.float64) if self.sumsq is not None else values
        total = wide.sum(dim=0, dtype=torch.float64)
        # NaN or inf anywhere in the batch makes its sum NaN or inf: one check per neuron.
        if not bool(torch.isfinite(total).all()):
            return False
        self.sum += total.cpu()
        if self.sumsq is not None:
            self.sumsq += (wide * wide).sum(dim=0).cpu()
        self.count += values.shape[0]
        return True

    def merge(self, other: "MeanState") -> "MeanState":
        self.sum += other.sum
        if self.sumsq is not None:
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

    def update(self, values: torch.Tensor) -> bool:
        if not bool(torch.isfinite(values).all()):
            return False
        if values.shape[0]:
            self.max = torch.maximum(self.max, values.max(dim=0).values.to(torch.float64).cpu())
        self.count += values.shape[0]
        return True

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

    def update(self, values: torch.Tensor) -> bool:
        if not bool(torch.isfinite(values).all()):
            return False
        if values.shape[0]:
            # Upcasting is exact and keeps the order, so the winner is the model dtype's.
            winners = values.argmax(dim=1).cpu()
            self.counts += torch.bincount(winners, minlength=self.counts.shape[0])
        self.count += values.shape[0]
        return True

    def merge(self, other: "ArgmaxState") -> "ArgmaxState":
        self.counts += other.counts
        self.count += other.count
        return self

    def finalize(self) -> np.ndarray:
        """The distribution: the fraction of items whose maximal neuron each neuron is."""
        return (self.counts.to(torch.float64) / max(self.count, 1)).numpy()


STATES = {"avg": MeanState, "argmax": ArgmaxState, ("topk", "mean"): MeanState,
          ("topk", "max"): MaxState}


def state_for(aggregate: str, order: str, n_neurons: int, spread: bool = True):
    key = aggregate if aggregate != "topk" else (aggregate, order)
    if STATES[key] is MeanState:
        return MeanState(n_neurons, spread)
    return STATES[key](n_neurons)


def rank(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties go to the lower neuron index."""
    order = np.argsort(-values, kind="stable")
    return order[:k]
