"""Visualization-aware sampling (Park, Cafarella and Mozafari, ICDE 2016) on the latents.

The sample minimises the VAS loss, the sum over sample pairs of the proximity kernel
κ(a, b) = exp(−‖a − b‖² / ε²), so it spreads out to cover the data at every zoom level. It is
found by the paper's interchange algorithm, in one streaming pass: the first ``n`` items of a
random permutation are the start; each further item is added and then the item whose removal
lowers the loss most (the one with the largest responsibility rsp(s) = Σ_{s'≠s} κ(s, s')) is
removed again, which may be the newcomer itself. Every step keeps or lowers the loss.
"""
from __future__ import annotations

import numbers
from typing import ClassVar

import numpy as np

from diagql.errors import BindError

from .base import SampleData, Sampler
from .space import fit_space

# The default ε is half the median pairwise distance of up to 1000 random items. The median
# alone (the usual RBF heuristic) lets clusters far apart still repel each other, which skews how
# many items each cluster gets; half of it leaves distant clusters nearly independent
# (κ ≈ e⁻⁴ at the median distance) while items within a cluster still push each other apart.
_BANDWIDTH_SUBSET = 1000
_BANDWIDTH_FACTOR = 0.5


class VASSampler(Sampler):
    name = "vas"
    description = ("visualization-aware sampling: the interchange algorithm minimising a "
                   "proximity kernel over sample pairs in the latent space")
    _domains = {
        **Sampler._domains,
        "bandwidth": ("the kernel width ε, a positive number in standardized latent units "
                      "(default: half the median pairwise distance of up to 1000 random items)"),
    }

    # Wider latents are standardised and projected on this many principal components (see
    # fit_space): each incoming item costs an n x dims product.
    fit_dims: ClassVar[int] = 128

    def __init__(self, size=0.05, bandwidth=None, random_state=None):
        self.size = size
        self.bandwidth = bandwidth
        self.random_state = random_state

    def _check(self) -> None:
        eps = self.bandwidth
        if eps is None:
            return
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not np.isfinite(eps) \
                or eps <= 0:
            raise BindError(f"bandwidth must be a positive number, not {eps!r}",
                            param="bandwidth")

    def _select(self, data: SampleData, n: int, rng: np.random.Generator) -> np.ndarray:
        X = fit_space(data.latents, self.fit_dims)(data.latents)
        order = rng.permutation(len(X))
        eps = (float(self.bandwidth) if self.bandwidth is not None
               else _BANDWIDTH_FACTOR * median_distance(X, rng, _BANDWIDTH_SUBSET))
        self.bandwidth_ = eps
        self.initial_indices_ = np.sort(order[:n])
        sample, kernel = interchange(X, order, n, eps)
        self.loss_ = float(kernel.sum() / 2)
        return sample


def interchange(X: np.ndarray, order: np.ndarray, n: int, eps: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """One pass of the interchange algorithm over ``X[order]``; the chosen items and the
    n×n kernel matrix among them (zero diagonal), whose upper triangle sums to the loss.

    The kernel matrix is kept so that removing a sample point costs a row lookup, not a second
    distance computation; each incoming item costs one n×d product and a few length-n vector
    operations, so the Python loop stays thin (O(N·n·d) work in all).
    """
    gamma = 1.0 / (eps * eps)
    sample = order[:n].copy()
    S = X[sample].copy()
    norms = np.einsum("ij,ij->i", X, X)
    s_norms = norms[sample].copy()
    kernel = np.exp(-gamma * _sq_distances(S, S, s_norms, s_norms))
    np.fill_diagonal(kernel, 0.0)
    rsp = kernel.sum(axis=1)
    for t in order[n:]:
        x = X[t]
        sq = s_norms + norms[t] - 2.0 * (S @ x)
        np.maximum(sq, 0.0, out=sq)
        k = np.exp(-gamma * sq)
        rsp_t = k.sum()
        expanded = rsp + k  # every rsp once t has joined the sample
        r = int(expanded.argmax())
        if expanded[r] <= rsp_t:
            continue  # t itself has the largest responsibility: dropping it again is best
        rsp = expanded - kernel[r]
        rsp[r] = rsp_t - k[r]
        k[r] = 0.0
        kernel[r] = k
        kernel[:, r] = k
        S[r] = x
        s_norms[r] = norms[t]
        sample[r] = t
    return sample, kernel


def median_distance(X: np.ndarray, rng: np.random.Generator, subset: int) -> float:
    """The median pairwise Euclidean distance of a random subset (the usual "median heuristic"
    for an RBF kernel's width); 1.0 if those items all coincide."""
    from scipy.spatial.distance import pdist  # here: scipy costs every new process 0.15 s

    pick = rng.choice(len(X), size=min(subset, len(X)), replace=False)
    distances = pdist(X[pick]) if len(pick) > 1 else np.empty(0)
    median = float(np.median(distances)) if len(distances) else 0.0
    return median if median > 0 else 1.0


def _sq_distances(A, B, a_norms, b_norms) -> np.ndarray:
    return np.maximum(a_norms[:, None] + b_norms[None, :] - 2.0 * (A @ B.T), 0.0)
