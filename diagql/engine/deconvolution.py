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
# gains less than TOLERANCE a step, P(in top-k) cost 3-6 ms a group alone (0.2-0.3 ms
# without the prior), about 3 ms a group with a GROUP BY's priors fitted together
# (``fit_many``); run to 1e-5 (100 steps, twice the time) the sweep's CNN was 0.03 nearer its
# actual precision (benchmarks/README.md, "TOPK's expected precision near ties", "A GROUP
# BY's priors fitted together").
FIT_NEURONS = 256
ITERATIONS = 60
TOLERANCE = 1e-4
FLAT = 1e300  # a component's variance that leaves every estimate where it is
# The start of components whose quantile means coincide: their variances as shares of the
# estimates' spread, one each.
NESTED = np.array([1e-4, 1e-2, 1.0])


@dataclass(frozen=True)
class Prior:
    """A normal mixture: weights, means and variances of its components."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray


def fit(mean: np.ndarray, se: np.ndarray) -> Prior:
    """The mixture most likely to have given the estimates ``mean`` with noise ``se`` (per
    neuron): each estimate is modelled as N(μ_c, τ_c² + se²) from component c."""
    return fit_many([(mean, se)])[0]


def fit_many(layers: list[tuple[np.ndarray, np.ndarray]]) -> list[Prior]:
    """``fit`` of each (mean, se), as one EM for those of one width (a GROUP BY's groups):
    each stops at its own step, so each prior is the one it gets alone, and ten groups cost
    about what two do (the steps' numpy calls, not their arithmetic, are most of a fit)."""
    kept = [_kept(mean, se) for mean, se in layers]
    out: list[Prior] = [_FLAT] * len(layers)  # nothing to fit: the posterior is the estimate
    for width in sorted({len(m) for m, _ in kept} - {0}):
        rows = [i for i, (m, _) in enumerate(kept) if len(m) == width]
        for i, prior in zip(rows, _em(np.stack([kept[i][0] for i in rows]),
                                      np.stack([kept[i][1] for i in rows]))):
            out[i] = prior
    return out


def _em(mean: np.ndarray, se2: np.ndarray) -> list[Prior]:
    """The mixture of each row of ``mean`` (layers, neurons) and ``se2``: EM, arrays laid out
    (layers, components, neurons), so that every sum over neurons runs along memory."""
    spread = np.var(mean, axis=1)
    floor = np.where(spread > 0, 1e-12 * spread, 1e-30)[:, None]  # variances stay positive
    weights = np.full((len(mean), COMPONENTS), 1.0 / COMPONENTS)
    means = np.quantile(mean, (np.arange(COMPONENTS) + 0.5) / COMPONENTS, axis=1).T
    variances = np.maximum(spread / COMPONENTS, floor[:, 0])[:, None].repeat(COMPONENTS, axis=1)
    # Where the quantiles coincide (a layer of mostly dead ReLUs: most means exactly 0),
    # components that start alike stay alike, and the one normal they make shrank the few
    # live neurons to 0 (expected precision 0.03 against 0.73 actual): those start from
    # nested spreads, the widest taking the neurons far out.
    alike = np.any(np.diff(means, axis=1) <= 1e-9 * np.sqrt(spread)[:, None], axis=1)
    nested = np.maximum(spread[:, None] * NESTED, floor)
    variances = np.where(alike[:, None], nested, variances)
    last = np.full(len(mean), -np.inf)
    running = np.ones(len(mean), dtype=bool)
    for _ in range(ITERATIONS):
        responsibility, post_mean, post_var, loglik = _e_step(
            Prior(weights, means, variances), mean, se2)
        counts = responsibility.sum(axis=-1) + 1e-300
        new_weights = counts / counts.sum(axis=1, keepdims=True)
        new_means = (responsibility * post_mean).sum(axis=-1) / counts
        new_variances = np.maximum((responsibility * ((post_mean - new_means[..., None]) ** 2
                                                      + post_var)).sum(axis=-1) / counts, floor)
        # A layer that has stopped keeps its prior; the others take the step.
        weights, means, variances = (np.where(running[:, None], new, old) for new, old in
                                     ((new_weights, weights), (new_means, means),
                                      (new_variances, variances)))
        running &= loglik - last >= TOLERANCE
        if not running.any():
            break
        last = loglik
    return [Prior(*row) for row in zip(weights, means, variances)]


_FLAT = Prior(np.ones(1), np.zeros(1), np.full(1, FLAT))  # the posterior is the estimate


def _kept(mean, se) -> tuple[np.ndarray, np.ndarray]:
    """The estimates a prior is fitted to: the finite ones, at most FIT_NEURONS of them at
    evenly spaced ranks; and their squared standard errors."""
    mean, se2 = np.asarray(mean, dtype=np.float64), np.asarray(se, dtype=np.float64) ** 2
    finite = np.isfinite(mean) & np.isfinite(se2)
    mean, se2 = mean[finite], se2[finite]
    if len(mean) > FIT_NEURONS:
        ranks = np.argsort(mean, kind="stable")
        keep = ranks[np.linspace(0, len(mean) - 1, FIT_NEURONS).round().astype(int)]
        mean, se2 = mean[keep], se2[keep]
    return mean, se2


def posterior(prior: Prior, mean: np.ndarray,
              se: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each neuron's posterior of its true mean under ``prior``: a mixture whose component c
    has probability r[:, c] and is N(m[:, c], s[:, c]²)."""
    mean, se = np.asarray(mean, dtype=np.float64), np.asarray(se, dtype=np.float64)
    unknown = ~(np.isfinite(mean) & np.isfinite(se))  # as the estimate says, unshrunk
    *laid_out, _ = _e_step(prior, np.where(unknown, 0.0, mean),
                           np.where(unknown, 0.0, se) ** 2)
    responsibility, post_mean, post_var = (np.ascontiguousarray(a.T) for a in laid_out)
    spread = np.sqrt(post_var)
    if unknown.any():
        responsibility[unknown] = np.eye(len(prior.weights))[0]
        post_mean[unknown], spread[unknown] = mean[unknown, None], se[unknown, None]
    return responsibility, post_mean, spread


def selected_interval(prior: Prior, mean: np.ndarray, se: np.ndarray, low: np.ndarray,
                      high: np.ndarray, level: float,
                      widen: float) -> tuple[np.ndarray, np.ndarray]:
    """TOPK's reported neurons' intervals (``low``, ``high``: estimate ± t·se) joined with their
    posterior's central interval of ``level``, its spreads times ``widen`` (t over the
    normal's quantile, as the sample's own size widens it). The reported are the sample's
    largest estimates, so their noise is more often up than down: a ResNet stem's and a ViT
    patch embedding's top 10 had held their true means 0.906 and 0.884 of the time, the truth
    below them; joined, 0.977 and 0.958 (benchmarks/README.md, "thirty-fifth session"). The
    joined interval still holds the estimate, and the level's share of the posterior."""
    weight, centre, spread = posterior(prior, mean, se)
    spread = np.maximum(spread * widen, 1e-300)
    tail = (1 - level) / 2
    ends = []
    with np.errstate(invalid="ignore"):  # a non-finite se's bracket: its ends stay its own
        for q in (tail, 1 - tail):
            ends.append(_quantile(q, weight, centre, spread))
    return np.fmin(low, ends[0]), np.fmax(high, ends[1])


def _quantile(q: float, weight: np.ndarray, centre: np.ndarray,
              spread: np.ndarray) -> np.ndarray:
    """Each row's normal mixture's q-quantile, by bisection of its cdf (monotone)."""
    below = (centre - 12 * spread).min(axis=1)
    above = (centre + 12 * spread).max(axis=1)
    for _ in range(_BISECTIONS):
        middle = (below + above) / 2
        under = _mixture_cdf(middle, weight, centre, spread) < q
        below, above = np.where(under, middle, below), np.where(under, above, middle)
    return (below + above) / 2


_BISECTIONS = 32  # a bracket of 24 spreads halved to 6e-9 of one (1 ms for a top 10)


def _mixture_cdf(x: np.ndarray, weight: np.ndarray, centre: np.ndarray,
                 spread: np.ndarray) -> np.ndarray:
    """P(X ≤ x) of each row's normal mixture."""
    import torch

    z = torch.from_numpy((x[:, None] - centre) / spread)
    return (weight * torch.special.ndtr(z).numpy()).sum(axis=1)


def _e_step(prior: Prior, mean: np.ndarray, se2: np.ndarray):
    """Responsibilities, each component's posterior mean and variance, laid out (...,
    components, neurons), and the mean log-likelihood of the estimates. ``prior``'s arrays
    are (..., components), ``mean`` and ``se2`` (..., neurons): a layer, or a row per layer."""
    weights, means, variances = (a[..., :, None] for a in (prior.weights, prior.means,
                                                          prior.variances))
    total = variances + se2[..., None, :]
    gap = mean[..., None, :] - means
    log = (np.log(np.maximum(weights, 1e-300)) - 0.5 * np.log(2 * np.pi * total)
           - 0.5 * gap * gap / total)
    top = log.max(axis=-2, keepdims=True)
    likelihood = np.exp(log - top)
    norm = likelihood.sum(axis=-2, keepdims=True)
    gain = variances / total  # τ²/(τ² + se²): how far toward the estimate
    loglik = np.mean(top[..., 0, :] + np.log(norm[..., 0, :]), axis=-1)
    return likelihood / norm, means + gain * gap, gain * se2[..., None, :], loglik
