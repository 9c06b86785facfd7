"""Which items the profile pass fits the blocks' directions on (model/auxiliaries.py,
``spread_items``; model/profile.py, ``fit_part`` then ``projected_part``): items spread over the
whole data, so that data sorted by class gives every class's directions; checked on the digits
sorted by label against a plain torch forward pass and numpy's SVD of the spread items' rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import diagql
from diagql.model import auxiliaries

FIT = 300  # of 1,797 sorted digits: the first 300 would be classes 0 and 1 alone


@pytest.mark.parametrize("n,count", [(1797, 300), (10, 3), (7, 7), (5, 9), (100_000, 2000)])
def test_spread_items_take_one_item_from_each_equal_run(n, count):
    items = auxiliaries.spread_items(n, count)
    if count >= n:
        assert items.tolist() == list(range(n))
        return
    assert len(items) == count and np.all(np.diff(items) > 0)
    runs = np.arange(count + 1) * n // count
    assert np.all((runs[:-1] <= items) & (items < runs[1:]))  # one in each run of n / count
    np.testing.assert_array_equal(items, auxiliaries.spread_items(n, count))  # seeded
    if n // count >= 5:  # within a run the draw is not one fixed offset (a stride)
        assert len(set((items - runs[:-1]).tolist())) > (n // count) // 2


@pytest.fixture(scope="module")
def sorted_digits(digits):
    X, y = digits
    order = torch.argsort(y, stable=True)
    return X[order].clone(), y[order].clone()


@pytest.fixture(scope="module")
def profile(cnn, sorted_digits):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(auxiliaries, "FIT_ITEMS", FIT)
        conn = diagql.connect(cnn, sorted_digits, batch_size=128, cache_dir=False,
                              progress=False)
        return conn.profile


def _rows(cnn, X, upto: int) -> np.ndarray:
    with torch.no_grad():
        return cnn[:upto](X.clone()).flatten(1).double().numpy()


def test_the_profile_of_items_passed_in_two_parts_is_in_index_order(profile, cnn,
                                                                     sorted_digits):
    """The spread items' part and the rest's are put back in index order: labels,
    predictions, confidence, the latent (the input of the last Linear) and the logits."""
    X, y = sorted_digits
    with torch.no_grad():
        latent = cnn[:8](X.clone())
        logits = cnn[8](latent)
    probs = torch.softmax(logits.double(), dim=1)
    np.testing.assert_array_equal(profile.labels, y.numpy())
    np.testing.assert_array_equal(profile.predictions, logits.argmax(dim=1).numpy())
    np.testing.assert_allclose(profile.confidence, probs.max(dim=1).values.numpy(), rtol=1e-6)
    np.testing.assert_allclose(profile.latents, latent.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(profile.logits, logits.numpy(), rtol=1e-5, atol=1e-5)


def test_on_sorted_data_the_directions_are_the_pca_of_items_spread_over_every_class(
        profile, cnn, sorted_digits):
    X, y = sorted_digits
    spread = auxiliaries.spread_items(len(X), FIT)
    # Every class gets its share of the fit (the first FIT items hold two classes).
    share = np.bincount(y.numpy()[spread], minlength=10) / FIT
    np.testing.assert_allclose(share, np.bincount(y.numpy(), minlength=10) / len(X), atol=0.01)
    assert len(np.unique(y.numpy()[:FIT])) == 2
    a = {a.layer: a for a in profile.auxiliaries}["6"]  # Linear(72, 32): an exact SVD
    rows = _rows(cnn, X, 7)
    centred = rows[spread] - rows[spread].mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    assert a.fitted_on == FIT and a.basis.shape == (32, 32)
    np.testing.assert_allclose(a.mean, rows[spread].mean(axis=0), rtol=1e-5, atol=1e-5)
    # The leading directions, each up to its sign (well separated: a unique SVD there).
    lead = 8
    assert np.all(singular[:lead] / singular[1:lead + 1] > 1.02)
    np.testing.assert_allclose(np.abs(np.sum(a.basis[:, :lead] * vt[:lead].T, axis=0)), 1.0,
                               atol=1e-4)
    np.testing.assert_allclose(a.z, (rows - a.mean) @ a.basis, rtol=0, atol=2e-4)
    # Every item's winner, the spread items' and the rest's put back in item order.
    winners = profile.winners[a.key]
    assert winners.dtype == np.uint8
    np.testing.assert_array_equal(winners, rows.argmax(axis=1))
    # Not the first items' fit, which sees classes 0 and 1 only.
    first = rows[:FIT] - rows[:FIT].mean(axis=0)
    v_first = np.linalg.svd(first, full_matrices=False)[2]
    assert np.abs(np.sum(a.basis[:, :lead] * v_first[:lead].T, axis=0)).min() < 0.9
    # The wider blocks (a randomised range finder): as much of the spread rows' variance.
    for layer, upto in (("0", 1), ("2", 3)):
        a = {a.layer: a for a in profile.auxiliaries}[layer]
        rows = _rows(cnn, X, upto)
        centred = rows[spread] - rows[spread].mean(axis=0)
        np.testing.assert_allclose(a.mean, rows[spread].mean(axis=0), rtol=1e-5, atol=1e-5)
        k = a.basis.shape[1]
        best = (np.linalg.svd(centred, compute_uv=False)[:k] ** 2).sum()
        assert ((centred @ a.basis) ** 2).sum() >= 0.995 * best


def test_the_spread_fit_explains_more_of_every_item_than_the_first_items_fit(
        profile, cnn, sorted_digits):
    """What the change is for: the share of every item's variance (all classes) that the
    projection misses, against a basis fitted on the first FIT items (numpy)."""
    X, _ = sorted_digits
    a = {a.layer: a for a in profile.auxiliaries}["2"]
    rows = _rows(cnn, X, 3)
    k = a.basis.shape[1]
    centred = rows - rows.mean(axis=0)
    total = (centred ** 2).sum()
    v_first = np.linalg.svd(rows[:FIT] - rows[:FIT].mean(axis=0), full_matrices=False)[2][:k].T
    missed_spread = 1 - ((centred @ a.basis.astype(np.float64)) ** 2).sum() / total
    missed_first = 1 - ((centred @ v_first) ** 2).sum() / total
    assert missed_spread < 0.5 * missed_first, (missed_spread, missed_first)


def test_explain_says_which_items_the_directions_were_fitted_on(cnn, sorted_digits):
    X, y = sorted_digits
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(auxiliaries, "FIT_ITEMS", FIT)
        conn = diagql.connect(cnn, (X[:400], y[:400]), batch_size=128, cache_dir=False,
                              progress=False)
        spread = dict(conn.query("EXPLAIN AVG NEURONS IN 2 USING SAMPLE random(0.1)")
                      .plan.explain())["estimator"]
        patch.setattr(auxiliaries, "FIT_ITEMS", 1000)  # more than the 400 items: all of them
        every = diagql.connect(cnn, (X[:400], y[:400]), batch_size=128, cache_dir=False,
                               progress=False)
        whole = dict(every.query("EXPLAIN AVG NEURONS IN 2 USING SAMPLE random(0.1)")
                     .plan.explain())["estimator"]
    assert f"fitted on {FIT} items spread over the data" in spread
    assert "fitted on every item" in whole
