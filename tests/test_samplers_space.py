"""The space the latent-space samplers work in (samplers/space.py) and what it must not change:
draws on wide latents against draws on their exact low-rank form, units that do not matter,
and an SVM whose probabilities saturate but whose ratios still order the items. The truth is
computed here with plain numpy (SVD, norms) or is a property of the data (its rank, its
planted items)."""
from __future__ import annotations

import numpy as np
import pytest

from diagql.samplers.base import SampleData
from scipy.stats import spearmanr

from diagql.samplers.boundary import boundary_and_exemplars, log_likelihood_ratio, two_ended
from diagql.samplers.ebtree import EBTreeSampler
from diagql.samplers.maxmargin import (MaxMarginSampler, _calibrated_log_proba, _platt,
                                      svm_log_proba)
from diagql.samplers.space import fit_space, principal_components, reduced_space
from diagql.samplers.vas import VASSampler
from diagql.samplers.weighted import WeightedSampler

from .test_samplers_boundary import blobs


class Unreduced(MaxMarginSampler):
    fit_dims = None


class UnreducedWeighted(WeightedSampler):
    fit_dims = None


class UnreducedTree(EBTreeSampler):
    fit_dims = None


class UnreducedVAS(VASSampler):
    fit_dims = None


def widened(data: SampleData, dims: int, noise: float = 0.0, seed: int = 0) -> SampleData:
    """The same items in ``dims`` dimensions: the latents mapped by a random linear map (so of
    the same rank) and shifted, plus independent noise per dimension if asked."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(data.latents.shape[1], dims))
    wide = data.latents.astype(np.float64) @ mixing + rng.normal(size=dims) * 5
    wide += rng.normal(size=wide.shape) * noise
    return SampleData(wide.astype(np.float32), data.labels, data.predictions, data.n_classes)


@pytest.fixture(scope="module")
def data():
    return blobs()[0]


@pytest.fixture(scope="module")
def planted():
    return blobs()[1]


# --- the reduction ------------------------------------------------------------------------------

def test_standardised_space_is_the_latents_centred_and_scaled():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(300, 5)) * [1, 10, 1e-3, 5, 2] + [0, 3, 0.99, -1, 7]
    X = reduced_space(latents.astype(np.float32), None)
    expected = (latents - latents.mean(axis=0)) / latents.std(axis=0)
    np.testing.assert_allclose(X, expected, atol=1e-4)


def test_constant_dimensions_are_left_out_but_a_rare_feature_is_kept():
    """A dimension that never varies (or only by float32 rounding) carries nothing to
    standardise; one that a few items use carries a feature, even when the subsample the
    spread is estimated from holds none of them."""
    rng = np.random.default_rng(0)
    n = 30_000  # more than the 10,000 items the spread is estimated from
    latents = np.empty((n, 4), dtype=np.float32)
    latents[:, 0] = rng.normal(size=n)
    latents[:, 1] = 3.0  # constant
    latents[:, 2] = np.float32(0.9999) + rng.normal(size=n).astype(np.float32) * 1e-9  # rounding
    latents[:, 3] = 0.0
    latents[[1, 7, 20_001], 3] = 1.0  # a rare feature, on no multiple of 3
    space = fit_space(latents, None)
    assert space.keep.tolist() == [0, 3]
    X = space(latents)
    rare = latents[:, 3].astype(np.float64)
    np.testing.assert_allclose(X[:, 1], (rare - rare.mean()) / rare.std(), rtol=1e-6)


@pytest.mark.parametrize("n_items", [40, 300])  # fewer items than dimensions, and more
def test_principal_axes_are_the_svd_ones(n_items):
    rng = np.random.default_rng(1)
    latents = (rng.normal(size=(n_items, 6)) @ rng.normal(size=(6, 120))
               + rng.normal(size=(n_items, 120)) * 0.1)
    Z = reduced_space(latents, 4).astype(np.float64)
    S = (latents - latents.mean(axis=0)) / latents.std(axis=0)
    u, s, _ = np.linalg.svd(S, full_matrices=False)
    expected = u[:, :4] * s[:4]
    # The same components up to each axis's sign.
    np.testing.assert_allclose(np.abs(Z), np.abs(expected), atol=1e-3 * s[0])
    grid = principal_components(latents, 3)
    centred = latents - latents.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(grid), np.abs(u[:, :3] * s[:3]), atol=1e-8 * s[0])


def test_directions_that_separate_the_classes_survive_the_reduction():
    """The classes differ only along one dimension of little variance, under 100 dimensions of
    wide noise: the leading components miss it, the class means' direction keeps it, and an
    SVM in the reduced space then separates the classes."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 2000)
    latents = np.hstack([rng.normal(size=(2000, 100)) * rng.uniform(5, 10, 100),
                         (labels * 2 - 1)[:, None] * 0.1 + rng.normal(size=(2000, 1)) * 0.01])
    without = reduced_space(latents, 8)
    with_means = reduced_space(latents, 8, labels)
    assert with_means.shape[1] == 9
    signal = latents[:, -1]
    assert np.abs([np.corrcoef(z, signal)[0, 1] for z in without.T]).max() < 0.2
    assert np.abs([np.corrcoef(z, signal)[0, 1] for z in with_means.T]).max() > 0.95
    data = SampleData(latents.astype(np.float32), labels, labels.copy(), 2)
    sampler = MaxMarginSampler(100, method="paper", random_state=0)
    sampler.fit_dims = 8
    assert np.mean(sampler.fit(data).groups_ == labels) > 0.99


def test_latents_of_low_rank_reduce_to_their_rank(data):
    wide = widened(data, 200)
    assert reduced_space(wide.latents, 64).shape == (len(data), data.latents.shape[1])
    # The class means lie in the items' span: they add no direction.
    assert reduced_space(wide.latents, 64, wide.labels).shape == (len(data), 6)


@pytest.mark.parametrize("method", ["diagql", "paper"])
def test_draws_on_wide_latents_equal_draws_without_the_reduction(data, method):
    """Wide latents of rank 6: their leading components hold all of their spread, so the
    reduced space is a rotation of the standardised latents and every draw is the same as one
    made in all 200 dimensions."""
    wide = widened(data, 200)
    reduced = MaxMarginSampler(60, method=method, random_state=0).fit(wide)
    full = Unreduced(60, method=method, random_state=0).fit(wide)
    np.testing.assert_allclose(reduced.log_ratio_, full.log_ratio_, atol=1e-3)
    assert np.array_equal(reduced.indices_, full.indices_)
    weighted = WeightedSampler(60, random_state=0).fit(wide)
    np.testing.assert_allclose(weighted.weights_,
                               UnreducedWeighted(60, random_state=0).fit(wide).weights_,
                               rtol=1e-3)


@pytest.mark.parametrize("reduced, full", [(EBTreeSampler, UnreducedTree),
                                           (VASSampler, UnreducedVAS)])
def test_distance_samplers_on_wide_latents_equal_their_unreduced_draws(data, reduced, full):
    wide = widened(data, 300)
    args = {} if reduced is EBTreeSampler else {"size": 50}
    assert np.array_equal(reduced(**args, random_state=0).fit(wide).indices_,
                          full(**args, random_state=0).fit(wide).indices_)


def test_reduced_space_still_finds_the_planted_boundary_items(data, planted):
    """Full-rank wide latents: the blobs' 6 dimensions mixed into 300, each with noise of its
    own. The SVM sees 64 of 300 components and must still put the items planted between two
    class centres at the low end of its ratio."""
    wide = widened(data, 300, noise=1.0)
    sampler = MaxMarginSampler(40, j=1, method="paper", random_state=0).fit(wide)
    assert sampler.log_ratio_.shape == (len(data),)
    assert set(planted.tolist()) <= set(sampler.indices_.tolist())


def test_draws_do_not_depend_on_the_latents_units(data):
    """Per-dimension scales from 1e-3 to 1e3 and offsets (a saturated tanh output varies by
    1e-3 about 0.99) give the same draws as the latents themselves."""
    rng = np.random.default_rng(2)
    scale = 10.0 ** rng.uniform(-3, 3, size=data.latents.shape[1])
    shift = rng.uniform(-1, 1, size=data.latents.shape[1])
    rescaled = SampleData((data.latents * scale + shift).astype(np.float32), data.labels,
                          data.predictions, data.n_classes)
    a = MaxMarginSampler(50, random_state=0).fit(data)
    b = MaxMarginSampler(50, random_state=0).fit(rescaled)
    np.testing.assert_allclose(a.log_ratio_, b.log_ratio_, atol=1e-3)
    assert np.array_equal(a.indices_, b.indices_)


# --- saturated probabilities --------------------------------------------------------------------

def test_calibrated_log_probabilities_do_not_underflow():
    """Decision values far from the boundary: Platt's sigmoid underflows to 0 in probability
    space; its log, written out here as -log(1 + e^z), stays finite and ordered."""
    F = np.array([[-900.0, -400.0, 0.0, 400.0, 900.0],
                  [900.0, 400.0, 0.0, -400.0, -900.0]])
    a, b = np.array([1.0, 1.0]), np.array([0.0, 0.0])
    got = _calibrated_log_proba(F, a, b)
    z = a[:, None] * F + b[:, None]  # p_k = 1 / (1 + e^z)
    log_p = -np.logaddexp(0, z).T
    expected = log_p - np.logaddexp.reduce(log_p, axis=1, keepdims=True)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    two = _calibrated_log_proba(F[:1], a[:1], b[:1])  # two classes: [1 - p, p]
    np.testing.assert_allclose(two, np.stack([-np.logaddexp(0, -z[0]), log_p[:, 0]], 1))


@pytest.mark.parametrize("a0, b0", [(20.0, 0.0), (3.0, 10.0), (-40.0, -5.0)])
def test_platt_fit_from_a_far_start_finds_the_optimum(a0, b0):
    """Each fold's sigmoid starts from the last fold's. From a start in the loss's flat tails
    a full Newton step overshoots to a ~ 1e14 (every probability 0 or 1: what 768-dim BERT
    latents got); the fit must reach the optimum, found here by scipy's BFGS."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    F = rng.normal(size=(2, 400)) * 3
    positive = F + rng.normal(size=F.shape) * 2 > 0
    a, b = _platt(F, positive, (np.full(2, a0), np.full(2, b0)))
    for k in range(2):
        n1 = positive[k].sum()
        T = np.where(positive[k], (n1 + 1) / (n1 + 2), 1 / (400 - n1 + 2))

        def loss(ab, k=k, T=T):
            z = ab[0] * F[k] + ab[1]  # p = 1 / (1 + e^z)
            return np.sum(T * np.logaddexp(0, z) + (1 - T) * np.logaddexp(0, -z))

        best = minimize(loss, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
        np.testing.assert_allclose([a[k], b[k]], best, atol=1e-5)


def test_a_saturated_svm_still_spreads_its_ratios():
    """Two classes on a line, a margin apart, and items of either class up to 10,000 margins
    deep: Platt's probabilities there are 0 and 1 to float precision, so probability ratios
    would all tie at infinity and the exemplar end would fall to the item order. The log
    ratios must stay finite, grow with the depth, and pick the deepest items."""
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 300)
    side = np.where(labels == 1, 1.0, -1.0)
    depth = np.where(np.arange(600) % 300 < 260, rng.uniform(0.5, 2, 600),
                     10 ** rng.uniform(2, 4, 600))
    latents = np.stack([side * depth, rng.normal(size=600)], axis=1)
    log_proba = svm_log_proba(latents, labels, 2)
    ratio = log_likelihood_ratio(log_proba, labels)
    assert np.isfinite(ratio).all()
    deep = depth > 50
    for c in (0, 1):
        mine = deep & (labels == c)
        assert spearmanr(ratio[mine], depth[mine])[0] > 0.99
    exemplars = two_ended(labels, ratio, 40, 0, np.random.default_rng(0))
    deepest = {int(i) for c in (0, 1)
               for i in np.flatnonzero(labels == c)[np.argsort(-depth[labels == c])][:20]}
    assert deepest == set(exemplars.tolist())


# --- the default selection's small cases --------------------------------------------------------

def test_a_sample_smaller_than_the_groups_takes_one_item_per_group(data):
    groups = data.labels * 2 + (data.labels != data.predictions)
    n_groups = len(np.unique(groups))
    for n in (3, n_groups):
        chosen = MaxMarginSampler(n, random_state=0).fit(data).indices_
        assert len(chosen) == n == len(np.unique(groups[chosen]))


def test_duplicated_items_tie_and_are_drawn_at_random():
    """Every item twice: each pair has one ratio, so which copy is an incorrect group's most
    boundary item depends on the seed; breaking ties by index would always take the first."""
    data, _ = blobs()
    twice = SampleData(np.vstack([data.latents, data.latents]),
                       np.concatenate([data.labels, data.labels]),
                       np.concatenate([data.predictions, data.predictions]), data.n_classes)
    wrong = twice.labels != twice.predictions
    n_groups = len(np.unique(twice.labels * 2 + wrong))
    ratio = np.concatenate([np.arange(len(data)), np.arange(len(data))]).astype(float)
    second = []
    for seed in range(20):
        seeds = boundary_and_exemplars(twice.latents, twice.labels, twice.predictions, ratio,
                                       n_groups, 1.0, np.random.default_rng(seed))
        second.extend((seeds[wrong[seeds]] >= len(data)).tolist())
    assert 0.2 < np.mean(second) < 0.8
