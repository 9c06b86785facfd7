"""Accuracy estimates from the sample alone (docs/ARCHITECTURE.md).

Each approximate answer carries how far it is likely to be from the exact answer over all
matching items, computed from the sampled items only. The model: the matching sampled items
are a uniform sample without replacement from the matching items of the whole data set, so a
neuron's sample mean is approximately normal with the sample's standard error (finite
population corrected), and an argmax histogram is multinomial. Monte Carlo draws from that
model give the probability that each reported neuron is in the true top-k, the expected
precision, and the expected cosine and Jensen-Shannon distances.

What it covers: sampling variance. What it does not: the bias of a sampler that selects items
non-uniformly (maxmargin, gmm, weighted, vas, ebtree over-represent boundaries on purpose);
for those the estimate is marked unreliable and the rendering says so instead of printing it.
"""
from __future__ import annotations

import numpy as np

from diagql.results.metrics import COSINE, JS, PRECISION
from diagql.results.result import Estimate

DRAWS = 256
LEVEL = 0.95
COVERS = ("sampling variance of a uniform sample of the matching items "
          "(normal approximation, finite-population corrected); not a sampler's bias")


def _rng() -> np.random.Generator:
    # Fixed: the same answer always carries the same estimate.
    return np.random.default_rng(20200101)


def _standard_error(state, population: int) -> np.ndarray:
    n = state.count
    mean = state.sum.numpy() / n
    variance = np.maximum(state.sumsq.numpy() / n - mean ** 2, 0.0) * n / (n - 1)
    fpc = max(population - n, 0) / max(population - 1, 1)
    return np.sqrt(variance / n * fpc)


def _constant_floor(se: np.ndarray, n: int) -> np.ndarray:
    """A neuron that is constant over the sample (a ReLU silent for every sampled item) has a
    zero standard error, yet the items not drawn may fire. By the rule of three, up to 3/n of
    them may do so unseen (95%); they are given the layer's typical spread."""
    varying = se[se > 0]
    if len(varying) == 0:
        return se
    return np.where(se > 0, se, min(3.0 / n, 1.0) * float(np.median(varying)) * np.sqrt(n))


def _t_quantile(n: int) -> float:
    # scipy.special, not scipy.stats: the same quantile, and 0.2 s to import instead of 0.6-1.2 s
    # on the first sample query of a session.
    from scipy.special import stdtrit

    return float(stdtrit(n - 1, 0.5 + LEVEL / 2))


def _too_few(n: int, population: int) -> Estimate:
    return Estimate(COVERS, False, LEVEL, n, population,
                    reason=f"{n} matching sampled item: too few for an estimate")


def for_mean(state, population: int, reported: np.ndarray, k: int | None,
             reliable: bool) -> Estimate:
    """AVG (k None): a confidence interval per neuron and the expected cosine distance.
    TOPK BY MEAN: intervals of the reported neurons, P(in true top-k) and expected precision."""
    n = state.count
    if n < 2:
        return _too_few(n, population)
    mean = state.sum.numpy() / n
    se = _constant_floor(_standard_error(state, population), n)
    half = _t_quantile(n) * se
    draws = mean + _rng().standard_normal((DRAWS, len(mean))) * se
    if k is None:
        distances = COSINE.rows(np.broadcast_to(mean, draws.shape), draws)
        return Estimate(COVERS, reliable, LEVEL, n, population, ci_low=mean - half,
                        ci_high=mean + half, metric=COSINE, expected=float(np.mean(distances)))
    top = np.argpartition(-draws, k - 1, axis=1)[:, :k]
    in_top = np.zeros((DRAWS, len(mean)), dtype=bool)
    np.put_along_axis(in_top, top, True, axis=1)
    p_in = in_top[:, reported].mean(axis=0)
    return Estimate(COVERS, reliable, LEVEL, n, population, ci_low=mean[reported] - half[reported],
                    ci_high=mean[reported] + half[reported], p_in_topk=p_in, metric=PRECISION,
                    expected=float(p_in.sum() / k))


def for_argmax(state, population: int, reliable: bool) -> Estimate:
    """ARGMAX: intervals of each share and the expected Jensen-Shannon distance."""
    n = state.count
    if n < 2:
        return _too_few(n, population)
    counts = state.counts.numpy().astype(np.float64)
    share = counts / n
    fpc = max(population - n, 0) / max(population - 1, 1)
    half = 1.959964 * np.sqrt(share * (1 - share) / n * fpc)
    # Two stages: a plausible true distribution (Dirichlet with a Perks prior, which gives
    # neurons the sample never saw win some mass), then a sample of n items from it. Drawing
    # only from the sample's own shares ignores unseen winners and underestimates the distance.
    rng = _rng()
    truths = rng.dirichlet(counts + 1.0 / len(counts), size=DRAWS)
    distances = JS.rows(rng.multinomial(n, truths), truths)
    return Estimate(COVERS, reliable, LEVEL, n, population, ci_low=np.clip(share - half, 0, 1),
                    ci_high=np.clip(share + half, 0, 1), metric=JS,
                    expected=float(np.mean(distances)))


def unavailable(reason: str) -> Estimate:
    return Estimate(COVERS, False, reason=reason)
