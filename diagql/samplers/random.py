"""Uniform random sampling without replacement: the baseline every other sampler must beat."""
from __future__ import annotations

import numpy as np

from .base import SampleData, Sampler


class RandomSampler(Sampler):
    name = "random"
    reads_latents = False
    description = "uniform without replacement"
    uniform = True
    nested = True

    def _select(self, data: SampleData, n: int, rng: np.random.Generator) -> np.ndarray:
        # A prefix of one permutation, so that a larger draw extends a smaller one.
        return rng.permutation(len(data))[:n]
