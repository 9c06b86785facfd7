"""Mergeable aggregate states, reduced batch by batch: update(values), merge(other), finalize().

``values`` is a tensor (items × neurons) in the model's dtype. Sums accumulate in float64 so
that a streamed mean agrees with a mean over the materialised activations to far better than
1e-5; no float64 copy of a batch is made where a reduction can upcast as it goes.
``update`` returns False, leaving the state as it was, when the batch holds NaN or inf.
"""
from __future__ import annotations

import numpy as np
import torch

from diagql.engine.regression import CrossSums


class MeanState:
    """Per-neuron mean: (sum, sum of squares, count); the squares give the standard error.

    ``spread=False`` (an exact answer, which needs no standard error) skips the squares;
    ``covariates=p`` also sums the items' p covariates against their values (``cross``), for
    the model-assisted estimator (engine/regression.py); ``update`` then takes them as ``z``."""

    def __init__(self, n_neurons: int, spread: bool = True, covariates: int = 0):
        self.sum = torch.zeros(n_neurons, dtype=torch.float64)
        self.sumsq = torch.zeros(n_neurons, dtype=torch.float64) if spread else None
        self.cross = CrossSums(covariates, n_neurons) if covariates else None
        self.count = 0

    def update(self, values: torch.Tensor, z: torch.Tensor | None = None) -> bool:
        # With squares to sum, one float64 copy serves both sums; without, sum() upcasts alone.
        wide = values.to(torch.float64) if self.sumsq is not None else values
        total = wide.sum(dim=0, dtype=torch.float64)
        # NaN or inf anywhere in the batch makes its sum NaN or inf: one check per neuron.
        if not bool(torch.isfinite(total).all()):
            return False
        self.sum += total.cpu()
        if self.sumsq is not None:
            self.sumsq += (wide * wide).sum(dim=0).cpu()
        if self.cross is not None and z is not None:
            self.cross.add(z, wide)
        self.count += values.shape[0]
        return True

    def merge(self, other: "MeanState") -> "MeanState":
        self.sum += other.sum
        if self.sumsq is not None:
            self.sumsq += other.sumsq
        if self.cross is not None and other.cross is not None:
            self.cross.merge(other.cross)
        self.count += other.count
        return self

    def finalize(self) -> np.ndarray:
        return (self.sum / max(self.count, 1)).numpy()


class MaxState:
    """Per-neuron running maximum."""

    def __init__(self, n_neurons: int):
        self.max = torch.full((n_neurons,), -torch.inf, dtype=torch.float64)
        self.count = 0

    def update(self, values: torch.Tensor, z: torch.Tensor | None = None) -> bool:
        # ``z`` as the other states take it; a maximum has no regression estimator.
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
    """How often each neuron is an item's maximally activated one (ties: the lowest index);
    ``covariates=p`` also sums the items' covariates against their one-hot winners."""

    def __init__(self, n_neurons: int, covariates: int = 0):
        self.counts = torch.zeros(n_neurons, dtype=torch.int64)
        self.cross = CrossSums(covariates, n_neurons) if covariates else None
        self.count = 0

    def update(self, values: torch.Tensor, z: torch.Tensor | None = None) -> bool:
        if not bool(torch.isfinite(values).all()):
            return False
        if values.shape[0]:
            # Upcasting is exact and keeps the order, so the winner is the model dtype's.
            winners = values.argmax(dim=1).cpu()
            self.counts += torch.bincount(winners, minlength=self.counts.shape[0])
            if self.cross is not None and z is not None:
                self.cross.add_winners(z, winners)
        self.count += values.shape[0]
        return True

    def merge(self, other: "ArgmaxState") -> "ArgmaxState":
        self.counts += other.counts
        if self.cross is not None and other.cross is not None:
            self.cross.merge(other.cross)
        self.count += other.count
        return self

    def finalize(self) -> np.ndarray:
        """The distribution: the fraction of items whose maximal neuron each neuron is."""
        return (self.counts.to(torch.float64) / max(self.count, 1)).numpy()


STATES = {"avg": MeanState, "argmax": ArgmaxState, ("topk", "mean"): MeanState,
          ("topk", "max"): MaxState}


def state_for(aggregate: str, order: str, n_neurons: int, spread: bool = True,
              covariates: int = 0):
    """A fresh state; ``covariates`` (p > 0) makes a mean or argmax state sum them too."""
    key = aggregate if aggregate != "topk" else (aggregate, order)
    if STATES[key] is MeanState:
        return MeanState(n_neurons, spread, covariates)
    if STATES[key] is ArgmaxState:
        return ArgmaxState(n_neurons, covariates)
    return STATES[key](n_neurons)


def rank(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties go to the lower neuron index."""
    order = np.argsort(-values, kind="stable")
    return order[:k]
