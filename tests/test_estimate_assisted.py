"""The model-assisted estimator (engine/regression.py) against an independent numpy
implementation on materialised activations, its covariates against a numpy PCA, and its
intervals' coverage on a synthetic population selected by the covariates, where the truth is
known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import diagql
from diagql.engine import covariates as covariates_module
from diagql.engine import extrapolation
from diagql.engine.covariates import covariates
from diagql.engine import estimate
from diagql.engine.estimate import p_in_topk
from diagql.engine.regression import (
    RIDGE,
    CrossSums,
    GroupSums,
    assisted,
    corrected_mean,
    of_rows,
)


@pytest.fixture(scope="module")
def db(mlp, digits):
    return diagql.connect(mlp, digits, batch_size=256)


def _layer(model, X, upto: int = 2) -> np.ndarray:
    """encoder.1's output (``upto`` 1: encoder.0's, the flattened input), by calling the
    submodules (no hooks, no DiagQL)."""
    with torch.no_grad():
        return model.encoder[:upto](X).double().numpy()


def _numpy_leverage(Z, groups, ridge):
    """Each row's leverage weight (engine/leverage.py) written out: h the diagonal of the hat
    matrix of the design [one indicator per group | Z] with the ridge on Z's columns only, kept
    below 1 − 1e-3; a row above twice its group's mean h is an outlier, its weight
    c = (1 − h)^−e with e = 1 (HC2) at twice its group's mean h and 2 (HC3) from four times,
    linear between; 0 for the other rows."""
    keys = sorted(set(groups.tolist()))
    idx = np.searchsorted(keys, groups)
    D = np.hstack([np.eye(len(keys))[idx], Z])
    penalty = np.diag([0.0] * len(keys) + [ridge] * Z.shape[1])
    h = np.minimum(np.einsum("ij,ji->i", D, np.linalg.solve(D.T @ D + penalty, D.T)), 1 - 1e-3)
    ratio = h / np.array([h[idx == i].mean() for i in range(len(keys))])[idx]
    return np.where(ratio > 2, (1 - h) ** -(1 + np.clip((ratio - 2) / 2, 0.0, 1.0)), 0.0)


def _numpy_restored(sigma2, kappa, m, c, r, moved):
    """σ² and the slope's noise's excess with the outliers' (c > 0) residuals r restored:
    σ² + max(0, Σ c·r² − κ·Σ_O r²) / m, and max(0, Σ c·moved·r² − σ²·Σ_O moved)."""
    out = c > 0
    sigma2 = sigma2 + np.maximum((c[:, None] * r ** 2).sum(axis=0)
                                 - kappa * (r[out] ** 2).sum(axis=0), 0.0) / m
    excess = np.maximum((c[:, None] * moved[:, None] * r ** 2).sum(axis=0)
                        - sigma2 * moved[out].sum(), 0.0)
    return sigma2, excess


def _group_centred(Y, Z, groups):
    """(the group keys, sorted; Z and Y each centred on its group's mean)."""
    keys = sorted(set(groups.tolist()))
    Zc, Yc = Z.copy(), Y.copy()
    for g in keys:
        m = groups == g
        Zc[m] -= Z[m].mean(axis=0)
        Yc[m] -= Y[m].mean(axis=0)
    return keys, Zc, Yc


def _numpy_ridge(Y, Z, groups, z_pop):
    """The ridge the fit's rows choose (engine/ridge.py) written out with matrices: for each
    ridge λ of the grid, each group's correction δᵀB_λ has the variance σ²·δᵀA⁻¹SA⁻¹δ and the
    bias λ·δᵀA⁻¹β (A = S + λ, β and σ² by least squares), its square estimated as bias² −
    σ²·λ²·δᵀA⁻¹S⁻¹A⁻¹δ clipped at 0; their sum per neuron over its spread Σ(y − ȳ)²/free,
    averaged over the groups and the neurons that vary, is the score; the least score is
    taken where it is under a tenth of the first ridge's (10), else 10."""
    keys, Zc, Yc = _group_centred(Y, Z, groups)
    p = Z.shape[1]
    free = len(Y) - len(keys)
    if free <= p + 3:
        return 10.0
    S = Zc.T @ Zc
    beta = np.linalg.solve(S, Zc.T @ Yc)
    sigma2 = ((Yc - Zc @ beta) ** 2).sum(axis=0) / (free - p)
    spread = (Yc ** 2).sum(axis=0) / free
    live = spread > 1e-12 * spread.max()
    grid = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
    scores = []
    for ridge in grid:
        A_inv = np.linalg.inv(S + ridge * np.eye(p))
        total = 0.0
        for g in keys:
            delta = z_pop[g] - Z[groups == g].mean(axis=0)
            u = A_inv @ delta
            variance = sigma2 * (u @ S @ u)
            bias2 = (ridge * u @ beta) ** 2 - sigma2 * ridge ** 2 * (u @ np.linalg.solve(S, u))
            total = total + (variance + np.maximum(bias2, 0.0))[live] / spread[live]
        scores.append(total.mean() / len(keys))
    best = int(np.argmin(scores))
    return grid[best] if scores[best] < 0.1 * scores[0] else 10.0


def _numpy_assisted(Y, Z, groups, z_pop, n_pop, ridge, leverage=False):
    """The regression estimator written out: group-centred ridge slope on the rows, each
    group's mean corrected by (population mean − sample mean) of Z, and its model variance.
    σ² is the residual variance with the fit's mean degrees-of-freedom correction; with
    ``leverage``, as a query's pass has it (engine/leverage.py), the latent outliers' residuals
    are restored in σ² and in the slope's noise (``_numpy_restored``)."""
    keys, Zc, Yc = _group_centred(Y, Z, groups)
    p = Z.shape[1]
    S = Zc.T @ Zc
    A = S + ridge * np.eye(p)
    B = np.linalg.lstsq(A, Zc.T @ Yc, rcond=None)[0]
    resid = Yc - Zc @ B
    p_eff = np.trace(S @ np.linalg.inv(A))
    free = len(Y) - len(keys)
    # The leverage weights are the plan's, made before the fit's rows chose a ridge.
    c = _numpy_leverage(Z, groups, RIDGE) if leverage else None
    out = {}
    for g in keys:
        m = groups == g
        n = int(m.sum())
        delta = z_pop[g] - Z[m].mean(axis=0)
        mean = Y[m].mean(axis=0) + delta @ B
        inflate = free / (free - p_eff)
        sigma2 = (resid[m] ** 2).sum(axis=0) / (n - 1) * inflate
        excess = None
        if leverage:  # the rows' weights are the plan's: their u is RIDGE's
            u = np.linalg.solve(S + RIDGE * np.eye(p), delta)
            sigma2, excess = _numpy_restored(sigma2, n * inflate / (n - 1), n, c[m], resid[m],
                                             (Zc[m] @ u) ** 2)
        se = _numpy_se(sigma2, Zc, Zc, Yc, delta, (n_pop[g] - n) / n_pop[g] / n, ridge,
                       excess)
        out[g] = (mean, se)
    return out


def _numpy_se(sigma2, Zc, Zc_fit, Yc_fit, delta, sampling, ridge, excess=None):
    """A group's standard errors written out: σ²·(sampling + uᵀSu), u = (S + ridge)⁻¹δ on
    every row's centred covariates Zc (the shrunk slope's noise), plus what the shrinkage
    may leave of the selection's bias, ridge²·Σₖ (eₖᵀu)²·max(σ²/ridge, β̂ₖ²): eₖ the
    eigendirections of the fit rows' centred covariates, β̂ₖ the least-squares slope of
    their values on the directions of eigenvalue s ≥ ridge (orthogonal columns: each alone)
    less its variance σ²/s, clipped at 0, and 0 on the others. ``excess``: what the
    outliers' own residuals add to the slope's noise."""
    p = Zc.shape[1]
    S = Zc.T @ Zc
    u = np.linalg.solve(S + ridge * np.eye(p), delta)
    s, E = np.linalg.eigh(Zc_fit.T @ Zc_fit)
    good = s >= RIDGE  # where the rows hold RIDGE's information, whatever the fit's ridge
    shown = np.zeros((p, Yc_fit.shape[1]))
    if good.any():
        slopes = np.linalg.lstsq(Zc_fit @ E[:, good], Yc_fit, rcond=None)[0]
        shown[good] = np.maximum(slopes ** 2 - sigma2 / s[good][:, None], 0.0)
    prior = np.maximum(sigma2 / ridge, shown)
    noise = sigma2 * (u @ S @ u) + (0.0 if excess is None else excess)
    return np.sqrt(sigma2 * sampling + noise + ridge ** 2 * ((E.T @ u) ** 2) @ prior)


def _numpy_widening(known, Z, items, matching, groups, z_pop, n_pop, share, ridge=RIDGE):
    """The extrapolation check written out (engine/extrapolation.py): the same fit of values
    known for every item against their matching items' means; each group's ratio of squared
    misses to squared standard errors over its m columns, shrunk toward the query's pooled
    ratio over M columns as if from 32 more checks, (m·own + 32·pooled) / (m + 32); its
    standard errors widen by √(1 + share·(ratio − 1)) once that is past 1 + 3√(2/min(m + 32,
    M)); the fit at the query's ``ridge``. Returns group -> factor."""
    fitted = _numpy_assisted(known[items], Z[items], groups[items], z_pop, n_pop, ridge)
    own = {}
    for g, (m, se) in fitted.items():
        truth = known[matching[groups[matching] == g]].mean(axis=0)
        own[g] = (((m - truth) ** 2).sum(), (se ** 2).sum(), len(se))
    miss, spread, checks = (sum(o[i] for o in own.values()) for i in range(3))
    pooled = miss / spread
    out = {}
    for g, (m_g, s_g, c_g) in own.items():
        ratio = (c_g * m_g / s_g + 32 * pooled) / (c_g + 32)
        judged = min(c_g + 32, checks)
        out[g] = 1.0 if ratio <= 1 + 3 * np.sqrt(2 / judged) else np.sqrt(1 + share * (ratio - 1))
    return out


def test_covariates_are_the_whitened_leading_principal_components(db):
    profile = db.profile
    z = covariates(profile)
    X = profile.latents.astype(np.float64)
    sd = X.std(axis=0)
    S = (X[:, sd > 1e-6 * sd.max()] - X[:, sd > 1e-6 * sd.max()].mean(axis=0)) / \
        sd[sd > 1e-6 * sd.max()]
    U = np.linalg.svd(S, full_matrices=False)[0]
    p = covariates_module.DIMS
    expected = U[:, :p] * np.sqrt(len(S))  # unit variance each
    assert z.shape == (len(S), p)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-9)
    # The same components up to sign.
    signs = np.sign((z * expected).sum(axis=0))
    np.testing.assert_allclose(z * signs, expected, atol=1e-6)
    assert covariates(profile) is z  # once per profile


def test_query_answer_is_the_regression_estimator_written_in_numpy(db, mlp, digits):
    X, y = digits
    query = ("AVG NEURONS IN encoder.0 WHERE class IN (2, 3, 5) GROUP BY class "
             "USING SAMPLE maxmargin(0.1)")
    result = db.query(query)
    profile, sample = db.profile, db.sample("maxmargin(0.1)")
    labels = y.numpy()
    chosen = sample[np.isin(labels[sample], [2, 3, 5])]
    Y = _layer(mlp, X, 1)
    z = covariates(profile)
    pop = {g: np.flatnonzero(labels == g) for g in (2, 3, 5)}
    z_pop = {g: z[items].mean(axis=0) for g, items in pop.items()}
    ridge = _numpy_ridge(Y[chosen], z[chosen], labels[chosen], z_pop)
    want = _numpy_assisted(Y[chosen], z[chosen], labels[chosen], z_pop,
                           {g: len(items) for g, items in pop.items()}, ridge, leverage=True)
    # encoder.0 (the flattened input) is in no block: the fit is checked on the latent's
    # next components (encoder.1 and encoder.3 are blocks, the latent's holder opened).
    widen = _numpy_widening(extrapolation.latent_minor(profile).astype(np.float64), z, chosen,
                            np.flatnonzero(np.isin(labels, [2, 3, 5])), labels, z_pop,
                            {g: len(items) for g, items in pop.items()}, extrapolation.WHOLE_SHARE,
                            ridge)
    for g in (2, 3, 5):
        part = result.groups[g]
        mean, se = want[g]
        se = se * widen[g]
        # The rows are float32: a pass in other batches (some of these items' rows may come
        # from an earlier test's pass, through the shared cache) differs by ~1e-7 relative.
        np.testing.assert_allclose(part.values, mean, rtol=1e-6, atol=1e-7)
        est = part.estimate
        assert est.reliable and est.estimator == "assisted"  # maxmargin is not uniform
        n = int((labels[chosen] == g).sum())
        half = stats.t.ppf(0.975, n - 1) * se
        live = se > 0  # a neuron silent over the sample has the rule-of-three floor instead
        np.testing.assert_allclose((est.ci_high - est.ci_low)[live] / 2, half[live], rtol=1e-6)
        assert np.all(est.ci_low <= part.values) and np.all(part.values <= est.ci_high)


def test_plain_estimator_answers_with_the_sample_mean(db, mlp, digits):
    X, y = digits
    db.execute("SET estimator = plain")
    try:
        result = db.query("AVG NEURONS IN encoder.1 WHERE class = 4 USING SAMPLE maxmargin(0.1)")
        sample = db.sample("maxmargin(0.1)")
        chosen = sample[y.numpy()[sample] == 4]
        np.testing.assert_allclose(result.values, _layer(mlp, X)[chosen].mean(axis=0), atol=1e-6)
        assert result.estimate.reliable is False and result.estimate.estimator == "plain"
        assert "does not draw uniformly" in str(result)
    finally:
        db.execute("SET estimator = assisted")
    with pytest.raises(diagql.DiagQLError, match="estimator must be one of assisted, plain"):
        db.execute("SET estimator = fancy")


def test_argmax_shares_are_the_regression_of_the_one_hot_winners(mlp, digits, monkeypatch):
    """Where the profile keeps no winners (none fit its budget here; another model's layer),
    ARGMAX's assisted shares are the regression estimator of each neuron's one-hot winner."""
    from diagql.model import winners

    X, y = digits
    monkeypatch.setattr(winners, "BUDGET", 0)
    db = diagql.connect(mlp, digits, batch_size=256, cache_dir=False, progress=False)
    assert not db.profile.winners
    result = db.query("ARGMAX NEURONS IN encoder.1 WHERE class = 6 USING SAMPLE stratified(0.2)")
    sample = db.sample("stratified(0.2)")
    labels = y.numpy()
    chosen = sample[labels[sample] == 6]
    Y = _layer(mlp, X)
    onehot = np.eye(Y.shape[1])[Y[chosen].argmax(axis=1)]
    z = covariates(db.profile)
    everyone = np.flatnonzero(labels == 6)
    z_pop = {0: z[everyone].mean(axis=0)}
    ridge = _numpy_ridge(onehot, z[chosen], np.zeros(len(chosen), int), z_pop)
    mean, _ = _numpy_assisted(onehot, z[chosen], np.zeros(len(chosen), int), z_pop,
                              {0: len(everyone)}, ridge)[0]
    shares = np.clip(mean, 0, None) / np.clip(mean, 0, None).sum()
    np.testing.assert_allclose(result.values, shares, atol=1e-9)
    assert result.estimate.reliable and 0 <= result.estimate.expected <= 1


def test_a_cell_the_covariates_predict_closely_takes_the_ridge_its_rows_choose():
    """Values the covariates predict to 1% (a linear layer inside a small transformer's block,
    fitted on the block's leading directions), 40 of 400 items drawn far from the rest (gmm's
    outliers): RIDGE's partly shrunk slope left half the selection's bias in the answer (a
    tiny BERT's cells had missed by a cosine distance of 0.52). The rows choose a ridge
    (engine/ridge.py), the one numpy's matrices choose; the answer is the estimator at it,
    many times nearer the truth, and its intervals still cover."""
    from diagql.engine.aggregates import MeanState

    covered = total = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        N, p, d, n = 400, 8, 24, 40
        Z = rng.standard_normal((N, p))
        Y = Z @ rng.standard_normal((p, d)) + 0.01 * rng.standard_normal((N, d))
        weight = np.exp(2.0 * Z[:, 0] - 1.0 * Z[:, 1])
        picked = np.sort(rng.choice(N, size=n, replace=False, p=weight / weight.sum()))
        z_pop = {0: Z.mean(axis=0)}
        state = MeanState(d, covariates=p)
        assert state.update(torch.from_numpy(Y[picked]), z=torch.from_numpy(Z[picked]))
        fitted = estimate.fit({None: state}, {None: N}, {None: z_pop[0]})[None]
        ridge = _numpy_ridge(Y[picked], Z[picked], np.zeros(n, int), z_pop)
        assert fitted.ridge == ridge < RIDGE
        mean, se = _numpy_assisted(Y[picked], Z[picked], np.zeros(n, int), z_pop, {0: N},
                                   ridge)[0]
        np.testing.assert_allclose(fitted.mean, mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fitted.se, se, rtol=1e-6)
        at_ridge = assisted({0: of_rows(Y[picked], Z[picked], N, z_pop[0])}, ridge=RIDGE)[0]
        truth = Y.mean(axis=0)
        error = np.abs(fitted.mean - truth)
        assert np.linalg.norm(error) < 0.2 * np.linalg.norm(at_ridge.mean - truth)
        covered += int((error <= stats.t.ppf(0.975, n - 1) * fitted.se).sum())
        total += d
    assert 0.90 <= covered / total <= 0.99, covered / total


def _synthetic(seed: int, N=3000, p=4, d=30):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((N, p))
    B = rng.standard_normal((p, d))
    Y = 1.0 + Z @ B + rng.standard_normal((N, d)) * 1.5
    # Selection by the covariates alone, strongly non-uniform: items with a high z0 are
    # ten times as likely to be drawn (as a boundary sampler favours some latents).
    weight = np.exp(1.2 * Z[:, 0])
    picked = rng.choice(N, size=150, replace=False, p=weight / weight.sum())
    return Z, Y, np.sort(picked)


def test_intervals_cover_the_truth_of_a_population_selected_by_its_covariates():
    covered = plain_covered = total = 0
    for seed in range(12):
        Z, Y, picked = _synthetic(seed)
        cross = CrossSums(Z.shape[1], Y.shape[1])
        cross.add(torch.from_numpy(Z[picked]), torch.from_numpy(Y[picked]))
        sums = GroupSums(len(picked), Y[picked].sum(axis=0), (Y[picked] ** 2).sum(axis=0), cross,
                         len(Y), Z.mean(axis=0))
        fitted = assisted({None: sums})[None]
        truth = Y.mean(axis=0)
        half = stats.t.ppf(0.975, len(picked) - 1) * fitted.se
        covered += int((np.abs(fitted.mean - truth) <= half).sum())
        plain_half = stats.t.ppf(0.975, len(picked) - 1) * Y[picked].std(axis=0, ddof=1) / \
            np.sqrt(len(picked))
        plain_covered += int((np.abs(Y[picked].mean(axis=0) - truth) <= plain_half).sum())
        total += Y.shape[1]
    assert 0.90 <= covered / total <= 0.98, covered / total
    assert plain_covered / total < 0.5  # the sample mean is biased by the selection


def test_one_small_cell_s_intervals_carry_the_bias_the_ridge_leaves():
    """A cell of 300 items of which 8 are drawn, strongly by the covariates (as vas and gmm pick
    latent outliers), slopes of the size the ridge assumes: the ridge keeps the 8 items' slope
    near 0, so most of the selection's bias stays in the answer. The intervals cover it; with
    only the shrunk slope's sampling variance (the sandwich δᵀA⁻¹SA⁻¹δ) they cover ~0.88."""
    covered = sandwich_covered = total = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        N, p, d, n = 300, 4, 40, 8
        Z = rng.standard_normal((N, p))
        Y = Z @ (rng.standard_normal((p, d)) * 0.5) + rng.standard_normal((N, d)) * 1.5
        weight = np.exp(1.5 * Z[:, 0])
        picked = rng.choice(N, size=n, replace=False, p=weight / weight.sum())
        fitted = assisted({0: of_rows(Y[picked], Z[picked], N, Z.mean(axis=0))})[0]
        error = np.abs(fitted.mean - Y.mean(axis=0))
        t = stats.t.ppf(0.975, n - 1)
        covered += int((error <= t * fitted.se).sum())
        zc = Z[picked] - Z[picked].mean(axis=0)
        A_inv = np.linalg.inv(zc.T @ zc + RIDGE * np.eye(p))
        delta = Z.mean(axis=0) - Z[picked].mean(axis=0)
        share = (N - n) / N / n
        narrow = np.sqrt((share + delta @ A_inv @ zc.T @ zc @ A_inv @ delta) /
                         (share + delta @ A_inv @ delta))
        sandwich_covered += int((error <= t * fitted.se * narrow).sum())
        total += d
    assert 0.92 <= covered / total <= 0.98, covered / total
    assert sandwich_covered / total < 0.90, sandwich_covered / total


def test_a_neuron_constant_over_the_sample_gets_the_constant_floor_not_rounding():
    """Neurons constant over every sampled item at a nonzero float32 value (a conv's bias where
    every sampled image is blank), which 3% of the matching items leave: the fit follows them
    to rounding, and their standard errors must be 0, not ~1e-15, so that the constant floor
    gives the items not drawn their rule-of-three spread. Before, those intervals were ~1e-13
    wide and missed every such neuron's exact mean."""
    from diagql.engine.estimate import _constant_floor

    rng = np.random.default_rng(3)
    N, p, d, n = 2000, 4, 12, 60
    Z = rng.standard_normal((N, p))
    Y = Z @ rng.standard_normal((p, d)) + rng.standard_normal((N, d))
    flat = np.arange(0, d, 3)  # a constant bias, from float32 as a layer's rows come
    Y[:, flat] = np.float32(0.37123)
    picked = np.sort(rng.choice(N, size=n, replace=False))
    rest = np.setdiff1d(np.arange(N), picked)
    fires = rng.choice(rest, size=60, replace=False)
    Y[np.ix_(fires, flat)] += 2.0
    fitted = assisted({0: of_rows(Y[picked], Z[picked], N, Z.mean(axis=0))})[0]
    assert np.all(fitted.se[flat] == 0.0)
    varying = np.setdiff1d(np.arange(d), flat)
    assert np.all(fitted.se[varying] > 1e-3)
    se = _constant_floor(fitted.se, n)
    truth = Y.mean(axis=0)
    error = np.abs(fitted.mean - truth)
    np.testing.assert_allclose(fitted.mean[flat], np.float32(0.37123), rtol=1e-9)
    assert np.all(error[flat] <= stats.t.ppf(0.975, n - 1) * se[flat])


@pytest.mark.parametrize("prior_alone", [False, True], ids=["shown", "prior-alone"])
def test_slopes_larger_than_the_ridge_assumes_are_carried_by_the_intervals(prior_alone,
                                                                             monkeypatch):
    """A cell the covariates predict closely (slopes ~1 per whitened unit, residuals 0.3: the
    ridge's prior σ²/ridge puts each slope's size at ~0.1), 30 of its 300 items drawn
    strongly by them (a small CNN's pooled layer under vas, ebtree, maxmargin): the shrunk
    slope leaves a bias the prior under-states, which the slopes' sizes the sample shows
    carry. With the prior alone (as before) the intervals covered ~0.66. At RIDGE: the
    cell's rows would choose a smaller one (engine/ridge.py, the test below)."""
    from diagql.engine import regression

    if prior_alone:
        monkeypatch.setattr(regression, "shown_slopes",
                            lambda evals, along, sigma2, ridge: np.zeros_like(along))
    covered = total = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        N, p, d, n = 300, 6, 30, 30
        Z = rng.standard_normal((N, p))
        Y = Z @ rng.standard_normal((p, d)) + rng.standard_normal((N, d)) * 0.3
        weight = np.exp(1.5 * Z[:, 0])
        picked = rng.choice(N, size=n, replace=False, p=weight / weight.sum())
        fitted = assisted({0: of_rows(Y[picked], Z[picked], N, Z.mean(axis=0))}, ridge=RIDGE)[0]
        error = np.abs(fitted.mean - Y.mean(axis=0))
        covered += int((error <= stats.t.ppf(0.975, n - 1) * fitted.se).sum())
        total += d
    if prior_alone:
        assert covered / total < 0.75, covered / total
    else:
        assert 0.90 <= covered / total <= 0.98, covered / total


def test_p_in_topk_skips_only_neurons_that_cannot_reach_the_top():
    rng = np.random.default_rng(3)
    mean = np.concatenate([rng.normal(0, 1, 2000), rng.normal(3, 0.3, 12)])
    se = np.full(len(mean), 0.25)
    k = 10
    reported = np.argsort(-mean)[:k]
    fast = p_in_topk(mean, se, reported, k)
    draws = mean + rng.standard_normal((4000, len(mean))) * se  # every neuron, many draws
    top = np.argsort(-draws, axis=1)[:, :k]
    brute = np.array([(top == j).any(axis=1).mean() for j in reported])
    np.testing.assert_allclose(fast, brute, atol=0.08)


def test_evaluate_s_lean_mean_is_the_assisted_mean():
    Z, Y, picked = _synthetic(5)
    lean = corrected_mean(Y[picked], Z[picked], Z.mean(axis=0))
    full = assisted({0: of_rows(Y[picked], Z[picked], len(Y), Z.mean(axis=0))})[0].mean
    np.testing.assert_allclose(lean, full, atol=1e-10)


def test_a_latent_constant_over_the_items_leaves_no_covariate_and_still_answers():
    """Identical items (an all-zero input): the latent has no spread, so no covariate is
    kept (p = 0); a grouped assisted sample answer is then each group's sample mean
    (numpy), where the grouped cross sums once failed to reshape their empty product."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    X, y = torch.zeros(80, 4), torch.arange(80) % 3
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    assert covariates(conn.profile).shape == (80, 0)
    result = conn.query("AVG NEURONS IN 0 GROUP BY class USING SAMPLE random(0.5, random_state=1)")
    with torch.no_grad():
        rows = model[0](X).double().numpy()
    items = result.plan.items
    for label in range(3):
        mine = items[y.numpy()[items] == label]
        np.testing.assert_allclose(result.groups[label].values, rows[mine].mean(axis=0),
                                   rtol=1e-6, atol=1e-7)


def _numpy_fit_rows_assisted(Y, Z, groups, fit, z_pop, n_pop, ridge, leverage=False):
    """The estimator when the residual variance comes from some rows (``fit``) only, written
    out: each group's mean is the regression estimator on every row (_numpy_assisted's); σ²
    is the residual variance of a slope fitted on the fit rows alone (group-centred, pooled,
    the same ridge), inflated by their own degrees of freedom; the slope's noise is the full
    fit's, the slopes' sizes shown are the fit rows' (``_numpy_se``). ``leverage``: the fit
    rows' outliers (in the fit rows' own fit) restored, the slope's noise's (uᵀz̃)² (z̃ centred
    on all the group's rows) scaled by all its rows' Σ(uᵀz̃)² over the fit rows'."""
    full = _numpy_assisted(Y, Z, groups, z_pop, n_pop, ridge)
    keys = sorted(set(groups.tolist()))
    Yf, Zf, gf = Y[fit], Z[fit], groups[fit]
    Zc, Yc = Zf.copy(), Yf.copy()
    for g in keys:
        m = gf == g
        Zc[m] -= Zf[m].mean(axis=0)
        Yc[m] -= Yf[m].mean(axis=0)
    S = Zc.T @ Zc
    A = S + ridge * np.eye(Z.shape[1])
    resid = Yc - Zc @ np.linalg.solve(A, Zc.T @ Yc)
    free = len(Yf) - len(keys)
    inflate = free / (free - np.trace(S @ np.linalg.inv(A)))
    Zall = Z.copy()
    for g in keys:
        Zall[groups == g] -= Z[groups == g].mean(axis=0)
    c = _numpy_leverage(Zf, gf, ridge) if leverage else None
    out = {}
    for g in keys:
        m, n = gf == g, int((groups == g).sum())
        delta = z_pop[g] - Z[groups == g].mean(axis=0)
        rows = int(m.sum())
        sigma2 = (resid[m] ** 2).sum(axis=0) / (rows - 1) * inflate
        excess = None
        if leverage:
            u = np.linalg.solve(Zall.T @ Zall + ridge * np.eye(Z.shape[1]), delta)
            moved = (Zall[groups == g] @ u) ** 2
            moved_fit = (Zall[fit & (groups == g)] @ u) ** 2
            sigma2, excess = _numpy_restored(sigma2, rows * inflate / (rows - 1), rows, c[m],
                                             resid[m],
                                             moved_fit * moved.sum() / moved_fit.sum())
        se = _numpy_se(sigma2, Zall, Zc, Yc, delta, (n_pop[g] - n) / n_pop[g] / n, ridge,
                       excess)
        out[g] = (full[g][0], se)
    return out


@pytest.mark.parametrize("leverage", [False, True], ids=["unweighted", "leverage"])
@pytest.mark.parametrize("grouped", [False, True], ids=["one", "grouped"])
def test_a_pass_with_fit_rows_and_pooled_products_is_the_estimator_written_in_numpy(grouped,
                                                                                    leverage):
    """What a large sample's pass streams (engine/aggregates.py: MeanState): the pooled
    slope's products on the few directions the groups need, and the residual variance's sums
    over every s-th row of each group. Its answer is the regression estimator on every row
    and its standard errors use σ² of the fit rows, both against numpy on the rows; with the
    rows' leverage weights (engine/leverage.py, as a query's pass feeds them), σ² and the
    slope's noise are the leverage-weighted ones."""
    from diagql.engine.leverage import row_weights

    from diagql.engine import estimate
    from diagql.engine.aggregates import MeanState
    from diagql.engine.prediction import fit_rows
    from diagql.engine.regression import directions

    Z, Y, picked = _synthetic(3, N=4000, p=4, d=30)
    Y = Y[picked].astype(np.float32).astype(np.float64)
    Zs = Z[picked]
    codes = (Z[picked, 1] > 0).astype(np.int64) if grouped else np.zeros(len(picked), np.int64)
    keys = [0, 1] if grouped else [0]
    everyone = (Z[:, 1] > 0).astype(np.int64) if grouped else np.zeros(len(Z), np.int64)
    z_pop = {g: Z[everyone == g].mean(axis=0) for g in keys}
    n_pop = {g: int((everyone == g).sum()) for g in keys}
    fit = fit_rows(codes if grouped else None, len(picked), limit=40, floor=20)
    assert fit is not None and fit.sum() < len(picked)
    # A latent outlier among each group's fit rows, whose values miss the linear model: the
    # rows the leverage weights restore.
    Zs = Zs.copy()
    for g in keys:
        first = np.flatnonzero(fit & (codes == g))[0]
        Zs[first] = [6.0, 1.0 if g else -1.0, -5.0, 4.0]
        Y[first] += 4.0
    Y = Y.astype(np.float32).astype(np.float64)  # as the pass reads them
    D = directions(Zs, codes if grouped else None, [z_pop[g] for g in keys])
    assert D.shape == (4, len(keys))  # one direction per group, not p
    state = MeanState(Y.shape[1], groups=2 if grouped else None, covariates=4, directions=D)
    weights = row_weights(Zs, codes if grouped else None, [z_pop[g] for g in keys], fit, RIDGE)
    for start in range(0, len(picked), 64):
        part = slice(start, start + 64)
        extra = {"weights": torch.from_numpy(weights[part])} if leverage else {}
        assert state.update(torch.from_numpy(Y[part]).float(),
                            torch.from_numpy(codes[part]) if grouped else None,
                            torch.from_numpy(Zs[part]), fit=torch.from_numpy(fit[part]), **extra)
    states = {g: state.group(g) for g in keys} if grouped else {None: state}
    fitted = estimate.fit(states, {k: n_pop[k or 0] for k in states},
                          {k: z_pop[k or 0] for k in states})
    want = _numpy_fit_rows_assisted(Y, Zs, codes, fit, z_pop, n_pop, RIDGE, leverage)
    unweighted = _numpy_fit_rows_assisted(Y, Zs, codes, fit, z_pop, n_pop, RIDGE)
    assert leverage == any(np.abs(want[g][1] / unweighted[g][1] - 1).max() > 0.01 for g in keys)
    for key, f in fitted.items():
        mean, se = want[key or 0]
        np.testing.assert_allclose(f.mean, mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(f.se, se, rtol=1e-6)
        assert f.df == int((fit & (codes == (key or 0))).sum()) - 1


def test_a_where_s_covariate_means_are_averaged_once_per_matching_set(monkeypatch):
    """A hot sampled query with a WHERE averaged its matching items' covariates again every
    time (139 ms of a 2M-item query's); the same set's means are kept, another set's not."""
    from diagql.engine.covariates import Covariates
    from tests.models import digits, trained_mlp

    calls = []
    original = Covariates.means
    monkeypatch.setattr(Covariates, "means",
                        lambda self, *args: calls.append(1) or original(self, *args))
    db = diagql.connect(trained_mlp(), digits(), cache_dir=False, progress=False)
    first = db.query("AVG NEURONS IN encoder.1 WHERE class = 3 USING SAMPLE random(0.2)")
    before = len(calls)
    again = db.query("AVG NEURONS IN encoder.1 WHERE class = 3 USING SAMPLE random(0.2)")
    assert len(calls) == before
    np.testing.assert_array_equal(again.values, first.values)
    np.testing.assert_array_equal(again.estimate.ci_low, first.estimate.ci_low)
    db.query("AVG NEURONS IN encoder.1 WHERE class = 4 USING SAMPLE random(0.2)")
    assert len(calls) > before  # another matching set: averaged anew


@pytest.mark.parametrize("factor", [1.0, 40.0])
def test_a_random_sample_s_mean_answers_where_the_fit_s_check_widened_it_past_the_mean(
        mlp, digits, monkeypatch, factor):
    """Where the extrapolation check widens a fit's errors past the plain sample mean's, a
    uniform sample's mean (unbiased, its error honest) answers instead, with its own t
    interval, and the estimate says so; a non-uniform sampler's fit stays, widened (its
    sample mean is biased). A sweep's model with a few inputs 10,000 times the others'
    had answered 350x as far from the exact means as the same sample's mean."""
    X, y = digits
    monkeypatch.setattr(extrapolation, "widening",
                        lambda check, z, items, keys, matching, population, *rest:
                        {key: factor for key in population})
    db = diagql.connect(mlp, digits, cache_dir=False, progress=False)  # no memo of the check
    Y = _layer(mlp, X, 3)
    labels = y.numpy()
    result = db.query("AVG NEURONS IN encoder.2 GROUP BY class USING SAMPLE random(0.2)")
    sample = db.sample("random(0.2)")
    answered = set()
    for g, part in result.groups.items():
        rows = Y[sample[labels[sample] == g]]
        est = part.estimate
        if factor == 1.0 or len(rows) < estimate.REFUSE_ITEMS:  # too few for the mean's own
            assert est.estimator == "assisted" and est.fit_refused is None
            continue
        answered.add(g)
        assert est.estimator == "plain" and est.fit_refused == factor
        np.testing.assert_allclose(part.values, rows.mean(axis=0), rtol=1e-6, atol=1e-7)
        n, N = len(rows), int((labels == g).sum())
        se = rows.std(axis=0, ddof=1) / np.sqrt(n) * np.sqrt((N - n) / (N - 1))
        live = se > 0
        np.testing.assert_allclose(((est.ci_high - est.ci_low) / 2)[live],
                                   (stats.t.ppf(0.975, n - 1) * se)[live], rtol=1e-6)
    if factor > 1.0:
        assert len(answered) >= 3
        assert "the model-assisted fit missed values the profile " \
               "knows for every item by 40.0x" in " ".join(str(result).split())
        biased = db.query("AVG NEURONS IN encoder.2 WHERE class = 3 USING SAMPLE vas(0.5)")
        assert biased.estimate.estimator == "assisted" and biased.estimate.widened == factor


def test_a_grouped_sample_whose_assisted_sums_would_not_fit_takes_the_plain_mean(
        cnn, digits, monkeypatch):
    """Per group, the assisted sums hold covariates x neurons floats: 100 classes of a
    262,144-neuron map would have held 8.8 GB, and ran out of memory (sweep II2). Past
    ASSISTED_MEMORY the query takes the plain estimator, says why, and answers each group's
    sample mean (numpy over the sampled rows)."""
    from diagql.engine import planner

    X, y = digits
    X, y = X[:600], y[:600]
    db = diagql.connect(cnn, (X, y), cache_dir=False, progress=False)
    query = "AVG NEURONS IN 2 GROUP BY class USING SAMPLE random(0.3, random_state=4)"
    assisted = db.query(query)
    assert dict(assisted.plan.explain())["estimator"].startswith("assisted")
    monkeypatch.setattr(planner, "ASSISTED_MEMORY", 2**16)
    plain = db.query(query)
    text = dict(plain.plan.explain())["estimator"]
    assert text.startswith("plain: the sample mean; the assisted estimate's sums would hold")
    items = db.sample("random(0.3, random_state=4)")
    with torch.no_grad():
        rows = cnn[:3](X[items]).flatten(1).double().numpy()
    for c, group in plain.groups.items():
        np.testing.assert_allclose(group.values[np.argsort(group.neurons)],
                                   rows[y.numpy()[items] == c].mean(axis=0), rtol=1e-6,
                                   atol=1e-7)
    # A view the profile holds (the logits) needs no sums: still exact (review KK1).
    monkeypatch.setattr(planner, "ASSISTED_MEMORY", 2**10)
    held = db.query("AVG NEURONS IN 8 GROUP BY class USING SAMPLE random(0.3, random_state=4)")
    assert dict(held.plan.explain())["estimator"].startswith("assisted: exact")
    with torch.no_grad():
        logits = cnn(X).double().numpy()
    for c, group in held.groups.items():
        np.testing.assert_allclose(group.values[np.argsort(group.neurons)],
                                   logits[y.numpy() == c].mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:the model predicts a class beyond")  # an untrained head
def test_a_sample_of_every_matching_item_answers_the_exact_mean_inside_its_interval():
    """The assisted fit's mean of a sample holding every matching item (δ = 0) had differed
    from the exact mean in the last bit, outside its own 0-wide interval (13 of 100 neurons;
    sweep S36): the answer is now the sample's mean itself, equal to the baseline's."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 100), nn.ReLU(), nn.Linear(100, 100),
                                      nn.ReLU())
            self.mid = nn.Linear(100, 5)
            self.head = nn.Linear(5, 4)

        def forward(self, x):
            return self.head(torch.relu(self.mid(self.body(x))))

    torch.manual_seed(0)
    X, y = torch.randn(300, 4), torch.randint(0, 2, (300,))
    y[7] = y[8] = 2
    torch.manual_seed(1)
    db = diagql.connect(Net(), (X, y), cache_dir=False, progress=False)
    result = db.query("AVG NEURONS IN body.3 WHERE class = 2 USING SAMPLE maxmargin(0.1) "
                      "WITH BASELINE")
    values, found = np.asarray(result.values), result.estimate
    assert found.exact and result.n_items == 2
    assert ((found.ci_low <= values) & (values <= found.ci_high)).all()
    np.testing.assert_array_equal(values, np.asarray(result.baseline.values))
