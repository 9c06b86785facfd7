"""Leverage-corrected variances of the assisted estimator (docs/ARCHITECTURE.md, "Estimates").

The regression estimator's standard error (engine/regression.py) takes one residual variance
σ² per neuron, with one mean degrees-of-freedom correction, and the slope's noise as σ²·uᵀSu.
Where the latent has outliers (a bottleneck before it, an untrained model), a neuron's few
large values sit at high leverage h: the fit follows them, their residuals come out shrunk by
about (1 − h), they read as typical ones, and the intervals ran narrow (an untrained MLP's
bottleneck layers covered 0.78-0.87, benchmarks/README.md, "twenty-second session").

Each sampled row's covariates, its group and the fit rows are known when the query is planned
(the sample is drawn from the profile), so each fit row's leverage is too (``row_weights``).
A row of up to twice its group's mean leverage h̄ keeps the mean correction; an outlier's
residual is restored from its own, with the weight c = (1 − h)^−e: e = 1 (HC2) at 2h̄, 2 (HC3,
the jackknife's) from 4h̄, linear between (HC4's idea, Cribari-Neto 2004, of a power that grows
with h / h̄, capped at HC3's). ``restored`` then takes

    σ² = σ²_mean + max(0, Σ_O c·r² − κ·Σ_O r²) / m

(O the outliers, κ the mean correction's factor per row: their residuals as restored, in place
of as the mean correction read them; never narrower than before), and the slope's noise
σ²·uᵀSu + max(0, Σ_O c·(uᵀz̃)²·r² − σ²·Σ_O (uᵀz̃)²): the sandwich's excess at the rows that
move the slope's correction most. The pass keeps the outliers' rows only (regression.
OutlierRows: a few percent of at most 1,024 fit rows), where weighting every fit row had
doubled the estimate's streaming cost with GROUP BY. HC4 itself (e = h / h̄ up to 4) covered
the outliers' layers but made their expected cosine distance 29-740x the actual; HC3's power
for every row widened the demo's intervals 1.3-2.2x."""
from __future__ import annotations

import numpy as np

# A row's leverage is kept below 1 − 1e-3, so that one row the fit passes through (h → 1: a
# group of one fit row) weighs at most 1e6 and no weight is infinite.
_MAX_LEVERAGE = 1.0 - 1e-3
# A fit row above _OUTLIER_FROM times its group's mean leverage is an outlier, its weight's
# power e is HC2's 1 there and HC3's 2 from _OUTLIER_AT times, linear between. Chosen by
# measurement: every row weighted with e = h / h̄ clipped to [1, 2] covered the bottleneck's
# layers as well but widened the demo's intervals (expected cosine under vas(0.05) 1.18x ->
# 1.30x the actual); these left the demo's and the ResNet's calibration as it was
# (benchmarks/README.md, "twenty-second session").
_OUTLIER_FROM, _OUTLIER_AT = 2.0, 4.0
# ``row_weights``' columns: 1, c, c·(uᵀz̃)²·share, (uᵀz̃)²·share.
WEIGHTS = 4


def row_weights(z: np.ndarray, codes: np.ndarray | None, population_z: list,
                fit: np.ndarray | None, ridge: float) -> np.ndarray:
    """Each sampled row's four weights (n × 4), 0 but on the fit rows that are outliers (h >
    twice their group's mean h̄_g): 1, c = (1 − h)^−e, c·(uᵀ(z − z̄_g))²·share and (uᵀ(z −
    z̄_g))²·share, share a group's Σ(uᵀ(z − z̄_g))² over all its rows over that of its fit rows
    (every s-th, engine/prediction.py). ``z``: the rows' latent covariates (n × p, in the plan's
    item order); ``codes``: their group codes (None: one group); ``population_z``: each code's
    mean covariates over its matching items; ``fit``: which rows are fit rows (None: all).
    h = 1/m_g + z̃ᵀ(S_fit + ridge)⁻¹z̃, the hat value of the pooled ridge fit with one intercept
    per group, z̃ centred on the group's fit rows; e = 1 + clip((h / h̄_g − 2) / 2, 0, 1);
    u = (S + ridge)⁻¹(z̄_U,g − z̄_g) over all the sampled rows, as regression.assisted takes it."""
    z = np.asarray(z, dtype=np.float64)
    n, p = z.shape
    groups = len(population_z)
    codes = np.zeros(n, np.int64) if codes is None else np.asarray(codes, np.int64)
    fit = np.ones(n, dtype=bool) if fit is None else np.asarray(fit, dtype=bool)
    out = np.zeros((n, WEIGHTS))
    if n == 0:
        return out
    fit_codes = codes[fit]
    fit_counts, _, fit_centred = _centred(z[fit], fit_codes, groups)
    solved = np.linalg.solve(fit_centred.T @ fit_centred + ridge * np.eye(p), fit_centred.T)
    h = 1.0 / np.maximum(fit_counts[fit_codes], 1) + np.einsum("ip,pi->i", fit_centred, solved)
    h = np.minimum(h, _MAX_LEVERAGE)
    mean_h = np.bincount(fit_codes, weights=h, minlength=groups) / np.maximum(fit_counts, 1)
    ratio = h / mean_h[fit_codes]
    power = 1.0 + np.clip((ratio - _OUTLIER_FROM) / (_OUTLIER_AT - _OUTLIER_FROM), 0.0, 1.0)
    counts, centred, u = corrections(z, codes, population_z, ridge)
    moved = np.einsum("ip,ip->i", centred, u[codes]) ** 2
    every = np.bincount(codes, weights=moved, minlength=groups)
    on_fit = np.bincount(fit_codes, weights=moved[fit], minlength=groups)
    # Where the fit rows hold none of it (u = 0: a group whose sample mean is its population's),
    # their count's share scales instead; the term is then 0 or near it anyway.
    share = np.where(on_fit > 0, every / np.where(on_fit > 0, on_fit, 1.0),
                     counts / np.maximum(fit_counts, 1))
    outlier = ratio > _OUTLIER_FROM
    rows = np.flatnonzero(fit)[outlier]
    own = (1.0 - h[outlier]) ** -power[outlier]
    scaled = moved[rows] * share[codes[rows]]
    out[rows] = np.stack([np.ones(len(rows)), own, own * scaled, scaled], axis=1)
    return out


def corrections(z: np.ndarray, codes: np.ndarray, population_z: list, ridge: float) -> tuple:
    """(each group's row count, the rows centred on their group's mean, each group's
    correction direction u = (S + ridge)⁻¹(z̄_U,g − z̄_g), groups × p, 0 for a group with no
    row): S the rows' group-centred cross-product, z̄_U,g ``population_z[g]``. The pooled
    slope's directions are their span (regression.directions), and u weighs a row's part in
    the slope's noise (``row_weights``)."""
    groups, p = len(population_z), z.shape[1]
    counts, means, centred = _centred(z, codes, groups)
    deltas = np.asarray(population_z, dtype=np.float64).reshape(groups, p) - means
    u = np.linalg.solve(centred.T @ centred + ridge * np.eye(p), deltas.T).T
    u[counts == 0] = 0.0
    return counts, centred, u


def restored(sums, sigma2: np.ndarray, noise: float, kappa: float, m: int, vbar: np.ndarray,
             zbar: np.ndarray, slope: np.ndarray) -> tuple:
    """(σ², the slope's noise) of one group with its outlier rows' residuals restored from
    their own leverage (the module's docstring): ``sums`` the outliers' rows (regression.
    OutlierRows, ``row_weights``' four columns), ``sigma2`` the mean correction's σ² and
    ``kappa`` its factor per row (σ² = κ·Σr² / m), ``noise`` uᵀSu, ``m`` the fit rows, ``vbar``
    and ``zbar`` their means, ``slope`` the fit's B (p × neurons)."""
    ones, own, moved_own = (weighted_rss(sums.column(j), vbar, zbar, slope) for j in range(3))
    moved = float(sums.column(3).w)
    sigma2 = sigma2 + np.maximum(own - kappa * ones, 0.0) / m
    return sigma2, sigma2 * noise + np.maximum(moved_own - sigma2 * moved, 0.0)


def _centred(z: np.ndarray, codes: np.ndarray, groups: int) -> tuple:
    """(each group's row count, its mean row, the rows centred on their group's mean)."""
    counts = np.bincount(codes, minlength=groups).astype(np.float64)
    # One bincount per column: np.add.at took 15 ms a call on 100,000 rows.
    sums = np.zeros((groups, z.shape[1]))
    for j, column in enumerate(z.T):
        sums[:, j] = np.bincount(codes, weights=column, minlength=groups)
    means = sums / np.maximum(counts, 1)[:, None]
    return counts, means, z - means[codes]


def weighted_rss(sums, vbar: np.ndarray, zbar: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """Σ c·r² per neuron, r = (v − v̄) − (z − z̄)ᵀB the fit's residual (v̄, z̄ the fit rows'
    unweighted means, B the slope, p × neurons), from one group's weighted sums
    (regression.OutlierRows' ``column``), clipped at 0."""
    w, wv, wz = float(sums.w), sums.v.numpy(), sums.z.numpy()
    svv = sums.vv.numpy() - 2 * vbar * wv + w * vbar ** 2
    szv = sums.zv.numpy() - np.outer(zbar, wv) - np.outer(wz, vbar) + w * np.outer(zbar, vbar)
    szz = sums.zz.numpy() - np.outer(zbar, wz) - np.outer(wz, zbar) + w * np.outer(zbar, zbar)
    return np.maximum(residual_ss(svv, szv, szz, slope), 0.0)


def residual_ss(svv: np.ndarray, szv: np.ndarray, szz: np.ndarray,
                slope: np.ndarray) -> np.ndarray:
    """Σr² per neuron of r = v − zᵀB from centred (or weighted) sums: Svv − 2·BᵀSzv + BᵀSzzB
    (diagonals only; B p × neurons), not clipped: the fit's (regression.assisted) and the
    outliers' (``weighted_rss``)."""
    return svv - 2 * np.einsum("pj,pj->j", slope, szv) + \
        np.einsum("pj,pj->j", slope, szz @ slope)
