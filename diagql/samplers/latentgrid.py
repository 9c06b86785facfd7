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

    nested = True

    def _select(self, data: SampleData, n: int, rng: np.random.Generator) -> np.ndarray:
        _, cell, sizes = np.unique(grid_bins(data.latents, self.dims, self.bins), axis=0,
                                   return_inverse=True, return_counts=True)
        self.cells_ = cell = cell.ravel()
        # Each cell's items in a random order (one shuffle serves every cell); then level by
        # level, each cell's next item, the cells of a level in random order. The first n
        # give every cell min(size, L) or L + 1 items, the cells with L + 1 at random among
        # those with room, and a larger n extends a smaller one.
        order = np.lexsort((rng.permutation(len(cell)), cell))
        rank = np.empty(len(cell), dtype=np.int64)
        rank[order] = np.arange(len(cell)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return np.lexsort((rng.random(len(cell)), rank))[:n]


def grid_bins(latents: np.ndarray, dims: int, bins: int) -> np.ndarray:
    """Each item's bin (0 to bins - 1) on each principal component: items x components."""
    Z = principal_components(latents, dims)
    inner = np.linspace(0, 1, bins + 1)[1:-1]
    return np.stack([np.digitize(z, np.quantile(z, inner)) for z in Z.T], axis=1)
