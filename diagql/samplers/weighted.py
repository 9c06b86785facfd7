"""Weighted sampling: items drawn without replacement with weight 1 / likelihood ratio under the
max-margin classifier, so boundary items are likelier (the paper's dashed lines in Fig. 6)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from .base import SampleData, Sampler
from .boundary import log_likelihood_ratio
from .maxmargin import FIT_DIMS, boundary_log_proba

# The ratio is clipped to [1e-6, 1e3] before inverting. Measured against each item's own
# predicted class it is >= 1, so only the upper bound acts: every exemplar beyond a ratio of 1000
# weighs 1e-3, a thousandth of a boundary item, instead of next to nothing (the ratio of a far
# exemplar is unbounded and would otherwise shut them out entirely).
RATIO_CLIP = (1e-6, 1e3)


class WeightedSampler(Sampler):
    """Weight = 1 / clip(p(own) / max p(other), 1e-6, 1e3) with the probabilities and the own
    class (its argmax) from ``maxmargin``'s Platt-scaled linear SVM; exactly ``size`` items by
    successive sampling without replacement (each next item drawn with probability proportional
    to its weight among those left), as Efraimidis and Spirakis's keys u^(1/w) order them: the
    n largest keys, so that a larger draw extends a smaller one."""

    name = "weighted"
    needs_labels = True  # the SVM is trained on the true labels
    description = ("weighted sampling without replacement, weight = 1 / likelihood ratio "
                   "(clipped) under the max-margin classifier")

    fit_dims: ClassVar[int | None] = FIT_DIMS
    nested = True

    def _select(self, data: SampleData, n: int, rng: np.random.Generator) -> np.ndarray:
        _, log_proba = boundary_log_proba(data, self.fit_dims)
        log_ratio = log_likelihood_ratio(log_proba, log_proba.argmax(axis=1))
        self.weights_ = np.exp(-np.clip(log_ratio, *np.log(RATIO_CLIP)))
        keys = np.log(rng.random(len(data))) / self.weights_  # log(u^(1/w)): the same order
        return np.argsort(-keys, kind="stable")[:n]
