"""Accuracy estimates from the sample alone (docs/ARCHITECTURE.md, "Estimates").

Each approximate answer carries how far it is likely to be from the exact answer over all
matching items, computed from the sampled items only. With the assisted estimator (the
default, engine/regression.py) a neuron's estimate and its standard error come from a linear
model of its activation in the item's reduced latent; since every sampler selects from the
profile alone, that holds for every sampler, uniform or not. With the plain estimator they come
from the sample mean as from a uniform sample without replacement (finite-population
corrected), which only uniform samplers are; for the others that estimate is marked unreliable.
Either way the mean is taken as approximately normal; Monte Carlo draws from that give the
probability that each reported neuron is in the true top-k, the expected precision and the
expected cosine distance. ARGMAX shares give a plausible true distribution (the winners the
sample missed added by Good-Turing and Chao1) and histograms of the effective sample size drawn
from it without replacement for the expected Jensen-Shannon distance.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from diagql.engine import deconvolution
from diagql.engine.regression import Fitted, GroupSums, Pooled, assisted
from diagql.engine.ridge import RIDGE
from diagql.engine.student_t import normal_quantile as _normal, t_quantile
from diagql.results.metrics import COSINE, JS, PRECISION
from diagql.results.result import Estimate

DRAWS = 256
DRAW_CHUNK = 1 << 22  # values of each array of a P(in top-k)'s draws at once (32 MB in float64)
LEVEL = 0.95
COVERS = ("sampling variance of a uniform sample of the matching items "
          "(normal approximation, finite-population corrected); not a sampler's bias")
COVERS_EXACT = ("nothing left to estimate: the profile keeps every matching item's winner, so "
                "the shares are counted, not estimated")
COVERS_WHOLE = ("nothing left to estimate: the sample holds every matching item, so its answer "
                "is the exact one")
COVERS_ASSISTED = ("sampling variance and the sampler's selection, through a linear model of "
                   "each neuron in the items' reduced latent (a sampler choosing by the profile "
                   "alone is ignorable given it); not what the model cannot fit")
COVERS_HELD = ("nothing left to estimate: the profile holds every matching item's row of the "
               "layer, so the means are computed from all of them, not estimated")
# A neuron whose interval's top lies this many standard errors below the k-th largest bottom
# is in the top-k with probability < 1e-5 per draw: it is not simulated.
_PRUNE_SE = 4.5


def _rng() -> np.random.Generator:
    # Fixed: the same answer always carries the same estimate.
    return np.random.default_rng(20200101)


class _Normals:
    """The Monte Carlo's standard normals: the fixed generator's stream, kept once made. Its
    first n values are what a fresh generator gives for n (numpy fills in order), so every
    estimate is the one a fresh draw would give, and a hot query on a wide layer does not
    draw 256 × 4,704 normals again (0.02-0.03 s, most of its estimate)."""

    KEPT = 1 << 22  # values kept: 32 MB

    def __init__(self):
        self.stream = np.empty(0)

    def __call__(self, rows: int, columns: int) -> np.ndarray:
        n = rows * columns
        stream = self.stream
        if n > len(stream):
            stream = _rng().standard_normal(n)
            if n <= self.KEPT:
                stream.setflags(write=False)
                self.stream = stream
        return stream[:n].reshape(rows, columns)


_standard_normals = _Normals()


def fit(states: dict, population: dict, covariate_means: dict, prediction=None,
        winner_shares: dict | None = None, widened: dict | None = None,
        recheck: Callable[[float], dict] | None = None) -> dict:
    """The assisted estimator's fit of every group of a sample's states (key -> Fitted):
    ``population`` and ``covariate_means`` are each group's matching items of the whole data
    and their mean covariates (the plan's); ``prediction``: the view's block prediction
    (engine/prediction.py), whose residual a mean's fit models instead. A view the profile
    holds predicts every item exactly. ``winner_shares``: an ARGMAX's exact shares per group,
    when the profile knows every item's winner (``Fitted.exact``). ``widened``: each group's
    factor the plan's extrapolation check widens a mean's standard errors by (None: none;
    engine/extrapolation.py), for a fit at RIDGE; ``recheck``: the plan's check of a fit at
    the ridge the fit's rows chose instead (engine/ridge.py)."""
    argmax = any(hasattr(state, "counts") for state in states.values())
    if argmax and winner_shares is not None:
        return {key: Fitted(winner_shares[key], np.zeros(state.counts.shape[-1]),
                            state.count - 1, exact=True)
                for key, state in states.items() if state.count > 0}
    groups = {}
    for key, state in states.items():
        if state.count == 0:
            continue
        if prediction is not None:
            groups[key] = prediction.sums(state, population[key], covariate_means[key])
            continue
        if hasattr(state, "counts"):  # an argmax's one-hot winners: y² = y, every row fitted
            if state.cross is None:
                continue
            counts = state.counts.numpy().astype(np.float64)
            groups[key] = GroupSums(state.count, counts, counts, state.cross, population[key],
                                    covariate_means[key])
            continue
        if getattr(state, "zsums", None) is None:
            continue
        groups[key] = GroupSums(state.count, state.sum.numpy(), state.sumsq.numpy(),
                                state.zsums.latent(state.latent), population[key],
                                covariate_means[key], state.fit_sums())
    fitted = assisted(groups, _pooled(states, prediction))
    if argmax:
        return fitted  # an argmax's one-hot winners are not predicted (nor checked)
    ridge = next((f.ridge for f in fitted.values()), RIDGE)
    if widened is not None and recheck is not None and ridge != RIDGE:
        widened = recheck(ridge)
    factor = {key: 1.0 if widened is None else widened.get(key, 1.0) for key in fitted}
    if prediction is None:
        return {key: dataclasses.replace(f, se=f.se * factor[key], widened=factor[key])
                for key, f in fitted.items()}
    return {key: prediction.restore(f, covariate_means[key], factor[key])
            for key, f in fitted.items()}


def refused(fits: dict, states: dict, population: dict) -> dict:
    """key -> the widening of each mean's fit whose widened standard errors, summed in
    squares, exceed REFUSE_MARGIN times the plain mean's over at least REFUSE_ITEMS items:
    for a uniform sample only (its mean unbiased, its error honest), which then answers. A
    fit widened 9.7x had answered 350x as far from the exact means as the sample's mean (a
    few inputs 10,000 times the others': benchmarks/README.md, "2026-12-05"); the margin and
    the floor keep a noisy small-sample error from winning for being small."""
    out = {}
    for key, fitted in fits.items():
        state = states.get(key)
        if fitted.widened > 1.0 and state is not None and hasattr(state, "sumsq") and \
                state.count >= REFUSE_ITEMS and REFUSE_MARGIN * float(np.sum(
                    _plain_se(state, population[key]) ** 2)) < float(np.sum(fitted.se ** 2)):
            out[key] = fitted.widened
    return out


REFUSE_MARGIN, REFUSE_ITEMS = 4.0, 30


def _pooled(states: dict, prediction) -> Pooled | None:
    """The pass's pooled products (one for all the groups: regression.Pooled), the
    residual's with a block prediction; None when the states streamed none."""
    state = next((s for s in states.values() if getattr(s, "pooled", None) is not None), None)
    if state is None:
        return None
    pooled = Pooled(state.directions.numpy(), state.pooled.numpy())
    if prediction is None:
        return pooled
    # Σz and Σzzᵀ over every sampled row: the groups' (a group without items adds nothing).
    z = sum(s.zsums.z.numpy() for s in states.values() if s.count)
    zz = sum(s.zsums.zz.numpy() for s in states.values() if s.count)
    return prediction.pooled(pooled, z, zz)


def shares(fitted: Fitted | np.ndarray) -> np.ndarray:
    """ARGMAX's answer from the assisted fit (or its mean): the shares, clipped at 0 and
    summing to 1."""
    if isinstance(fitted, Fitted) and fitted.exact:  # counted: as USING FULL gives them, to
        return fitted.mean  # the last bit (a renormalised 1/8000 is 0.00012499999999999998)
    values = np.clip(fitted.mean if isinstance(fitted, Fitted) else fitted, 0.0, None)
    total = values.sum()
    return values / total if total > 0 else values


def _plain_se(state, population: int) -> np.ndarray:
    n = state.count
    mean = state.sum.numpy() / n
    variance = np.maximum(state.sumsq.numpy() / n - mean ** 2, 0.0) * n / (n - 1)
    fpc = max(population - n, 0) / max(population - 1, 1)
    return np.sqrt(variance / n * fpc)


def _constant_floor(se: np.ndarray, n: int, expected: bool = False) -> np.ndarray:
    """A neuron that is constant over the sample (a ReLU silent for every sampled item) has a
    zero standard error, yet the items not drawn may fire. By the rule of three, up to 3/n of
    them may do so unseen (95%); they are given the layer's typical spread.

    ``expected``: the spread an expected distance draws such a neuron by instead. The rule of
    three is a 95% bound on the share that fires; the share's mean square, under a uniform
    prior given that none of n fired (Laplace), is 2/((n+2)(n+3)), so its shift's typical
    size is √(2/((n+2)(n+3))) of the layer's spread, a third to a fifth of the bound. Drawn
    at the bound, the many constant neurons of a map's blank borders had made the expected
    cosine 2.4-2.6x the actual on the ResNet's layers inside blocks, 1.3-1.7x on the demo's
    (benchmarks/README.md, "twenty-third session")."""
    varying = se[se > 0]
    if len(varying) == 0:
        return se
    share = np.sqrt(2.0 / ((n + 2) * (n + 3))) if expected else min(3.0 / n, 1.0)
    return np.where(se > 0, se, share * float(np.median(varying)) * np.sqrt(n))


def _t_quantile(df: int) -> float:
    return t_quantile(max(df, 1), 0.5 + LEVEL / 2)


def _too_few(n: int, population: int) -> Estimate:
    return Estimate(COVERS, False, LEVEL, n, population,
                    reason=f"{n} matching sampled item: too few for an estimate")


def for_whole_max(state, population: int, reported: np.ndarray) -> Estimate | None:
    """TOPK BY MAX on a sample that holds every matching item: its maxima are the exact ones.
    None otherwise (a sample's maximum is biased low: no estimate)."""
    n = state.count
    if not 0 < n == population:
        return None
    top = state.finalize()[reported]
    return Estimate(COVERS_WHOLE, True, LEVEL, n, population, ci_low=top, ci_high=top.copy(),
                    p_in_topk=np.ones(len(reported)), metric=PRECISION, expected=1.0,
                    exact=True)


def for_mean(state, population: int, reported: np.ndarray, k: int | None,
             reliable: bool, fitted: Fitted | None = None,
             prior: deconvolution.Prior | None = None) -> Estimate:
    """AVG (k None): a confidence interval per neuron and the expected cosine distance.
    TOPK BY MEAN: intervals of the reported neurons, P(in true top-k) and expected precision.
    ``fitted``: the assisted estimator's fit of this group (reliable for any sampler);
    ``prior``: P(in top-k)'s, when fitted already with the other groups' (``topk_priors``)."""
    n = state.count
    if 0 < n == population:  # every matching item sampled: the sample's mean is the exact one
        top = state.sum.numpy()[slice(None) if k is None else reported] / n
        return Estimate(COVERS_WHOLE, True, LEVEL, n, population, ci_low=top, ci_high=top.copy(),
                        p_in_topk=None if k is None else np.ones(len(reported)),
                        metric=COSINE if k is None else PRECISION,
                        expected=0.0 if k is None else 1.0, estimator=_name(fitted), exact=True)
    if n < 2:
        return _too_few(n, population)
    mean, se = _mean_se(state, population, fitted)
    covers, reliable = (COVERS_ASSISTED, True) if fitted is not None else (COVERS, reliable)
    if not np.any(se > 0):  # no neuron varies over the sample: nothing to give a spread by
        return Estimate(covers, False, LEVEL, n, population, reason=(
            f"every neuron is constant over the {n:,} matching sampled items (a ReLU silent on "
            f"them all reads 0 ± 0): by the rule of three up to {min(3 / n, 1):.0%} of the "
            f"others may differ, by an amount the sample cannot measure; a larger sample or "
            f"WITH BASELINE"), estimator=_name(fitted))
    half = (t := _t_quantile(n - 1)) * se
    if k is None:
        spread = _mean_se(state, population, fitted, expected=True)[1]
        return Estimate(covers, reliable, LEVEL, n, population, ci_low=mean - half,
                        ci_high=mean + half, metric=COSINE, expected=expected_cosine(mean, spread),
                        estimator=_name(fitted), widened=_widened(fitted))
    prior = prior or (deconvolution.fit(mean, se) if len(mean) > k else None)
    p_in = p_in_topk(mean, se, reported, k, prior)
    low, high = mean[reported] - half[reported], mean[reported] + half[reported]
    if prior is not None and len(mean) > k:  # chosen as largest: noise leans up (deconvolution)
        low, high = deconvolution.selected_interval(prior, mean[reported], se[reported], low,
                                                    high, LEVEL, t / _normal(0.5 + LEVEL / 2))
    return Estimate(covers, reliable, LEVEL, n, population, ci_low=low, ci_high=high,
                    p_in_topk=p_in, metric=PRECISION, expected=float(p_in.sum() / k),
                    estimator=_name(fitted), widened=_widened(fitted))


def _mean_se(state, population: int, fitted: Fitted | None,
             expected: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A group's estimate and its standard errors: the assisted fit's, else the sample's
    (``expected``: a constant neuron's as an expected distance draws it, ``_constant_floor``)."""
    n = state.count
    if fitted is not None:
        mean, se = fitted.mean, fitted.se
    else:
        mean, se = state.sum.numpy() / n, _plain_se(state, population)
    return mean, _constant_floor(se, n, expected)


def topk_priors(states: dict, population: dict, fits: dict) -> dict:
    """The prior of P(in top-k) (engine/deconvolution.py) of each group ``for_mean`` draws it
    for (2 ≤ sampled < matching items), fitted together: a GROUP BY's ten groups in under
    half the time their fits take one by one."""
    keys = [key for key, state in states.items()
            if state is not None and 2 <= state.count < population.get(key, 0)]
    spreads = [_mean_se(states[key], population[key], fits.get(key)) for key in keys]
    return dict(zip(keys, deconvolution.fit_many(spreads)))


# An expected distance's draws come FIRST_DRAWS at a time, doubling, until its Monte Carlo
# standard error is under MC_PRECISION of it (or DRAWS are used): a wide layer's distances vary
# little from draw to draw (4,704 neurons: 32 draws suffice, where drawing 256 was most of a
# hot AVG's time and 12-24% of an ARGMAX pass on conv1), a narrow one's use all 256 as before.
FIRST_DRAWS = 32
MC_PRECISION = 0.01


def _monte_carlo(distances: Callable[[int], np.ndarray]) -> float:
    """The mean of ``distances(m)`` (the first m draws of a fixed stream: each m's draws begin
    with the smaller m's), m doubling from FIRST_DRAWS up to DRAWS until the mean's Monte Carlo
    standard error is at most MC_PRECISION of it."""
    m = min(FIRST_DRAWS, DRAWS)
    while True:
        values = distances(m)
        expected = float(np.mean(values))
        error = float(np.std(values, ddof=1)) / np.sqrt(m) if m > 1 else np.inf
        if m >= DRAWS or error <= MC_PRECISION * expected:
            return expected
        m = min(2 * m, DRAWS)


def expected_cosine(mean: np.ndarray, se: np.ndarray) -> float:
    """E[cosine distance] between an answer and the truth it estimates, each neuron's error
    independent N(0, se²) (``_monte_carlo`` over the kept normal stream): answers drawn around
    a plausible truth, the answer ``mean`` shrunk to the squared norm |mean|² − Σse², the
    unbiased estimate of the truth's (0 where the noise holds it all). Drawn around the answer
    itself, whose norm its noise inflates, the distance came out 0.50-0.76x the actual on
    layers whose class means are small beside their items' spread (a BatchNorm's, a
    LayerNorm's; benchmarks/README.md, "twenty-second session")."""
    norm2, noise2 = float(mean @ mean), float(se @ se)
    truth = mean * np.sqrt(max(1.0 - noise2 / norm2, 0.0)) if norm2 > 0 else mean

    def distances(m: int) -> np.ndarray:
        draws = truth + _standard_normals(m, len(mean)) * se
        return COSINE.rows(draws, np.broadcast_to(truth, draws.shape))
    return _monte_carlo(distances)


def expected_js(colours: np.ndarray, size: int) -> float:
    """E[JS distance] between a population of ``colours`` (winners per neuron) and the
    histograms of ``size`` of its items drawn without replacement (``_monte_carlo`` over the
    fixed generator's draws: numpy makes them one after another, so m draws begin with the
    smaller m's)."""
    def distances(m: int) -> np.ndarray:
        drawn = _rng().multivariate_hypergeometric(colours, size, size=m, method="count")
        return JS.rows(drawn, np.broadcast_to(colours, drawn.shape))
    return _monte_carlo(distances)


def p_in_topk(mean: np.ndarray, se: np.ndarray, reported: np.ndarray, k: int,
              prior: deconvolution.Prior | None = None) -> np.ndarray:
    """P(each reported neuron is among the k largest true means), the true means drawn from
    each neuron's posterior under a prior deconvolved from all the layer's estimates
    (engine/deconvolution.py): a mixture of normals per neuron. Only the neurons that can reach
    the top-k are drawn: one whose posterior's top (4.5 sd above its highest likely component)
    lies below the k-th largest posterior bottom cannot. ``prior``: fitted already
    (``topk_priors``), else here."""
    k = min(k, len(mean))
    if len(mean) <= k:
        return np.ones(len(reported))
    if prior is None:
        prior = deconvolution.fit(mean, se)
    weight, centre, spread = deconvolution.posterior(prior, mean, se)
    likely = weight > 1e-9
    bottom = np.where(likely, centre - _PRUNE_SE * spread, np.inf).min(axis=1)
    top = np.where(likely, centre + _PRUNE_SE * spread, -np.inf).max(axis=1)
    kth = np.partition(bottom, len(mean) - k)[len(mean) - k]
    candidates = np.union1d(np.flatnonzero(top >= kth), reported)
    if len(candidates) == k:
        return np.ones(len(reported))
    # Each draw's component per neuron, from the fixed generator (the same answer always
    # carries the same estimate), then its normal from the kept stream.
    # (One comparison per component boundary, summed as they go: a sum over a third axis of
    # three was most of a wide layer's P(in top-k).)
    # The draws go in chunks of rows of about DRAW_CHUNK values each, the same values as one
    # array of them (numpy fills in order): a 100,000-neuron layer's 256 draws of every
    # candidate had held 1-3 GB at once, more than its exact answer's pass.
    m = len(candidates)
    bounds = np.cumsum(weight[candidates], axis=1)[:, :-1].T
    centres, spreads = centre[candidates].T, spread[candidates].T
    columns = np.searchsorted(candidates, reported)
    uniforms, normals = _rng(), _normal_rows(m)
    hits = np.zeros(len(reported))
    step = max(1, DRAW_CHUNK // m)
    for start in range(0, DRAWS, step):
        rows = min(step, DRAWS - start)
        uniform = uniforms.random((rows, m))
        chosen = np.zeros(uniform.shape, dtype=np.intp)
        for boundary in bounds:
            chosen += uniform > boundary
        draws = np.take_along_axis(centres, chosen, axis=0) + \
            normals(start, rows) * np.take_along_axis(spreads, chosen, axis=0)
        winners = np.argpartition(-draws, k - 1, axis=1)[:, :k]
        in_top = np.zeros(draws.shape, dtype=bool)
        np.put_along_axis(in_top, winners, True, axis=1)
        hits += in_top[:, columns].sum(axis=0)
    return hits / DRAWS


def _normal_rows(columns: int):
    """rows(start, n): rows start..start+n of the DRAWS × ``columns`` standard normals, the
    kept stream's where it holds them all, else drawn in order from the fixed generator."""
    if DRAWS * columns <= _Normals.KEPT:
        whole = _standard_normals(DRAWS, columns)
        return lambda start, n: whole[start:start + n]
    generator = _rng()
    return lambda start, n: generator.standard_normal((n, columns))


def held(means: np.ndarray, n: int, population: int, reported: np.ndarray,
         k: int | None, rounding: np.ndarray) -> Estimate:
    """AVG (k None) or TOPK BY MEAN of a view whose every row the profile holds (the latent,
    the logits, a block its directions span): its means are computed from every matching
    item, however few (``n``) the sample holds: exact to the float32 rounding of the held
    rows, ``rounding`` either side (prediction.held_rounding; of width 0, the intervals had
    held none of the float64 means of torch's outputs, 6e-9 off an LSTM's 0.1: LL1, LL3)."""
    half = rounding if k is None else rounding[reported]
    top = means if k is None else means[reported]
    return Estimate(COVERS_HELD, True, LEVEL, n, population, ci_low=top - half,
                    ci_high=top + half, p_in_topk=None if k is None else np.ones(len(reported)),
                    metric=COSINE if k is None else PRECISION,
                    expected=0.0 if k is None else 1.0, estimator="assisted", exact=True)


def counted(share: np.ndarray, population: int) -> Estimate:
    """An ARGMAX's shares counted from every matching item's winner (the profile's), though
    the sample holds none of them: exact."""
    return Estimate(COVERS_EXACT, True, LEVEL, 0, population, ci_low=share, ci_high=share.copy(),
                    metric=JS, expected=0.0, estimator="assisted", exact=True)


def for_argmax(state, population: int, reliable: bool, fitted: Fitted | None = None) -> Estimate:
    """ARGMAX: intervals of each share and the expected Jensen-Shannon distance."""
    n = state.count
    if fitted is not None and fitted.exact:  # however few were sampled
        share = shares(fitted)
        return Estimate(COVERS_EXACT, True, LEVEL, n, population, ci_low=share, ci_high=share,
                        metric=JS, expected=0.0, estimator=_name(fitted), exact=True)
    if 0 < n == population:  # every matching item sampled: the counts are the exact ones
        share = state.counts.numpy().astype(np.float64) / n
        return Estimate(COVERS_WHOLE, True, LEVEL, n, population, ci_low=share,
                        ci_high=share.copy(), metric=JS, expected=0.0, estimator=_name(fitted),
                        exact=True)
    if n < 2:
        return _too_few(n, population)
    counts = state.counts.numpy().astype(np.float64)
    fpc = max(population - n, 0) / max(population - 1, 1)
    if fitted is not None:
        share, covers, reliable = shares(fitted), COVERS_ASSISTED, True
        se = fitted.se
        seen = (share > 0) & (se > 0)
        # The size of a uniform sample whose shares would be as precise as the fit's.
        plain = share[seen] * (1 - share[seen]) / n * fpc
        size = n * float(np.median(plain / se[seen] ** 2)) if seen.any() else float(n)
        # Never below n: the fit's se of a sample far from its cell's mean latent (maxmargin's
        # boundary items) carries the slope's extrapolation, which a smaller multinomial does
        # not model; it made the expected JS 1.6-2.5x the actual (benchmarks/README.md).
        size = float(np.clip(size, n, max(population, 2)))
        half = _t_quantile(n - 1) * se
    else:
        share, covers, size = counts / n, COVERS, float(n)
        half = 1.959964 * np.sqrt(share * (1 - share) / n * fpc)
    # A neuron that won for no sampled item may still win for up to 3/n of the matching items
    # unseen (the rule of three, 95%); one that won for every sampled item may lose for as many.
    # Either's se is 0 (its one-hot column is constant over the sample), not its uncertainty.
    edge = ((counts == 0) | (counts == n)) & (n < population)
    half = np.where(edge, np.maximum(half, min(3.0 / n, 1.0)), half)
    truth = _plausible_truth(share, counts, n, population)
    # A histogram of the sample's effective size drawn without replacement from a population of
    # the matching items' size with that truth: at the fraction the sample is of it (a cell
    # sampled whole draws its own truth: distance 0).
    colours = np.maximum(np.round(truth * population), (truth > 0)).astype(np.int64)
    colours = colours[colours > 0]  # the neurons that win for no item add nothing to a JS
    expected = expected_js(colours, min(max(round(size), 1), int(colours.sum())))
    return Estimate(covers, reliable, LEVEL, n, population, ci_low=np.clip(share - half, 0, 1),
                    ci_high=np.clip(share + half, 0, 1), metric=JS, expected=expected,
                    estimator=_name(fitted))


def _plausible_truth(share: np.ndarray, counts: np.ndarray, n: int, population: int
                     ) -> np.ndarray:
    """A true distribution of winners as plausible as the sample's, with the winners it missed:
    the shares scaled down by the Good-Turing missing mass (f1/(n+1), f1 the neurons that won
    for exactly one sampled item), which is spread over Chao1's estimate of the unseen winners
    (f1²/2f2). The sample's own shares have fewer winners than the truth, and a distribution
    with fewer winners lies nearer its samples: they underestimate the distance (0.67× on the
    demo, benchmarks/README.md). Which unseen neurons win does not change a JS distance."""
    f1, f2 = int((counts == 1).sum()), int((counts == 2).sum())
    unseen = np.flatnonzero(counts == 0)
    # No singleton: Good-Turing's missing mass would be 0, and nine sampled items that share
    # one winner would claim the truth has no other (an expected JS of 0 beside an actual
    # 0.26, and an UNTIL met after its first round). One unseen winner is as plausible as one
    # more item (Laplace's rule of succession): a mass of 1/(n+1).
    # Likewise Chao1 rounding to no unseen winner (f1 = 1, or f1² < f2).
    f1 = max(f1, 1)
    found = max(f1 * f1 / (2 * f2) if f2 > 0 else f1 * (f1 - 1) / 2, 1)
    found = int(min(round(found), len(unseen), max(population - n, 0)))
    if found == 0:
        return share
    missing = f1 / (n + 1)  # not f1 / n: a sample of singletons keeps some of its own mass
    truth = share * (1 - missing)
    truth[unseen[:found]] += missing / found
    return truth


def _widened(fitted: Fitted | None) -> float | None:
    return fitted.widened if fitted is not None and fitted.widened > 1.0 else None


def _name(fitted: Fitted | None) -> str:
    return "assisted" if fitted is not None else "plain"


def unavailable(reason: str) -> Estimate:
    return Estimate(COVERS, False, reason=reason)
