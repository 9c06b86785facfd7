"""Simple latent-space sampling: a grid over the latents' leading principal components, and the
same number of items from every non-empty cell (the paper's baseline, IV-A)."""
from __future__ import annotations

import numbers

import numpy as np

from diagql.errors import BindError

from .base import SampleData, Sampler
from .space import principal_components


class LatentGridSampler(Sampler):
    """PCA of the latents to ``dims`` components, each cut into ``bins`` quantile bins; the cells
    are their combinations (at most bins**dims, 32 by default). Every non-empty cell gives the
    same number of items, drawn at random; a cell holding fewer gives all it has and the others
    make up the difference, so the sample has exactly ``size`` items.

    An item lands in bin b of a component when it is >= the b-th inner quantile and below the
    next (``np.digitize``). Components are signed so that their largest loading is positive,
    which makes the grid independent of the eigensolver's arbitrary signs. ``dims`` larger than the
    latents' width is cut down to it.
    """

    name = "latentgrid"
    description = ("PCA of the latents to dims, bins quantile bins per dimension; an equal "
                   "number of items from every non-empty cell")
    _domains = {**Sampler._domains,
                "dims": "a whole number >= 1: principal components kept",
                "bins": "a whole number >= 2: quantile bins per component"}

    def __init__(self, size=0.05, dims=5, bins=2, random_state=None):
        self.size = size
        self.dims = dims
        self.bins = bins
        self.random_state = random_state

    def _check(self) -> None:
        for name, least in (("dims", 1), ("bins", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise BindError(f"{name} must be a whole number >= {least}, not {value!r}",
                                param=name)

    def _select(self, data: SampleData, n: int, rng: np.random.Generator) -> np.ndarray:
        _, cell, sizes = np.unique(grid_bins(data.latents, self.dims, self.bins), axis=0,
                                   return_inverse=True, return_counts=True)
        self.cells_ = cell = cell.ravel()
        quota = equal_allocation(sizes, n, rng)
        # Each cell's first `quota` items in a random order: one shuffle serves every cell.
        order = np.lexsort((rng.permutation(len(cell)), cell))
        rank = np.arange(len(cell)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return order[rank < np.repeat(quota, sizes)]


def grid_bins(latents: np.ndarray, dims: int, bins: int) -> np.ndarray:
    """Each item's bin (0 to bins - 1) on each principal component: items x components."""
    Z = principal_components(latents, dims)
    inner = np.linspace(0, 1, bins + 1)[1:-1]
    return np.stack([np.digitize(z, np.quantile(z, inner)) for z in Z.T], axis=1)


def equal_allocation(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Items per cell summing to exactly n (n <= sizes.sum()): every cell gets min(size, L) or
    L + 1, for the largest level L that fits; the cells given L + 1 are drawn at random among
    those with room for it."""
    sizes = np.asarray(sizes, dtype=np.int64)
    low, high = 0, int(sizes.max())
    while low < high:  # the largest L with sum(min(sizes, L)) <= n
        mid = (low + high + 1) // 2
        low, high = (mid, high) if np.minimum(sizes, mid).sum() <= n else (low, mid - 1)
    quota = np.minimum(sizes, low)
    roomy = np.flatnonzero(sizes > low)
    quota[rng.choice(roomy, size=n - int(quota.sum()), replace=False)] += 1
    return quota
