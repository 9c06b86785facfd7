"""The extrapolation check (engine/extrapolation.py): the assisted fit asked for values known
for every item, against the same check written out in numpy; what each layer is checked on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.engine import extrapolation
from diagql.engine.covariates import Covariates
from diagql.engine.regression import RIDGE
from tests.test_block_auxiliaries import _widening
from tests.test_estimate_assisted import _numpy_assisted, _numpy_widening


@pytest.mark.parametrize("chosen", ["at random", "by the latent's extremes"])
def test_extrapolation_widens_only_where_the_fit_misses_the_known_minor_directions(chosen):
    """A block whose minor directions are a curve in the latent: a sample of the latent's
    extremes extrapolates a line to the middle and misses their known means; a random one
    does not. The factor against the check written out in numpy (``_widening``)."""
    rng = np.random.default_rng(7)
    N, k, p = 4000, 8, 2
    zl = rng.standard_normal((N, p))
    zb = np.hstack([zl[:, :1] * rng.standard_normal(k // 2),
                    zl[:, :1] ** 2 + 0.3 * rng.standard_normal((N, k // 2))])
    check = extrapolation.Check((zb[:, k // 2:],), extrapolation.MINOR_SHARE, "minor")
    items = (rng.choice(N, 300, replace=False) if chosen == "at random"
             else np.flatnonzero(np.abs(zl[:, 0]) > 1.6))
    items.sort()
    everyone = np.arange(N)
    widened = extrapolation.widening(check, Covariates((zl,)), items, None, everyone, {None: N},
                                     {None: zl.mean(axis=0)})
    expected = _widening(np.hstack([np.zeros((N, 32 - k // 2)), zb]), zl, items, everyone,
                         np.zeros(N, int), {0: zl.mean(axis=0)}, {0: N})
    np.testing.assert_allclose(widened[None], expected[0], rtol=1e-9)
    assert (widened[None] > 1.5) if chosen != "at random" else widened[None] == 1.0


def test_a_grouped_check_judges_each_group_by_its_own_misses_shrunk_toward_the_querys():
    """GROUP BY: each group's fit against its own matching items' means (which the check
    computes, or takes from the plan's covariate means), its ratio shrunk toward the pooled
    one; the factors against the check written out in numpy. Group 0's sample is drawn from
    its extremes (its fit misses), groups 1 and 2 at random (theirs do not): one factor for
    all had widened the honest groups too and too little for group 0."""
    rng = np.random.default_rng(8)
    N, p = 6000, 2
    zl = rng.standard_normal((N, p))
    keys = rng.integers(0, 3, size=N)
    known = np.c_[np.abs(zl[:, :1]) + 0.2 * rng.standard_normal((N, 8)),
                  zl[:, 1:2] ** 2 + 0.2 * rng.standard_normal((N, 8))]
    extremes = np.flatnonzero((keys == 0) & (np.abs(zl[:, 0]) > 1.2))
    at_random = rng.choice(np.flatnonzero(keys > 0), 400, replace=False)
    items = np.sort(np.r_[extremes, at_random])
    population = {g: int((keys == g).sum()) for g in range(3)}
    means = {g: zl[keys == g].mean(axis=0) for g in range(3)}
    widened = extrapolation.widening(extrapolation.Check((known,), 1.0, "known"),
                                     Covariates((zl,)), items, keys, np.arange(N), population,
                                     means)
    expected = _numpy_widening(known, zl, items, np.arange(N), keys, means, population, 1.0)
    for g in range(3):
        np.testing.assert_allclose(widened[g], expected[g], rtol=1e-9)
    fitted = _numpy_assisted(known[items], zl[items], keys[items], means, population, RIDGE)
    own = {g: np.sqrt(((m - known[keys == g].mean(axis=0)) ** 2).sum() / (se ** 2).sum())
           for g, (m, se) in fitted.items()}
    pooled = np.sqrt(sum(((m - known[keys == g].mean(axis=0)) ** 2).sum()
                         for g, (m, _) in fitted.items()) /
                     sum((se ** 2).sum() for _, se in fitted.values()))
    assert own[0] > 3 and max(own[1], own[2]) < 1.5
    assert widened[1] < pooled < widened[0] and widened[2] < pooled
    with_offset = extrapolation.Check((known,), 1.0, "known", offset=0)
    in_plan = {g: np.r_[means[g], known[keys == g].mean(axis=0)] for g in range(3)}
    again = extrapolation.widening(with_offset, Covariates((zl,)), items, keys, np.arange(N),
                                   population, in_plan)
    assert again == pytest.approx(widened, rel=1e-12)
    low, high = min(widened.values()), max(widened.values())
    assert extrapolation.describe(widened) == \
        f"intervals widened {low:.2f}-{high:.2f}x, each group by its own misses"


def test_a_layer_inside_a_block_is_fitted_and_checked_on_that_blocks_projections(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), nn.Flatten(),
                          nn.Sequential(nn.Linear(144, 32), nn.ReLU()), nn.Linear(32, 10))
    conn = diagql.connect(model.eval(), digits, cache_dir=False, progress=False)
    assert "0" in [layer for _, layer in conn.profile.auxiliaries.names]
    text = dict(conn.query("EXPLAIN AVG NEURONS IN 0.0 USING SAMPLE random(0.1)")
                .plan.explain())["estimator"]
    assert "the 32 leading principal components of 0, the nearest block" in text
    assert "checked on 0's minor directions, its leading ones' magnitudes and the " \
           "latent's next components" in text


@pytest.mark.parametrize("query", ["AVG NEURONS IN 0.0", "TOPK 5 NEURONS IN 2",
                                   "AVG NEURONS IN 0 GROUP BY class",
                                   "ARGMAX NEURONS IN 2 WHERE class = 3"])
def test_a_sample_of_every_matching_item_is_exact_with_nothing_widened(digits, query):
    # random(1.0) draws every item: there is nothing left to estimate. The check had widened
    # its zero-width intervals by its misses' rounding ("intervals widened 3.2x").
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), nn.Flatten(),
                          nn.Sequential(nn.Linear(144, 32), nn.ReLU()), nn.Linear(32, 10))
    conn = diagql.connect(model.eval(), digits, cache_dir=False, progress=False)
    sampled = conn.query(f"{query} USING SAMPLE random(1.0)")
    full = conn.query(f"{query} USING FULL")
    parts = list(sampled.groups.values()) if sampled.groups is not None else [sampled]
    wholes = list(full.groups.values()) if full.groups is not None else [full]
    for part, whole in zip(parts, wholes):
        estimate = part.estimate
        assert estimate.exact and estimate.n == estimate.population
        assert not estimate.widened or estimate.widened == 1.0
        np.testing.assert_allclose(part.values, whole.values, rtol=1e-9, atol=1e-12)
        # of width 0, or the held rows' float32 rounding either side, holding the exact
        width = estimate.ci_high - estimate.ci_low
        assert np.all(width <= 1e-5 * max(np.abs(whole.values).max(), 1.0))
        assert np.all((estimate.ci_low <= whole.values + 1e-12)
                      & (whole.values - 1e-12 <= estimate.ci_high))
    assert "it holds every matching item" in str(sampled)
    assert "widened" not in str(sampled)


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1)  # registered last: a block of its own
        self.out = nn.ReLU()

    def forward(self, x):
        return self.out(self.body(x) + self.skip(x))


class _SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.stage = _Residual(4, 24)  # most of the weights: a trunk, its children blocks too
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.hidden = _LinearReLU(96, 16)  # the latent, one module: no layer inside it
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.hidden(self.flat(self.pool(self.stage(self.act(self.stem(x)))))))


class _LinearReLU(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, width) / width ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out))

    def forward(self, x):
        return torch.relu(x @ self.weight.T + self.bias)


def test_a_layer_after_a_stage_is_fitted_on_the_stage_and_checked_on_the_latents_coordinates(
        digits):
    """A pooling after a residual stage reads the stage's output: it is fitted on the stage's
    projections, not on its shortcut's (the last block registered before it), and, with no
    block after it, also checked on the latent's own coordinates (latent = ReLU(W·flat)),
    against numpy; a layer with blocks after it is not, nor on the latent's next components (a
    function of its block's output). Where the latent's module is a Sequential(Linear, ReLU),
    it is opened: its Linear is a block, which its 16 directions span (exact), and the pooling
    has a block after it."""
    torch.manual_seed(0)
    model = _SmallResNet().eval()
    conn = diagql.connect(model, digits, cache_dir=False, progress=False)
    blocks = [layer for _, layer in conn.profile.auxiliaries.names]
    assert {"stage", "stage.skip"} <= set(blocks)

    def estimator(layer: str) -> str:
        return dict(conn.query(f"EXPLAIN AVG NEURONS IN {layer} USING SAMPLE vas(0.1)")
                    .plan.explain())["estimator"]

    text = estimator("pool")
    assert "of stage, the nearest block" in text and "the latent's coordinates" in text
    assert "the latent's next components" in text
    text = estimator("act")  # a function of stem's output, blocks after it: stem's parts only
    assert "of stem, the nearest block" in text and "coordinates" not in text
    assert "the latent's next components" not in text
    latents = conn.profile.latents.astype(np.float64)
    spread = latents.std(axis=0)
    varies = spread > 0
    expected = (latents[:, varies] - latents[:, varies].mean(axis=0)) / spread[varies]
    np.testing.assert_allclose(extrapolation.latent_coordinates(conn.profile), expected,
                               rtol=1e-4, atol=1e-5)


def test_a_sequential_that_holds_the_latent_is_opened_and_its_linear_answered_exactly(digits):
    torch.manual_seed(0)
    model = _SmallResNet()
    model.hidden = nn.Sequential(nn.Linear(96, 16), nn.ReLU())  # its ReLU is the latent
    model.eval()
    conn = diagql.connect(model, digits, cache_dir=False, progress=False)
    assert "hidden.0" in [layer for _, layer in conn.profile.auxiliaries.names]
    text = dict(conn.query("EXPLAIN AVG NEURONS IN pool USING SAMPLE vas(0.1)").plan.explain())[
        "estimator"]
    assert "of stage, the nearest block" in text and "coordinates" not in text
    X = digits[0]
    with torch.no_grad():
        exact = model.hidden[0](model.flat(model.pool(model.stage(model.act(model.stem(X))))))
    result = conn.query("AVG NEURONS IN hidden.0 USING SAMPLE vas(0.1)")
    assert result.estimate.exact
    np.testing.assert_allclose(result.values, exact.double().mean(dim=0).numpy(), rtol=1e-5,
                               atol=1e-6)


def test_the_estimate_line_names_the_block_a_layer_beside_it_is_fitted_on():
    """EXPLAIN named the block whose leading projections the fit takes beside the latent's;
    the answer's own line said only "a regression on the latent" (the W2 sweep)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    conn = diagql.connect(model, (torch.randn(600, 6), torch.randint(0, 3, (600,))),
                          cache_dir=False, progress=False)
    # The ReLU "1" is in no block: the last before it is the Linear "0".
    said = " ".join(str(conn.query("AVG NEURONS IN 1 WHERE class = 1 USING SAMPLE vas(0.1)"))
                    .split())
    assert "model-assisted (a regression on the latent and block 0's leading components)" in said



def test_a_wide_latents_minor_components_are_its_residuals_leading_axes():
    """A latent wider than EXACT_WIDTH: its minor components come from subspace iteration on
    spread items, never a d × d matrix; against numpy's exact axes of the residual (the
    standardised latent less its least-squares fit on the covariates) they span the same
    leading directions, each of unit variance and uncorrelated with the covariates."""
    from types import SimpleNamespace

    from diagql.engine.covariates import reduced

    rng = np.random.default_rng(3)
    N, d = 3000, extrapolation.EXACT_WIDTH + 88
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0]
    latents = ((rng.standard_normal((N, d)) * 0.9 ** np.arange(d)) @ rotation + 2.0)
    latents = latents.astype(np.float32)
    z = np.asarray(reduced(latents))
    minor = extrapolation._latent_minor(SimpleNamespace(latents=latents, covariates=z))
    x = latents.astype(np.float64)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    x -= z @ np.linalg.lstsq(z, x, rcond=None)[0]
    values, vectors = np.linalg.eigh(x.T @ x)
    exact = x @ vectors[:, ::-1][:, :extrapolation.LATENT_MINOR]
    assert minor.shape == exact.shape
    np.testing.assert_allclose(minor.std(axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(z.T @ minor / N, 0.0, atol=1e-4)
    ours, theirs = (np.linalg.qr(a.astype(np.float64))[0] for a in (minor, exact))
    cosines = np.linalg.svd(ours.T @ theirs, compute_uv=False)  # of the subspaces' angles
    assert cosines[:24].min() > 0.999 and cosines.mean() > 0.99


@pytest.mark.parametrize("N", [6000, 300])
def test_a_wide_blocks_neuron_folds_are_the_neurons_whose_sign_varies_most(N):
    """Past FOLD_SCREEN neurons a screen on every 8th item picks the candidates: on a block
    where 100 of 3,000 neurons change sign, at distinct rates, the columns are numpy's |y| of
    the 64 whose sign varies most over all FOLD_ITEMS spread items. Over a few hundred items
    there is no screen (an eighth of them had missed a third of the sparse ones: MM1)."""
    from types import SimpleNamespace

    from diagql.model.auxiliaries import spread_items

    rng = np.random.default_rng(5)
    width, k = 3000, 16
    z = rng.standard_normal((N, k)).astype(np.float32)
    basis = (rng.standard_normal((width, k)) / 4).astype(np.float32)
    mean = np.full(width, 50.0, dtype=np.float32)  # never below zero
    varying = rng.choice(width, 100, replace=False)
    # above zero on 50% to 3% of the items, the sparsest few on a handful of a few hundred
    mean[varying] = -np.linspace(0.0, 1.9, 100) * np.linalg.norm(basis[varying], axis=1)
    folds = extrapolation._neuron_folds(SimpleNamespace(z=z, basis=basis, mean=mean))
    chosen = z[spread_items(N, extrapolation.FOLD_ITEMS)].astype(np.float64)
    positive = (mean + chosen @ basis.T.astype(np.float64) > 0).mean(axis=0)
    mixed = np.minimum(positive, 1 - positive)
    top = np.sort(np.argsort(-mixed, kind="stable")[:extrapolation.FOLDS])
    rows = np.abs(mean[top] + z.astype(np.float64) @ basis[top].T.astype(np.float64))
    np.testing.assert_allclose(folds, rows / rows.std(axis=0), rtol=1e-4, atol=1e-4)


class _TwoBranches(nn.Module):
    """``act`` is fed by block ``a``; ``side`` is registered after ``a`` but computed from
    the input; ``mid`` is a block still to come after both, before the latent's ``trunk``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.side = nn.Tanh()
        self.mid = nn.Sequential(nn.Linear(48, 32), nn.ReLU())
        self.trunk = nn.Sequential(nn.Linear(32, 32), nn.ReLU())  # its ReLU: the latent
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = self.mid(torch.cat([self.act(self.a(x)), self.side(x * x - 1)], 1))
        return self.head(self.trunk(h))


def test_only_a_layer_fed_by_its_block_leaves_the_latents_check_out():
    """The probe records which module's output each layer's input was (``fed_by``): ``act``
    is a function of block ``a``'s output, checked on a's parts alone; ``side``, registered
    after ``a`` but fed from the input, keeps the latent's next components (without them
    such a branch had covered 0.85: review MM1)."""
    torch.manual_seed(0)
    X = torch.randn(1500, 16)
    y = torch.arange(1500) % 4
    conn = diagql.connect(_TwoBranches().eval(), (X, y), cache_dir=False, progress=False)
    catalog = conn.catalog
    assert catalog["act"].fed_by == "a" and catalog["side"].fed_by == ""
    assert catalog.upstream("mid.1") == ("mid.0",) and catalog.upstream("side") == ()

    def estimator(layer: str) -> str:
        return dict(conn.query(f"EXPLAIN AVG NEURONS IN {layer} USING SAMPLE vas(0.1)")
                    .plan.explain())["estimator"]

    assert "of a, the nearest block" in estimator("act")
    assert "the latent's next components" not in estimator("act")
    assert "of a, the nearest block" in estimator("side")
    assert "the latent's next components" in estimator("side")


class _Fed(nn.Module):
    """``act1`` after an in-place ReLU after ``a``; ``act2`` after a residual sum made in
    place outside any module; ``fuse`` called on two branches."""

    class Fuse(nn.Module):
        def forward(self, p, q):
            return p * q

    def __init__(self):
        super().__init__()
        self.a, self.relu = nn.Linear(8, 8), nn.ReLU(inplace=True)
        self.act1 = nn.Tanh()
        self.b, self.skip, self.act2 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Tanh()
        self.fuse = self.Fuse()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        one = self.act1(self.relu(self.a(x)))
        h = self.b(x)
        h += self.skip(x)
        return self.head(self.fuse(one, self.act2(h)))


def test_a_layer_is_fed_by_a_module_only_through_its_one_unchanged_tensor():
    """An in-place ReLU's output is its input, changed by the ReLU itself: the chain goes on
    through it; a tensor changed in place between modules (a residual sum) or a module of two
    tensors (a fusion) is fed by no one module (review NN1: both had left the latent's check
    out)."""
    conn = diagql.connect(_Fed().eval(), (torch.randn(60, 8), torch.arange(60) % 3),
                          cache_dir=False, progress=False)
    catalog = conn.catalog
    assert catalog["relu"].fed_by == "a" and catalog["act1"].fed_by == "relu"
    assert catalog.upstream("act1") == ("relu", "a")
    assert catalog["act2"].fed_by == "" and catalog["fuse"].fed_by == ""


class _Guarded(nn.Module):
    """A frozen part run under inference_mode; ``blk`` whose first child passes its input
    through; ``fb``, which catches its child ``fast`` raising and falls back to ``lin``."""

    class Fallback(nn.Module):
        def __init__(self):
            super().__init__()
            self.fast, self.lin = nn.Linear(3, 8), nn.Linear(8, 8)

        def forward(self, x):
            try:
                return self.fast(x)  # the wrong width: raises
            except RuntimeError:
                return self.lin(x)

    def __init__(self):
        super().__init__()
        self.frozen, self.a = nn.Linear(8, 8), nn.Linear(8, 8)
        self.blk = nn.Sequential(nn.Identity(), nn.Linear(8, 8))
        self.fb, self.head = self.Fallback(), nn.Linear(8, 3)

    def forward(self, x):
        with torch.inference_mode():
            x = self.frozen(x)
        return self.head(self.fb(self.blk(self.a(x.clone()))))


def test_feeders_are_read_as_each_module_is_called():
    """An inference tensor keeps no version: reading it had failed every connection of a
    model with a frozen part; a child that passes its input through had been taken for its
    block's feeder, and a child that raised left the stack off by one (review NN2)."""
    model = _Guarded().eval()
    conn = diagql.connect(model, (torch.randn(60, 8), torch.arange(60) % 3), cache_dir=False,
                          progress=False)
    catalog = conn.catalog
    assert catalog["blk"].fed_by == "a" and catalog["fb"].fed_by == "blk"
    assert catalog["fb.lin"].fed_by == "blk" and catalog["head"].fed_by == "fb"
    assert catalog["a"].fed_by == ""  # a clone of an inference tensor: no module's output
    X = torch.randn(60, 8)
    conn = diagql.connect(model, (X, torch.arange(60) % 3), cache_dir=False, progress=False)
    with torch.no_grad():
        truth = model.a(model.frozen(X)).double().mean(0).numpy()
    np.testing.assert_allclose(conn.query("AVG NEURONS IN a").values, truth, atol=1e-6)
