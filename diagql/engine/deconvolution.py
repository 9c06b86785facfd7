"""The prior of a layer's true neuron means, deconvolved from an answer's estimates and their
standard errors, and each neuron's posterior under it: what TOPK's P(in top-k) draws from
(engine/estimate.py; docs/ARCHITECTURE.md, "Estimates").

Drawing each neuron's true mean from N(estimate, se²) alone treats the estimates as if no
neuron had been chosen for being largest. Where dozens of neurons nearly tie, the reported
top-k are the winners of their noise and keep their lead in every such draw: a sweep's 1-d
CNN (384 neurons after its first convolution) was told an expected precision of 0.41 where it
had 0.25 (benchmarks/README.md, "TOPK's expected precision near ties"). Here the true means
are modelled as drawn from a mixture of COMPONENTS normals, fitted to all the layer's
estimates by EM with each estimate's own noise taken out ("extreme deconvolution": Bovy, Hogg
and Roweis, 2011): a neuron among many like it is shrunk toward them by as much as its
standard error allows, and one far out keeps its lead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMPONENTS = 3
# Neurons the prior is fitted to: at most this many, at evenly spaced ranks of the estimates
# (the whole distribution, its tail included), so that a 4,704-neuron layer costs what a
# 256-neuron one does. With at most ITERATIONS steps, stopping when the mean log-likelihood
# gains less than TOLERANCE a step, P(in top-k) costs 3-6 ms a group (0.2-0.3 ms without
# the prior); run to 1e-5 (100 steps, twice the time) the sweep's CNN was 0.03 nearer its
# actual precision (benchmarks/README.md, "TOPK's expected precision near ties").
FIT_NEURONS = 256
ITERATIONS = 60
TOLERANCE = 1e-4
FLAT = 1e300  # a component's variance that leaves every estimate where it is


@dataclass(frozen=True)
class Prior:
    """A normal mixture: weights, means and variances of its components."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray


def fit(mean: np.ndarray, se: np.ndarray) -> Prior:
    """The mixture most likely to have given the estimates ``mean`` with noise ``se`` (per
    neuron): each estimate is modelled as N(μ_c, τ_c² + se²) from component c."""
    mean, se2 = np.asarray(mean, dtype=np.float64), np.asarray(se, dtype=np.float64) ** 2
    finite = np.isfinite(mean) & np.isfinite(se2)
    mean, se2 = mean[finite], se2[finite]
    if not len(mean):  # nothing to fit: a flat prior, under which the posterior is the estimate
        return Prior(np.ones(1), np.zeros(1), np.full(1, FLAT))
    if len(mean) > FIT_NEURONS:
        ranks = np.argsort(mean, kind="stable")
        keep = ranks[np.linspace(0, len(mean) - 1, FIT_NEURONS).round().astype(int)]
        mean, se2 = mean[keep], se2[keep]
    spread = float(np.var(mean))
    floor = 1e-12 * spread if spread > 0 else 1e-30  # a component's variance stays positive
    weights = np.full(COMPONENTS, 1.0 / COMPONENTS)
    means = np.quantile(mean, (np.arange(COMPONENTS) + 0.5) / COMPONENTS)
    variances = np.full(COMPONENTS, max(spread / COMPONENTS, floor))
    last = -np.inf
    for _ in range(ITERATIONS):
        responsibility, post_mean, post_var, loglik = _e_step(
            Prior(weights, means, variances), mean, se2)
        counts = responsibility.sum(axis=0) + 1e-300
        weights = counts / counts.sum()
        means = (responsibility * post_mean).sum(axis=0) / counts
        variances = np.maximum((responsibility * ((post_mean - means) ** 2 + post_var))
                               .sum(axis=0) / counts, floor)
        if loglik - last < TOLERANCE:
            break
        last = loglik
    return Prior(weights, means, variances)


def posterior(prior: Prior, mean: np.ndarray,
              se: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each neuron's posterior of its true mean under ``prior``: a mixture whose component c
    has probability r[:, c] and is N(m[:, c], s[:, c]²)."""
    mean, se = np.asarray(mean, dtype=np.float64), np.asarray(se, dtype=np.float64)
    unknown = ~(np.isfinite(mean) & np.isfinite(se))  # as the estimate says, unshrunk
    responsibility, post_mean, post_var, _ = _e_step(
        prior, np.where(unknown, 0.0, mean), np.where(unknown, 0.0, se) ** 2)
    spread = np.sqrt(post_var)
    if unknown.any():
        responsibility[unknown] = np.eye(len(prior.weights))[0]
        post_mean[unknown], spread[unknown] = mean[unknown, None], se[unknown, None]
    return responsibility, post_mean, spread


def _e_step(prior: Prior, mean: np.ndarray, se2: np.ndarray):
    """Responsibilities, each component's posterior mean and variance per neuron, and the
    mean log-likelihood of the estimates."""
    total = prior.variances[None, :] + se2[:, None]
    gap = mean[:, None] - prior.means[None, :]
    log = (np.log(np.maximum(prior.weights, 1e-300))[None, :] - 0.5 * np.log(2 * np.pi * total)
           - 0.5 * gap * gap / total)
    top = log.max(axis=1, keepdims=True)
    likelihood = np.exp(log - top)
    norm = likelihood.sum(axis=1, keepdims=True)
    gain = prior.variances[None, :] / total  # τ²/(τ² + se²): how far toward the estimate
    return (likelihood / norm, prior.means[None, :] + gain * gap, gain * se2[:, None],
            float(np.mean(top[:, 0] + np.log(norm[:, 0]))))
