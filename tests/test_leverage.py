"""The assisted fit's leverage weights (engine/leverage.py) against the hat matrix of the
pooled ridge fit written out, the pass's outlier sums against numpy on the rows, and the
intervals they give on a synthetic population whose residuals grow with leverage."""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from diagql.engine import estimate
from diagql.engine.aggregates import MeanState
from diagql.engine.leverage import row_weights, weighted_rss
from diagql.engine.regression import RIDGE
from tests.test_estimate_assisted import _numpy_leverage


def _rows(seed: int, n: int = 60, p: int = 3):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, p))
    Z[7] = [6.0, -5.0, 4.0]  # a latent outlier: its leverage is far above its group's mean
    codes = rng.integers(0, 3, size=n)
    return rng, Z, codes


def test_weights_are_the_hat_matrix_s_outliers_and_the_slope_s_sandwich_share():
    rng, Z, codes = _rows(0)
    fit = np.arange(len(Z)) % 2 == 1
    z_pop = [rng.standard_normal(3) * 0.3 for _ in range(3)]
    got = row_weights(Z, codes, z_pop, fit, RIDGE)
    c = _numpy_leverage(Z[fit], codes[fit], RIDGE)
    outliers = np.flatnonzero(fit)[c > 0]
    assert 7 in outliers and 0 < len(outliers) < fit.sum() // 4
    assert np.all(got[np.setdiff1d(np.arange(len(Z)), outliers)] == 0)
    np.testing.assert_array_equal(got[outliers, 0], 1.0)
    np.testing.assert_allclose(got[outliers, 1], c[c > 0], rtol=1e-10)
    # The sandwich's part: (uᵀz̃)², u = (S + ridge)⁻¹(z̄_U − z̄) on every row of each group,
    # z̃ centred on all its rows, scaled by all its rows' Σ(uᵀz̃)² over its fit rows'.
    centred = Z.copy()
    for g in range(3):
        centred[codes == g] -= Z[codes == g].mean(axis=0)
    A = centred.T @ centred + RIDGE * np.eye(3)
    for g in range(3):
        u = np.linalg.solve(A, z_pop[g] - Z[codes == g].mean(axis=0))
        moved = (centred @ u) ** 2
        share = moved[codes == g].sum() / moved[(codes == g) & fit].sum()
        mine = outliers[codes[outliers] == g]
        np.testing.assert_allclose(got[mine, 3], moved[mine] * share, rtol=1e-10)
        np.testing.assert_allclose(got[mine, 2], got[mine, 1] * got[mine, 3], rtol=1e-10)


def test_only_outliers_are_weighted_and_a_far_one_takes_hc3_s_power():
    """Rows of up to twice their group's mean leverage keep the mean correction (weight 0
    here); the far outlier's weight is 1/(1 − h)²."""
    _, Z, codes = _rows(1, n=200)
    D = np.hstack([np.eye(3)[codes], Z])
    penalty = np.diag([0.0] * 3 + [RIDGE] * 3)
    h = np.einsum("ij,ji->i", D, np.linalg.solve(D.T @ D + penalty, D.T))
    got = row_weights(Z, codes, [np.zeros(3)] * 3, None, RIDGE)
    np.testing.assert_allclose(got[7, 1], (1 - h[7]) ** -2, rtol=1e-9)
    assert np.mean(got[:, 0] > 0) < 0.1


def test_the_streamed_outlier_sums_give_numpy_s_weighted_residual_sums_of_squares():
    """Grouped float32 batches with fit rows, in two states merged: each weight column's
    Σ w·r² for any slope B, from the sums of the rows of nonzero first weight, equals numpy's
    on those rows (each group's values and covariates centred on its fit rows' means)."""
    rng, Z, codes = _rows(2, n=150)
    Y = (Z @ rng.standard_normal((3, 5)) + rng.standard_normal((150, 5))).astype(np.float32)
    fit = rng.random(150) < 0.6
    weights = rng.random((150, 4)) + 0.5
    weights[rng.random(150) < 0.5] = 0.0  # rows that are no outliers
    states = [MeanState(5, groups=3, covariates=3) for _ in range(2)]
    for start in range(0, 150, 16):
        part = slice(start, start + 16)
        assert states[start // 80].update(
            torch.from_numpy(Y[part]), torch.from_numpy(codes[part]), torch.from_numpy(Z[part]),
            fit=torch.from_numpy(fit[part]), weights=torch.from_numpy(weights[part]))
    state = states[0].merge(states[1])
    B = rng.standard_normal((3, 5))
    for g in range(3):
        rows = fit & (codes == g)
        v, z = Y[rows].astype(np.float64), Z[rows]
        vbar, zbar = v.mean(axis=0), z.mean(axis=0)
        resid = (v - vbar) - (z - zbar) @ B
        part = state.group(g)
        assert part.fit_sums().n == rows.sum()
        for k in range(4):
            want = (weights[rows, k][:, None] * resid ** 2).sum(axis=0)
            np.testing.assert_allclose(weighted_rss(part.weighted.column(k), vbar, zbar, B),
                                       want, rtol=1e-9)


def test_outlier_rows_hold_their_rows_not_sums_for_every_group():
    """A GROUP BY over 100 groups of a wide layer with outliers in two of them keeps those
    rows only (their weight columns' sums are made when read): streamed as sums, each group
    had held 4 × (p + 2) rows' worth of the layer whatever its outliers (two sets of 480 MB
    for 10 classes of a 131,072-wide conv map)."""
    rng = np.random.default_rng(3)
    n, p, width, groups = 12, 3, 5000, 100
    Z, Y = rng.standard_normal((n, p)), rng.standard_normal((n, width)).astype(np.float32)
    codes = np.repeat([7, 42], n // 2)
    weights = np.zeros((n, 4))
    weights[[1, 8]] = rng.random((2, 4)) + 0.5  # one outlier in each of the two groups
    state = MeanState(width, groups=groups, covariates=p)
    assert state.update(torch.from_numpy(Y), torch.from_numpy(codes), torch.from_numpy(Z),
                        weights=torch.from_numpy(weights))
    kept = sum(t.numel() * t.element_size() for parts in state.weighted.rows.values()
               for part in parts for t in part)
    assert kept <= 2 * (width + p + 4) * 8
    part = state.group(42).fit_sums().weighted.column(2)
    assert float(part.w) == weights[8, 2]
    np.testing.assert_allclose(part.zv.numpy(), weights[8, 2] * np.outer(Z[8], Y[8]), rtol=1e-12)


def test_intervals_cover_where_the_residuals_grow_with_leverage():
    """A heavy-tailed latent whose outliers carry the largest errors (sd 0.2 + z₁²): one
    residual variance with a mean degrees-of-freedom correction covered 0.887 of 8,000
    intervals of random samples of 30 (it reads the outliers' shrunk residuals as theirs);
    leverage-weighted, 0.919."""
    rng = np.random.default_rng(0)
    N, p, d, n = 3000, 3, 40, 30
    Z = rng.standard_t(3, size=(N, p))
    Z = (Z - Z.mean(axis=0)) / Z.std(axis=0)
    Y = Z @ rng.normal(size=(p, d)) + rng.normal(size=(N, d)) * (0.2 + Z[:, :1] ** 2)
    truth, z_pop = Y.mean(axis=0), Z.mean(axis=0)
    covered = {"unweighted": [], "leverage": []}
    for _ in range(200):
        s = np.sort(rng.choice(N, n, replace=False))
        weights = torch.from_numpy(row_weights(Z[s], None, [z_pop], None, RIDGE))
        for how, shares in covered.items():
            state = MeanState(d, covariates=p)
            state.update(torch.from_numpy(Y[s]), z=torch.from_numpy(Z[s]),
                         **({"weights": weights} if how == "leverage" else {}))
            fitted = estimate.fit({None: state}, {None: N}, {None: z_pop})[None]
            half = stats.t.ppf(0.975, fitted.df) * fitted.se
            shares.append(np.mean(np.abs(fitted.mean - truth) <= half))
    assert np.mean(covered["unweighted"]) < 0.90
    assert np.mean(covered["leverage"]) > 0.91
