"""TOPK's expected precision against the actual one on synthetic layers whose true means are
known (engine/deconvolution.py, engine/estimate.py ``p_in_topk``): estimates drawn around the
truth with known standard errors, as a sample's assisted fit gives them."""
from __future__ import annotations

import numpy as np
import pytest

from diagql.engine import deconvolution, estimate

N = 300


def _calibration(truth, k: int, replicates: int = 40, seed: int = 0) -> tuple[float, float]:
    """(mean expected precision, mean actual precision) of the top-k of noisy estimates."""
    rng = np.random.default_rng(seed)
    expected, actual = [], []
    for _ in range(replicates):
        theta = truth(rng)
        se = 0.05 * (0.5 + rng.random(N))
        est = theta + rng.standard_normal(N) * se
        reported = np.argsort(-est, kind="stable")[:k]
        true_top = set(np.argsort(-theta, kind="stable")[:k].tolist())
        actual.append(len(true_top & set(reported.tolist())) / k)
        expected.append(estimate.p_in_topk(est, se, reported, k).sum() / k)
    return float(np.mean(expected)), float(np.mean(actual))


@pytest.mark.parametrize("name, truth, k", [
    # Every neuron nearly the same: the reported ones won their noise (actual 0.03). Drawn
    # around the estimates alone, the expected precision had been 0.32.
    ("near ties", lambda rng: rng.standard_normal(N) * 0.01, 5),
    # Ten clear winners a little apart above a bulk: their lead is real and kept.
    ("winners", lambda rng: np.concatenate([1.0 + 0.04 * np.arange(10),
                                            rng.standard_normal(N - 10) * 0.1]), 5),
    ("relu", lambda rng: np.maximum(rng.standard_normal(N) * 0.3, 0.0), 10),
    ("spread", lambda rng: rng.standard_normal(N) * 0.2, 10),
])
def test_expected_precision_is_the_actual_one(name, truth, k):
    expected, actual = _calibration(truth, k)
    assert abs(expected - actual) <= 0.05, (name, expected, actual)


@pytest.mark.parametrize("k, within", [(3, 0.05), (10, 0.25)])
def test_expected_precision_on_a_layer_of_mostly_dead_neurons(k, within):
    """290 of 300 neurons are dead ReLUs: their sampled values all 0, so their estimates are
    exactly 0. The prior's components started at the estimates' quantiles, all 0, stayed
    alike, and the one normal they made shrank the ten live neurons to 0: expected precision
    0.21 against 0.90 actual at k = 3, 0.23 against 0.98 at k = 10."""
    rng = np.random.default_rng(0)
    expected, actual = [], []
    for _ in range(40):
        theta = np.zeros(N)
        live = rng.choice(N, 10, replace=False)
        theta[live] = rng.gamma(2.0, 0.5, 10)
        se = np.where(theta > 0, 0.1 + 0.1 * rng.random(N), 0.05)
        est = np.where(theta > 0, theta + rng.standard_normal(N) * se, 0.0)
        reported = np.argsort(-est, kind="stable")[:k]
        actual.append(len(set(np.argsort(-theta, kind="stable")[:k].tolist())
                          & set(reported.tolist())) / k)
        expected.append(estimate.p_in_topk(est, se, reported, k).sum() / k)
    assert abs(np.mean(expected) - np.mean(actual)) <= within


def test_the_prior_recovers_a_known_mixture():
    """Two groups of true means (0 and 1, each with spread 0.1) seen through noise of 0.2:
    the fit finds the groups' weights, centres and spreads, the noise taken out."""
    rng = np.random.default_rng(1)
    theta = np.concatenate([rng.normal(0.0, 0.1, 3000), rng.normal(1.0, 0.1, 1000)])
    se = np.full(len(theta), 0.2)
    prior = deconvolution.fit(theta + rng.standard_normal(len(theta)) * se, se)
    weight = lambda low, high: prior.weights[(prior.means > low) & (prior.means < high)].sum()
    assert weight(-0.2, 0.2) == pytest.approx(0.75, abs=0.05)
    assert weight(0.8, 1.2) == pytest.approx(0.25, abs=0.05)
    spread = np.sum(prior.weights * (prior.variances + prior.means ** 2)) - \
        np.sum(prior.weights * prior.means) ** 2
    assert spread == pytest.approx(np.var(theta), rel=0.15)  # not the noisy estimates' 0.23


def test_a_neuron_without_noise_keeps_its_estimate():
    mean = np.array([0.0, 0.1, 0.2, 5.0])
    weight, centre, spread = deconvolution.posterior(
        deconvolution.fit(mean, np.array([0.1, 0.1, 0.1, 0.0])), mean,
        np.array([0.1, 0.1, 0.1, 0.0]))
    assert np.allclose((weight * centre)[3].sum(), 5.0) and np.allclose(spread[3], 0.0)
    assert estimate.p_in_topk(mean, np.array([0.1, 0.1, 0.1, 0.0]), np.array([3]), 1)[0] == 1.0


def test_estimates_with_no_finite_error_are_drawn_as_they_are():
    """A standard error that is infinite (or a mean that is NaN) is left out of the prior's
    fit and drawn around its estimate, as before the prior: no NaN reaches the others."""
    mean = np.array([0.0, 0.1, 0.2, 0.3, 5.0])
    se = np.array([0.1, 0.1, np.inf, 0.1, 0.1])
    p = estimate.p_in_topk(mean, se, np.array([4, 3]), 2)
    assert np.all(np.isfinite(p)) and p[0] == pytest.approx(1.0)
    assert np.all(np.isfinite(estimate.p_in_topk(np.full(3, np.nan), np.full(3, np.inf),
                                                 np.array([0]), 1)))


def test_layers_fitted_together_get_the_priors_they_get_alone():
    """A GROUP BY's groups are fitted in one EM (``fit_many``); each group's prior must be the
    one it gets alone, bit for bit, whichever groups share the fit and whenever each stops."""
    rng = np.random.default_rng(3)
    layers = []
    for g in range(8):
        n = (500, 40, 500, 7, 1)[g % 5]
        mean = rng.gamma(0.5 + 0.3 * g, 1.0, n)
        se = 0.02 + 0.1 * rng.random(n)
        if g == 2:
            se[:60] = np.inf  # left out of its fit: a width of its own
        layers.append((mean, se))
    layers += [(np.array([np.nan]), np.array([1.0])), (np.zeros(300), np.full(300, 0.1))]
    for (mean, se), together in zip(layers, deconvolution.fit_many(layers)):
        alone = deconvolution.fit(mean, se)
        for a, b in zip((together.weights, together.means, together.variances),
                        (alone.weights, alone.means, alone.variances)):
            np.testing.assert_array_equal(a, b)
