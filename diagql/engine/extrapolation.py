"""The assisted fit checked where the truth is known (docs/ARCHITECTURE.md, "Estimates").

A linear fit on the latent, extrapolated by a sampler that draws far from the matching items
(maxmargin's boundaries, gmm's and vas's outliers, weighted's mistakes), leaves a bias that
does not shrink with the sample and that its standard error cannot see. The profile knows
some of the model's values for every item (the blocks' principal projections, the latent
itself): the same fit,
asked for their matching items' means from the same sampled items, misses them by about its
own standard errors when it is honest. When it misses by more, the query's standard errors
widen (``widening``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diagql.engine import covariates as covariates_module
from diagql.engine.covariates import Covariates, leading, whitened
from diagql.engine.regression import assisted, of_rows
from diagql.engine.ridge import RIDGE
from diagql.model.auxiliaries import spread_items
from diagql.model.profile import Profile
from diagql.samplers.space import fit_space, one_blas_thread

# Standard deviations of an honest fit's ratio (χ²_m / m for m checks: √(2/m)) above which it
# is taken for a bias: at 2, a random sampler's queries on the tests' small CNN were widened
# 8-23% of the time (by ≤ 1.47).
NOISE_SDS = 3.0
# The share of the check's excess miss (ratio − 1) that the query's variance takes: chosen by
# measurement on the demo and the ResNet at 50,000 items (benchmarks/README.md, "Issue 15:
# intervals at scale"). A block's own residual (what its 64 directions miss) is less tied to
# the latent than its minor directions, and carries about half their excess (1.0 over-covered:
# error / se 0.61-0.86); a layer fitted on the latent alone is checked on its block's whole
# projections or the latent's minor components, whose miss it matched.
MINOR_SHARE = 0.5
WHOLE_SHARE = 1.0
# A view fitted on its nearest block's leading directions (engine/covariates.py) is checked on
# their magnitudes, the block's minor directions and the latent's next components, each with
# half its excess, as a block's own minor directions are (layers inside a block at 50,000
# items: coverage 0.93-1.00; 0.97-1.00 with the latent's whole excess, 0.86-1.00 without the
# latent's check), but the latent's with all of it for a view after the last block (the
# ResNet's pool and hidden.0 covered 0.66-0.93 at half; benchmarks/README.md, "Layers beside
# a block"), and none for one fed from its block's output with blocks still to come
# (``check_for``).
# Another view of the block's own module takes the whole of each (benchmarks/README.md,
# "Token views").
NEIGHBOUR_SHARE = 0.5


@dataclass(frozen=True)
class Check:
    """Values known for every item that a query's fit is checked on: ``columns`` (parts of
    N × m), the share of their excess miss the query takes, and what they are (EXPLAIN)."""

    columns: tuple[np.ndarray, ...]
    share: float | tuple[float, ...]  # a tuple: each part's, for ``each``
    what: str
    # Where the plan already has the columns' matching means: their offset in the plan's
    # covariate means (a block's own minor directions), else None (computed here).
    offset: int | None = None
    # Whether the fit checked is on every covariate of the query (a neighbour block's major
    # directions beside the latent), not the latent's alone (a block's own residual fit).
    whole_fit: bool = False
    # Whether each part of ``columns`` is a check of its own (the widest widening taken): two
    # kinds of miss, neither diluted by the other's columns.
    each: bool = False


def check_for(profile: Profile, layer: str, chosen) -> Check | None:
    """The check of a query on ``layer`` whose covariates are ``chosen``
    (covariates.for_view): its own block projections (``auxiliary``), else the latent and
    its nearest block's leading directions (``neighbour``), else the latent alone. A view the
    profile holds has no residual to check."""
    auxiliary, neighbour = chosen.auxiliary, chosen.neighbour
    if chosen.held is not None:
        return None
    if neighbour is not None:  # what the linear fit on its leading directions cannot follow
        # And on the latent's next components, as a layer in no block is: with their whole
        # excess for a layer after the last block, nearer the latent (a pooling before the
        # head). Not for a layer after its block with blocks still to come that the probe saw
        # fed from the block's output through modules alone (a ReLU after an early
        # convolution: ``Chosen.fed``), a function of it, which the block's own parts check:
        # where a sampler draws far in the latent (gmm), the latent's miss had widened a 1-d
        # CNN's first ReLU 1.5-2.7x, expected cosine 2.4-6x the actual at coverage 0.97-1.0;
        # without it 0.93-0.96 and 1.1-1.3x (benchmarks/README.md, "twenty-ninth session").
        # A branch registered after the block but fed otherwise (from the input) keeps it:
        # without it one had covered 0.85 (review MM1).
        beside = neighbour.layer == layer
        minor = None if chosen.fed and not chosen.last else latent_minor(profile)
        parts = (_folded(neighbour), neighbour.z[:, leading(neighbour):]) + \
            (() if minor is None else (minor,))
        # Another view of the same module (a sequence's TOKEN -1 beside its mean over
        # tokens) takes each part's whole excess: its miss outgrew the half (a GRU's last
        # token under vas, gmm and maxmargin covered 0.77-0.84, with it 0.84-0.92).
        shares = (WHOLE_SHARE,) * 3 if beside else \
            (NEIGHBOUR_SHARE, NEIGHBOUR_SHARE,
             NEIGHBOUR_SHARE if chosen.encloses else WHOLE_SHARE)
        words = [f"{neighbour.layer}'s minor directions", "its leading ones' magnitudes"]
        folds = None if beside or chosen.encloses else \
            neuron_folds(profile, neighbour)
        if folds is not None:  # a layer after its block: an MLP's ReLU after its Linear
            parts, shares = parts + (folds,), shares[:len(parts)] + (WHOLE_SHARE,)
            words.append("its neurons' magnitudes")
        if minor is not None:
            words.append("the latent's next components")
        coordinates = latent_coordinates(profile) if chosen.last else None
        if coordinates is not None:  # a layer after the last block: the latent is its image
            parts, shares = parts + (coordinates,), shares[:len(parts)] + (WHOLE_SHARE,)
            words.append("the latent's coordinates")
        return Check(parts, shares[:len(parts)],
                     ", ".join(words[:-1]) + " and " + words[-1], whole_fit=True, each=True)
    if auxiliary is not None:
        k = auxiliary.z.shape[1]
        # A basis spanning the whole view (a block no wider than its DIMS directions) predicts
        # every item's row: no residual to check, and its float32 rounding had read as a fit
        # that missed (an exact answer "widened 1.56x", the W2 sweep).
        if k < 2 or k >= auxiliary.basis.shape[0]:
            # A layer equal to such a view on the items compared (model/view_aliases.py)
            # is checked where it might not be, on the latent's next components, as a layer
            # in no block is; where it is equal its residual, and so the widening, is 0.
            minor = latent_minor(profile) if chosen.alias is not None else None
            return None if minor is None else \
                Check((minor,), WHOLE_SHARE, "the latent's next components")
        return Check((auxiliary.z[:, k // 2:],), MINOR_SHARE,
                     f"{auxiliary.layer}'s minor directions", offset=k // 2)
    # Only the enclosing block's entry is read (a new process reads each block's on first use).
    inside = [(key, name) for key, name in profile.auxiliaries.names
              if layer.startswith(name + ".")]
    if inside:
        key, block = max(inside, key=lambda named: len(named[1]))  # the innermost
        found = profile.auxiliary(key)
        if found is not None:
            return Check((found.z,), WHOLE_SHARE, f"{block}'s principal components")
    minor = latent_minor(profile)
    if minor is None:
        return None
    return Check((minor,), WHOLE_SHARE,
                 f"the latent's next {minor.shape[1]} principal components")


def _folded(neighbour) -> np.ndarray:
    """|z| of the neighbour block's leading directions, the covariates' own: a nonlinear
    function of them (as a ReLU after a Linear is of its input) whose means a linear fit
    extrapolated by a sampler far from the matching items misses, and the profile knows. Its
    minor directions check the other kind of miss, a layer linear in the block whose part
    beyond the leading directions the fit does not see; the latent's next components, a layer
    near the latent (a pooling just before the head)."""
    return np.abs(neighbour.z[:, :leading(neighbour)])


# A layer after its block (an MLP's ReLU after its Linear) is checked on the magnitudes of
# at most this many of the block's neurons, those whose sign varies most.
FOLDS = 64
FOLD_ITEMS = 2048  # the items the neurons are chosen on, spread over the data
FOLD_SCREEN = 4 * FOLDS  # a wider block's neurons measured on all of them, after a screen
_FOLDS: dict = {}  # once per profile and block (covariates.once_per_profile)


def neuron_folds(profile: Profile, block) -> np.ndarray | None:
    """(N, ≤ FOLDS) float32: |y_j| of the ``block``'s neurons j rebuilt from its projections
    (y ≈ mean + basis z) for every item, each scaled to unit variance; the neurons whose sign
    varies most (at least 2% of the items on either side), None when none does. A ReLU after
    a Linear is y/2 + |y|/2 of each neuron: the fit on the block's leading directions follows
    y, and misses what |y| averages to where the sampler draws far from the matching items
    (an MLP's ReLU under ebtree and weighted covered 0.84-0.87 with the directions'
    magnitudes |z| alone, which fold at their mean, not at each neuron's zero:
    benchmarks/README.md, "2026-12-04 (nineteenth session)")."""
    return covariates_module.once_per_profile(_FOLDS, (id(profile), block.key), profile,
                                              lambda: _neuron_folds(block))


def _neuron_folds(block) -> np.ndarray | None:
    z, basis, mean = block.z, block.basis, block.mean
    with one_blas_thread():
        chosen = z[spread_items(len(z), FOLD_ITEMS)]
        # A wide block's neurons screened on every 8th of the items first, the 4·FOLDS whose
        # sign varies most there measured on all of them: a 16,384-neuron map's 2,048 × 16,384
        # products had cost 0.64 s of a first sample query (sweep LL2).
        among = np.arange(len(mean))
        # (Over a few hundred items the whole product is cheap, and an eighth of them, a few
        # dozen, had missed a third of a 4,096-neuron block's sparse neurons: review MM1.)
        if len(mean) > FOLD_SCREEN and len(chosen) >= FOLD_ITEMS // 2:
            share = (mean + chosen[::8] @ basis.T > 0).mean(axis=0)
            among = np.sort(np.argsort(-np.minimum(share, 1 - share), kind="stable")[
                :FOLD_SCREEN])
        positive = (mean[among] + chosen @ basis[among].T > 0).mean(axis=0)
        mixed = np.minimum(positive, 1 - positive)
        order = np.argsort(-mixed, kind="stable")[:FOLDS]
        order = np.sort(among[order[mixed[order] >= 0.02]])
        if not len(order):
            return None
        return whitened(np.abs(mean[order] + z @ basis[order].T))


# The latent's coordinates a layer after the last block is checked on, at most: the widest
# spread (a ResNet-50's 2,048 would be 400 MB at 50,000 items).
LATENT_COORDINATES = 64
_COORDINATES: dict = {}  # once per profile (covariates.once_per_profile)


def latent_coordinates(profile: Profile) -> np.ndarray | None:
    """(N, ≤ LATENT_COORDINATES) float32: every item's latent coordinates (not its
    principal components), the most spread of those that vary, in their order, each centred
    and scaled to unit variance; None when none varies. A layer after the last block (a
    pooling after the last stage, the Linear whose ReLU is the latent) maps onto the latent
    by a few layers, so the latent's coordinates carry its fit's miss, which its neighbour
    block's directions and the latent's next principal components did not (vas on the
    ResNet's hidden.0 covered 0.38 with them: benchmarks/README.md, "2026-12-04 (nineteenth
    session)")."""
    return covariates_module.once_per_profile(_COORDINATES, id(profile), profile,
                                              lambda: _scaled(profile.latents))


def _scaled(latents: np.ndarray) -> np.ndarray | None:
    spread = latents.std(axis=0, dtype=np.float64)
    varies = np.flatnonzero(spread > 1e-12 * max(float(spread.max(initial=0)), 1e-300))
    if not len(varies):
        return None
    keep = np.sort(varies[np.argsort(-spread[varies], kind="stable")[:LATENT_COORDINATES]])
    x = latents[:, keep].astype(np.float64)
    return whitened(x - x.mean(axis=0))


_MINOR: dict = {}  # once per profile (covariates.once_per_profile)
LATENT_MINOR = 32  # the latent's components after the covariates' checked, at most


def latent_minor(profile: Profile) -> np.ndarray | None:
    """(N, ≤ LATENT_MINOR) float32: every item's latent on its principal axes after the
    covariates' (covariates.DIMS), each scaled to unit variance, computed once per profile;
    None when the latent has no more. The directions the covariates leave out, where every
    sampler chooses (docs/ARCHITECTURE.md, "Estimates": held views), for a layer in no block."""
    return covariates_module.once_per_profile(_MINOR, id(profile), profile,
                                              lambda: _latent_minor(profile))


def _latent_minor(profile: Profile) -> np.ndarray | None:
    # The standardised latent less its part the covariates span (a least-squares fit on them
    # over every item), then that residual's leading principal axes: orthogonal to the
    # covariates by construction, whichever items their own axes were fitted on.
    # One BLAS thread: a second one waiting on a busy core made these small products several
    # times slower (0.29 s at 50,000 items under load), as for the covariates (samplers/space.py).
    latents = profile.latents
    space = fit_space(latents, None)
    z = covariates_module.covariates(profile)
    if len(space.keep) > EXACT_WIDTH:
        return _wide_minor(latents, space, z)
    x = space(latents)
    minor = None
    with one_blas_thread():
        x -= x.mean(axis=0)
        # lstsq: on 2 or 3 items the covariates are collinear (solve raised Singular matrix).
        x -= z @ np.linalg.lstsq(z, x, rcond=None)[0]
        values, vectors = np.linalg.eigh(x.T @ x)
        order = np.argsort(values)[::-1]
        keep = order[values[order] > 1e-9 * max(float(values.max(initial=0)), 1e-300)]
        if len(keep):
            minor = _unit(x @ vectors[:, keep[:LATENT_MINOR]])
    return minor


# A latent wider than this has its residual's leading axes found by subspace iteration on
# spread items (``_wide_minor``), never as a d × d matrix: a 4,096-wide latent's exact
# eigendecomposition, its N × d copy and Gram matrix had cost 25 s of a first sample query's
# planning (20,000 items), 5x the exact pass (sweep LL2).
EXACT_WIDTH = 512
MINOR_ITEMS = 10_000  # the spread items the wide latent's axes are found on
MINOR_STEPS = 3  # subspace iterations (the last one the Rayleigh-Ritz step's product)
MINOR_EXTRA = 16  # directions iterated beyond LATENT_MINOR (the oversampling)


def _wide_minor(latents: np.ndarray, space, z: np.ndarray) -> np.ndarray | None:
    """``latent_minor`` of a latent wider than EXACT_WIDTH, a block of rows at a time: the
    residual's mean and its fit on the covariates from every item, its leading axes by
    subspace iteration from a fixed start on at most MINOR_ITEMS spread items (the same
    columns in every process), then every item's row on them. The residual r = (x − μ)/σ −
    c − zS is never made: each product takes the raw rows in float32 against the axes
    scaled by 1/σ, less the offsets (the standardised copies had cost most of the time)."""
    raw = latents.reshape(len(latents), -1)
    n, full = raw.shape
    keep, inverse = space.keep, 1.0 / space.scale
    rows = max(1, (8 << 20) // (4 * full))
    blocks = [slice(a, min(a + rows, n)) for a in range(0, n, rows)]
    with one_blas_thread():
        total, zx = np.zeros(full), np.zeros((z.shape[1], full))
        for part in blocks:
            x = np.asarray(raw[part], dtype=np.float64)
            total += x.sum(axis=0)
            zx += z[part].T @ x
        shift = space.mean * inverse  # a row's standardised value is x·(1/σ) − shift
        centre = total[keep] / n * inverse - shift
        zx = zx[:, keep] * inverse - np.outer(z.sum(axis=0), shift + centre)
        slope = np.linalg.lstsq(z.T @ z, zx, rcond=None)[0]  # the normal equations' solution

        def times(items, axes):  # r·axes for the rows ``items``
            scaled = np.zeros((full, axes.shape[1]), dtype=np.float32)
            scaled[keep] = axes * inverse[:, None]
            return (np.asarray(raw[items], dtype=np.float32) @ scaled).astype(np.float64) \
                - (shift + centre) @ axes - z[items] @ (slope @ axes)

        chosen = spread_items(n, MINOR_ITEMS)
        pieces = [chosen[a:a + rows] for a in range(0, len(chosen), rows)]
        k = min(LATENT_MINOR + MINOR_EXTRA, len(keep))
        basis = np.linalg.qr(np.random.default_rng(0).standard_normal((len(keep), k)))[0]
        for step in range(MINOR_STEPS):
            product = np.zeros((len(keep), k))  # rᵀr·basis over the spread items
            for items in pieces:
                y = times(items, basis)
                x = np.asarray(raw[items], dtype=np.float32)
                product += (x.T @ y.astype(np.float32))[keep] * inverse[:, None] \
                    - np.outer(shift + centre, y.sum(axis=0)) - slope.T @ (z[items].T @ y)
            if step < MINOR_STEPS - 1:
                basis = np.linalg.qr(product)[0]
        values, vectors = np.linalg.eigh(basis.T @ product)  # Rayleigh-Ritz
        order = np.argsort(values)[::-1]
        keep_axes = order[values[order] > 1e-9 * max(float(values.max(initial=0)), 1e-300)]
        if not len(keep_axes):
            return None
        axes = basis @ vectors[:, keep_axes[:LATENT_MINOR]]
        projected = np.concatenate([times(part, axes) for part in blocks])
    return _unit(projected)


def _unit(projected: np.ndarray) -> np.ndarray | None:
    """Columns scaled to unit variance, float32; None when one does not vary."""
    spread = projected.std(axis=0)
    return (projected / spread).astype(np.float32) if (spread > 0).all() else None


def widening(check: Check, z: Covariates, items: np.ndarray, keys: np.ndarray | None,
             matching: np.ndarray, population: dict, covariate_means: dict,
             ridge: float = RIDGE) -> dict:
    """Each group's factor its standard errors widen by (key -> factor, the keys of
    ``population``): √(1 + share · (ratio − 1)), ratio the squared misses of the fit's
    estimates of the check's columns over their squared standard errors; 1.0 while the ratio
    is within NOISE_SDS of an honest fit's. A group's ratio is its own shrunk toward the
    query's (``_shrunk``). ``z``: the query's covariates, of which the fit checked takes the
    latent's (the first part) or, for ``check.whole_fit``, all; ``items``: the plan's sampled
    matching items; ``keys``: every item's group key (None: one group); ``covariate_means``:
    the plan's, each group's mean covariates (the latent's first); ``ridge``: the query's
    fit's (engine/ridge.py), which the check's fit takes too."""
    latent = Covariates(z.parts if check.whole_fit else z.parts[:1])
    p = latent.width
    columns = Covariates(check.columns)
    if check.offset is not None:
        truth = {key: means[p + check.offset:] for key, means in covariate_means.items()}
    else:
        truth = columns.means(matching, None if keys is None else keys[matching], population)
    item_keys = None if keys is None else keys[items]
    groups = {}
    for key, count in population.items():
        mine = items if item_keys is None else items[item_keys == key]
        if len(mine) >= 2 and key in truth:
            groups[key] = of_rows(columns.rows(mine), latent.rows(mine), count,
                                  covariate_means[key][:p])
    # Each part judged alone (``check.each``), the widest widening taken; else one ratio.
    bounds = np.cumsum([0] + [part.shape[1] for part in check.columns]) if check.each \
        else np.array([0, columns.width])
    parts = list(zip(bounds[:-1], bounds[1:]))
    shares = check.share if isinstance(check.share, tuple) else (check.share,) * len(parts)
    # Per group and part: squared misses, squared standard errors, columns checked.
    sums = {}
    for key, fitted in assisted(groups, ridge=ridge).items():
        seen = np.isfinite(fitted.se) & (fitted.se > 0)
        miss = np.where(seen, (fitted.mean - truth[key]) ** 2, 0.0)
        spread = np.where(seen, fitted.se ** 2, 0.0)
        sums[key] = np.array([(miss[a:b].sum(), spread[a:b].sum(), seen[a:b].sum())
                              for a, b in parts]).reshape(len(parts), 3)
    pooled = sum(sums.values()) if sums else np.zeros((len(parts), 3))
    return {key: _factor(_shrunk(sums.get(key), pooled), shares) for key in population}


# The checks a group's own ratio is worth beside the query's, pooled over its groups: a group's
# fit is checked on its own matching items' means (one sampler's draw misses some groups'
# items more than others': maxmargin's boundary share), but a few dozen columns' ratio is
# noisy. Its ratio is (c·own + PRIOR_CHECKS·pooled) / (c + PRIOR_CHECKS), judged as from
# c + PRIOR_CHECKS checks (at most the query's): one group is judged as before. Chosen by
# measurement over GROUP BY class on four models (benchmarks/README.md, "Each group's own
# widening"): groups under 0.75 coverage 2.5% → 1.1% on an MLP, intervals narrower elsewhere.
PRIOR_CHECKS = 32


def describe(factors: dict) -> str:
    """EXPLAIN's words for a query's widening (``widening``'s factors)."""
    low, high = min(factors.values()), max(factors.values())
    if high <= 1.0:
        return "within its noise"
    if len(factors) == 1 or high - low < 0.005:
        return f"intervals widened {high:.2f}x"
    return f"intervals widened {low:.2f}-{high:.2f}x, each group by its own misses"


def _shrunk(own: np.ndarray | None, pooled: np.ndarray) -> list:
    """Per part, (ratio, checks) to judge a group by: its ratio shrunk toward the pooled one
    (``PRIOR_CHECKS``), the pooled one alone where the group has none; None where no column
    of the part was checked."""
    out = []
    for i, (m, v, c) in enumerate(pooled):
        if c == 0 or v == 0:
            out.append(None)
            continue
        ratio, checks = m / v, c
        if own is not None and own[i, 1] > 0 and own[i, 2] > 0:
            mine = own[i, 2]
            ratio = (mine * own[i, 0] / own[i, 1] + PRIOR_CHECKS * ratio) / (mine + PRIOR_CHECKS)
            checks = min(mine + PRIOR_CHECKS, c)
        out.append((ratio, checks))
    return out


def _factor(judged: list, shares) -> float:
    factor = 1.0
    for part, share in zip(judged, shares):
        if part is not None and part[0] > 1 + NOISE_SDS * np.sqrt(2 / part[1]):
            factor = max(factor, float(np.sqrt(1 + share * (part[0] - 1))))
    return factor
