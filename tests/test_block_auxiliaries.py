"""Block auxiliaries (model/auxiliaries.py, engine/prediction.py): which modules are blocks,
the profile's projections against a numpy PCA of the layer's rows computed by plain torch, and
a sample query's answer on a block against the known-coefficient estimator written out in numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import stdtrit
from torch import nn

import diagql
from diagql.engine import estimate, extrapolation
from diagql.engine.aggregates import MeanState
from diagql.engine.covariates import covariates
from diagql.engine import prediction as prediction_module
from diagql.engine.prediction import BlockPrediction
from diagql.engine.regression import RIDGE
from diagql.model import auxiliaries
from diagql.model.profile import Profile
from diagql.model.views import View
from diagql.results.render import to_json, to_text
from tests.test_estimate_assisted import _numpy_assisted, _numpy_ridge, _numpy_widening

FIT = 300  # fewer than the digits' 1,797 and not a multiple of the batch: held, then streamed


@pytest.fixture(scope="module")
def db(cnn, digits):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(auxiliaries, "FIT_ITEMS", FIT)
        conn = diagql.connect(cnn, digits, batch_size=256, cache_dir=False)  # its own profile
        assert conn.profile.auxiliaries  # computed under the patch
    return conn


def _rows(cnn, X, upto: int) -> np.ndarray:
    """The output of cnn[upto - 1] per item, flattened: plain torch, no hooks."""
    with torch.no_grad():
        return cnn[:upto](X.clone()).flatten(1).double().numpy()


def test_blocks_are_the_top_level_children_with_parameters_and_a_trunk_is_opened():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(8, 8), nn.ReLU()

        def forward(self, x):
            return self.act(self.lin(x))

    class Trunk(nn.Module):  # over half the parameters, made of blocks: opened, and kept
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.trunk = nn.Linear(4, 8), Trunk()
            self.pool = nn.Identity()  # no parameters: not a block
            self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU())  # leaves only: one block
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.head(self.pool(self.trunk(self.embed(x)))))

    model = Model()
    X, y = torch.randn(20, 4), torch.arange(20) % 3
    catalog = diagql.connect(model, (X, y)).catalog
    names = [view.layer.name for view in auxiliaries.blocks(model, catalog)]
    assert names == ["embed", "trunk", "trunk.layers.0", "trunk.layers.1", "head", "out"]


def test_the_block_that_holds_the_latent_is_opened_into_its_children():
    """An MLP's enc = Sequential(Linear, ReLU, Linear, ReLU) before its head was one block,
    whose output the profile holds as the latent: no projections were kept, and enc.1 was
    fitted on the latent alone, checked on its minor components, which missed its bias under
    maxmargin (a rare class covered 0.70-0.76: sweep OO1). Its Linear layers are blocks now,
    found through a Dropout between it and the head, and enc.1 is fitted beside enc.0."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU())
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(10, 3)

        def forward(self, x):
            return self.head(self.drop(self.enc(x)))

    torch.manual_seed(0)
    model = Model().eval()
    X, y = torch.randn(300, 6), torch.arange(300) % 3
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    catalog = db.catalog
    assert [view.layer.name for view in auxiliaries.blocks(model, catalog)] == ["enc", "head"]
    assert [view.layer.name for view in auxiliaries.blocks(model, catalog, 300, "head", True)] \
        == ["enc", "enc.0", "enc.2", "head"]
    assert auxiliaries.holder(model, catalog, "enc.2", False) == "enc.2"
    # enc's rows are the latent and head's the logits: held whole, no projections of theirs
    assert [name for _, name in db.profile.auxiliaries.names] == ["enc.0", "enc.2"]
    explained = dict(db.query("EXPLAIN AVG NEURONS IN enc.1 USING SAMPLE maxmargin(0.2)")
                     .plan.explain())["estimator"]
    assert "enc.0, the nearest block" in explained and "its neurons' magnitudes" in explained
    # enc.2 spans its 10 neurons with its directions: answered exactly from the profile
    with torch.no_grad():
        exact = model.enc[:3](X).double().mean(dim=0).numpy()
    sampled = db.query("AVG NEURONS IN enc.2 USING SAMPLE random(0.1)")
    assert sampled.estimate.exact
    np.testing.assert_allclose(sampled.values, exact, rtol=1e-5, atol=1e-6)


def test_the_latent_is_followed_into_a_backbone_and_through_a_flatten():
    """A backbone whose last child returns the latent (backbone.enc) had left enc's layers
    fitted on the latent alone: only the backbone was opened; and a Flatten between a conv
    stack and the head stopped the opening, though it keeps each item's row (review QQ1)."""
    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(6, 12)
            self.enc = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Sequential(
                nn.Linear(10, 8), nn.ReLU()))

        def forward(self, x):
            return self.enc(self.stem(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.drop, self.head = Backbone(), nn.Dropout(), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.drop(self.backbone(x)))

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
            self.flat, self.head = nn.Flatten(), nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.head(self.flat(self.features(x)))

    torch.manual_seed(0)
    y = torch.arange(60) % 3
    for model, X, wanted in (
            (Model().eval(), torch.randn(60, 6),
             ["backbone.stem", "backbone.enc.0", "backbone.enc.2.0"]),
            (Conv().eval(), torch.randn(60, 1, 8, 8), ["features.0"])):  # .2: the latent
        db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
        assert [name for _, name in db.profile.auxiliaries.names] == wanted
    # enc.0 (10 wide) is spanned by its directions: exact, as torch has it
    model = Model().eval()
    X = torch.randn(60, 6)
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with torch.no_grad():
        exact = model.backbone.enc[0](model.backbone.stem(X)).double().mean(dim=0).numpy()
    result = db.query("AVG NEURONS IN backbone.enc.0 USING SAMPLE random(0.2)")
    assert result.estimate.exact
    np.testing.assert_allclose(result.values, exact, rtol=1e-5, atol=1e-6)


def test_an_opened_chain_takes_only_the_slots_the_models_own_blocks_leave():
    """A latent's module holding 60 Linears, opened, had its blocks thinned with the stem's
    to MAX_BLOCKS evenly: the stem's blocks (one of them exact) were pushed out (review
    RR1)."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
            self.mid = nn.Linear(6, 6)
            self.enc = nn.Sequential(*[module for _ in range(60)
                                       for module in (nn.Linear(6, 6), nn.ReLU())])
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.enc(self.mid(self.stem(x))))

    torch.manual_seed(0)
    model = Model().eval()
    catalog = diagql.connect(model, (torch.randn(20, 4), torch.arange(20) % 3),
                             cache_dir=False, progress=False).catalog
    names = [view.layer.name for view in auxiliaries.blocks(model, catalog, 20, "head", True)]
    assert len(names) == auxiliaries.MAX_BLOCKS
    assert names[:3] == ["stem", "mid", "enc"] and names[-1] == "head"
    inside = [name for name in names if name.startswith("enc.")]
    assert len(inside) == auxiliaries.MAX_BLOCKS - 4 and "enc.0" in inside and \
        "enc.118" in inside


def test_a_model_of_many_blocks_keeps_at_most_max_blocks_spread_over_it():
    """A ModuleList of 300 small blocks gave 300 auxiliaries: the profile pass took 9.4 s
    beside a 0.16 s forward pass."""
    class Deep(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU())
                                         for _ in range(n)])
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            for block in self.blocks:
                x = x + block(x)
            return self.out(x)

    torch.manual_seed(0)
    X, y = torch.randn(20, 4), torch.arange(20) % 3
    model = Deep(120)
    names = [view.layer.name for view in auxiliaries.blocks(
        model, diagql.connect(model, (X, y), cache_dir=False).catalog)]
    every = [f"blocks.{i}" for i in range(120)] + ["out"]
    wanted = [every[i] for i in np.round(np.linspace(0, 120, auxiliaries.MAX_BLOCKS))
              .astype(int)]
    assert names == wanted and names[0] == "blocks.0" and names[-1] == "out"
    assert len(names) == auxiliaries.MAX_BLOCKS < len(every)


def test_a_wrapper_is_seen_through():
    class Model(nn.Module):  # its blocks: proj and fc (out: the logits)
        def __init__(self):
            super().__init__()
            self.proj, self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.relu(self.fc(torch.tanh(self.proj(x)))))

    class Wrapper(nn.Module):  # no parameters of its own, one child holding them all
        def __init__(self, inner):
            super().__init__()
            self.inner, self.loss = inner, nn.CrossEntropyLoss()

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    model = Model()
    X, y = torch.randn(20, 4), torch.arange(20) % 3

    def names(m):
        catalog = diagql.connect(m, (X, y), cache_dir=False).catalog
        return [view.layer.name for view in auxiliaries.blocks(m, catalog)]

    assert names(model) == ["proj", "fc", "out"]
    assert names(Wrapper(Wrapper(model))) == ["inner.inner.proj", "inner.inner.fc",
                                              "inner.inner.out"]
    assert names(nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))) \
        == ["0.0", "0.2"]
    leaf = nn.Sequential(nn.Linear(4, 3))  # its one child is a leaf: that is the block
    assert names(leaf) == ["0"]


def test_the_profile_keeps_each_blocks_principal_projections(db, cnn, digits):
    profile = db.profile
    assert [a.layer for a in profile.auxiliaries] == ["0", "2", "6"]  # 8: the logits, held whole
    X = digits[0]
    fitted = auxiliaries.spread_items(len(X), FIT)  # tests/test_spread_fit.py checks which
    for a, upto in zip(profile.auxiliaries, (1, 3, 7)):
        rows = _rows(cnn, X, upto)
        k = min(auxiliaries.DIMS, rows.shape[1])
        assert a.basis.shape == (rows.shape[1], k) and a.fitted_on == FIT
        fit = rows[fitted] - rows[fitted].mean(axis=0)
        np.testing.assert_allclose(a.mean, rows[fitted].mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(a.basis.T @ a.basis, np.eye(k), atol=1e-5)
        # The leading directions: as much of the fitted rows' variance as numpy's SVD's k.
        singular = np.linalg.svd(fit, compute_uv=False)
        captured = ((fit @ a.basis) ** 2).sum()
        assert captured >= 0.995 * (singular[:k] ** 2).sum()
        # Every item's projection, those held before the fit and those after it.
        np.testing.assert_allclose(a.z, (rows - a.mean) @ a.basis, atol=2e-4)
    # The profile entry names the blocks; each block's arrays are an entry of their own.
    def read(key, layer):
        arrays = auxiliaries.entry_arrays(profile.auxiliary(key))
        return [auxiliaries.from_entry(arrays, key, layer, len(profile))]

    again = Profile.from_arrays(profile.to_arrays(), len(profile), read)
    for a, b in zip(profile.auxiliaries, again.auxiliaries, strict=True):
        assert (a.key, a.layer, a.fitted_on) == (b.key, b.layer, b.fitted_on)
        np.testing.assert_array_equal(a.z, b.z)
        np.testing.assert_array_equal(a.basis, b.basis)


# The pass predicts each row in float32 (ŷ = μ + z_b Vᵀ, engine/prediction.py), as the profile
# holds μ, V and z_b: its answer is numpy's float64 one up to float32 rounding of ŷ (~1e-7 of
# values of order 1, which the estimate's standard error carries).
F32 = {"rtol": 1e-6, "atol": 1e-6}


def _expected(profile, rows, items, matching, groups, reduce=None):
    """The known-coefficient estimator written out: μ + V z̄_U plus the assisted estimate of
    the residual's mean on the latent covariates (numpy, on materialised rows)."""
    a = profile.auxiliary('["2"]')
    mean, basis = a.mean.astype(np.float64), a.basis.astype(np.float64)
    if reduce is not None:
        mean, basis = reduce(mean[None])[0], reduce(basis.T).T
        rows = reduce(rows)
    zb, zl = a.z.astype(np.float64), covariates(profile)
    resid = rows[items] - (mean + zb[items] @ basis.T)
    keys = sorted(set(groups[items].tolist()))
    z_pop = {g: zl[matching[groups[matching] == g]].mean(axis=0) for g in keys}
    n_pop = {g: int((groups[matching] == g).sum()) for g in keys}
    fitted = _numpy_assisted(resid, zl[items], groups[items], z_pop, n_pop, RIDGE,
                             leverage=True)
    widen = _widening(zb, zl, items, matching, groups, z_pop, n_pop)
    return {g: (m + mean + basis @ zb[matching[groups[matching] == g]].mean(axis=0),
                se * widen[g])
            for g, (m, se) in fitted.items()}


def _widening(zb, zl, items, matching, groups, z_pop, n_pop):
    """A block query's check (engine/extrapolation.py): on its minor directions, the last 32
    of its 64 columns."""
    return _numpy_widening(zb[:, 32:], zl, items, matching, groups, z_pop, n_pop,
                           extrapolation.MINOR_SHARE)


def test_a_sample_query_on_a_block_is_the_known_coefficient_estimator(db, cnn, digits):
    profile = db.profile
    rows = _rows(cnn, digits[0], 3)
    result = db.query("AVG NEURONS IN 2 WHERE class = 3 USING SAMPLE random(0.2, random_state=1)")
    items = result.plan.items
    matching = np.flatnonzero(profile.labels == 3)
    mean, se = _expected(profile, rows, items, matching, np.zeros(len(profile), int))[0]
    np.testing.assert_allclose(result.values, mean, **F32)
    half = stdtrit(len(items) - 1, 0.975) * se
    np.testing.assert_allclose(result.estimate.ci_high - result.values, half, rtol=1e-5,
                               atol=1e-6)
    # The block's prediction beats the plain sample mean here.
    exact = rows[matching].mean(axis=0)
    assert np.abs(mean - exact).mean() < np.abs(rows[items].mean(axis=0) - exact).mean()


def test_grouped_and_channel_queries_on_a_block(db, cnn, digits):
    profile = db.profile
    rows = _rows(cnn, digits[0], 3)
    result = db.query("AVG NEURONS IN 2 GROUP BY class USING SAMPLE random(0.1, random_state=2)")
    items, everyone = result.plan.items, np.arange(len(profile))
    expected = _expected(profile, rows, items, everyone, profile.labels)
    for key, group in result.groups.items():
        np.testing.assert_allclose(group.values, expected[key][0], **F32)
    channels = db.query("AVG CHANNELS IN 2 USING SAMPLE random(0.1, random_state=2)")

    def means(x):  # channel means of rows of the layer's 8 × 6 × 6 output
        return x.reshape(len(x), 8, -1).mean(axis=2)

    mean, _ = _expected(profile, rows, channels.plan.items, everyone,
                        np.zeros(len(profile), int), reduce=means)[0]
    np.testing.assert_allclose(channels.values, mean, **F32)


def test_explain_names_the_covariates(db):
    block = db.query("EXPLAIN AVG NEURONS IN 2 USING SAMPLE random(0.1)")
    other = db.query("EXPLAIN AVG NEURONS IN 4 USING SAMPLE random(0.1)")
    text = {r.plan.query.layer.name: dict(r.plan.explain())["estimator"] for r in (block, other)}
    assert "2's 64 principal components kept by the profile pass" in text["2"]
    assert "principal components of the latent" in text["4"]  # 4 is in no block: beside 2
    assert "the 32 leading principal components of 2, the nearest block" in text["4"]


def test_a_layer_beside_a_block_is_fitted_on_its_leading_directions_as_numpy_does(db, cnn,
                                                                                  digits):
    """Layer 4 (after block 2, in none): the regression estimator on the latent's components
    and block 2's 32 leading projections, each scaled to unit variance over every item,
    written out in numpy; its check takes the widest of three, each written out too."""
    X, y = digits
    result = db.query("AVG NEURONS IN 4 USING SAMPLE maxmargin(0.1)")
    profile, items = db.profile, db.sample("maxmargin(0.1)")
    key = next(k for k, name in profile.auxiliaries.names if name == "2")
    zb = profile.auxiliary(key).z.astype(np.float64)
    major = zb[:, :32] / zb[:, :32].std(axis=0)
    Z = np.hstack([covariates(profile), major])
    Y = _rows(cnn, X, 5)
    everyone = np.arange(len(Y))
    mean, se = _numpy_assisted(Y[items], Z[items], np.zeros(len(items), int),
                               {0: Z.mean(axis=0)}, {0: len(Y)}, RIDGE, leverage=True)[0]
    np.testing.assert_allclose(result.values, mean, rtol=1e-5, atol=1e-6)
    checks = [(np.abs(zb[:, :32]), extrapolation.NEIGHBOUR_SHARE),
              (zb[:, 32:], extrapolation.NEIGHBOUR_SHARE),
              (extrapolation.latent_minor(profile).astype(np.float64), extrapolation.WHOLE_SHARE)]
    widen = max(_numpy_widening(columns, Z, items, everyone, np.zeros(len(Y), int),
                                {0: Z.mean(axis=0)}, {0: len(Y)}, share)[0]
                for columns, share in checks)
    est = result.estimate
    live = se > 0
    half = stdtrit(len(items) - 1, 0.975) * se * widen
    np.testing.assert_allclose(((est.ci_high - est.ci_low) / 2)[live], half[live], rtol=1e-4)


def _toy_prediction(rng, width: int, k: int, p: int, n: int):
    basis = np.linalg.qr(rng.standard_normal((width, k)))[0].astype(np.float32)
    mean = rng.standard_normal(width).astype(np.float32)
    zb, zl = rng.standard_normal((n, k)), rng.standard_normal((n, p))
    rows = mean + zb @ basis.T + 0.3 * rng.standard_normal((n, width)) + zl[:, :1]
    aux = auxiliaries.Auxiliary("k", "block", mean, basis, zb.astype(np.float32), n)
    return BlockPrediction(aux, p), rows, np.hstack([zl, zb])


def test_the_streamed_residual_fit_equals_numpy_on_rows():
    """A mean state's streamed residual sums (float64 rows: ŷ in float64), fitted, against the
    estimator on explicit residual rows in numpy; EVALUATE's lean form agrees."""
    rng = np.random.default_rng(0)
    n, width, k, p = 40, 12, 3, 2
    prediction, rows, z = _toy_prediction(rng, width, k, p, n)
    pop_z = np.r_[rng.standard_normal(p) * 0.1, rng.standard_normal(k) * 0.1]
    state = MeanState(width, covariates=p + k, prediction=prediction)
    for part in (slice(0, 25), slice(25, n)):
        assert state.update(torch.from_numpy(rows[part]), z=torch.from_numpy(z[part]))
    fitted = estimate.fit({None: state}, {None: 90}, {None: pop_z}, prediction)[None]
    resid = rows - (prediction.mean + z[:, p:] @ prediction.basis.T)
    ridge = _numpy_ridge(resid, z[:, :p], np.zeros(n, int), {0: pop_z[:p]})
    m, se = _numpy_assisted(resid, z[:, :p], np.zeros(n, int), {0: pop_z[:p]}, {0: 90}, ridge)[0]
    np.testing.assert_allclose(fitted.mean, m + prediction.mean + prediction.basis @ pop_z[p:],
                               rtol=1e-9)
    np.testing.assert_allclose(fitted.se, se, rtol=1e-5)
    np.testing.assert_allclose(state.finalize(), rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(prediction.corrected_mean(rows, z, pop_z), fitted.mean,
                               rtol=1e-9)


@pytest.mark.parametrize("grouped", [False, True])
def test_residual_sums_of_float32_batches_wider_than_a_piece_equal_numpy(grouped):
    """float32 rows of 5,000 neurons (several pieces per batch): the residual r = y − (μ + V z_b)
    per group, Σr and z_latentᵀr (derived in float64) and Σr² (streamed, ŷ in float32) against
    numpy in float64; the values' own sums are untouched, and a batch with NaN adds nothing."""
    rng = np.random.default_rng(4)
    n, width, k, p = 300, 5_000, 3, 2
    prediction, rows, z = _toy_prediction(rng, width, k, p, n)
    rows = rows.astype(np.float32)
    codes = rng.integers(0, 3, size=n)
    state = MeanState(width, groups=3 if grouped else None, covariates=p + k,
                      prediction=prediction)
    for start in (0, 128, 256):
        part = slice(start, start + 128)
        assert state.update(torch.from_numpy(rows[part]),
                            torch.from_numpy(codes[part]) if grouped else None,
                            torch.from_numpy(z[part]))
    spoiled = rows[:40].copy()
    spoiled[33, 4_999] = np.nan
    assert not state.update(torch.from_numpy(spoiled),
                            torch.from_numpy(codes[:40]) if grouped else None,
                            torch.from_numpy(z[:40]))
    Y = rows.astype(np.float64)
    R = Y - (prediction.mean + z[:, p:] @ prediction.basis.T)
    for g in range(3) if grouped else [None]:
        mine = np.ones(n, bool) if g is None else codes == g
        part = state if g is None else state.group(g)
        assert part.count == mine.sum()
        np.testing.assert_allclose(part.sum.numpy(), Y[mine].sum(axis=0), rtol=1e-12)
        r = prediction.sums(part, 900, np.zeros(p + k))
        assert r.n == mine.sum() and r.population_z.shape == (p,)
        np.testing.assert_allclose(r.total, R[mine].sum(axis=0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(r.cross.zz.numpy(), z[mine, :p].T @ z[mine, :p], rtol=1e-12)
        np.testing.assert_allclose(r.cross.z.numpy(), z[mine, :p].sum(axis=0), rtol=1e-12)
        # Every row is a fit row here: the residual's own sums, r in float32.
        fit = r.fit_rows
        assert fit.n == mine.sum()
        np.testing.assert_allclose(fit.total, R[mine].sum(axis=0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(fit.squares, (R[mine] ** 2).sum(axis=0), rtol=1e-5)
        np.testing.assert_allclose(fit.cross.zy.numpy(), z[mine, :p].T @ R[mine], rtol=1e-5,
                                   atol=1e-4)
        np.testing.assert_allclose(fit.cross.zz.numpy(), z[mine, :p].T @ z[mine, :p],
                                   rtol=1e-12)


def test_covariates_join_their_parts_only_for_the_rows_asked():
    """Covariates keep the latent's float64 and a block's float32 parts apart: rows, a
    shard's subset and group means (one group, few, many; runs that are slices and runs that
    are gathers) against numpy on the joined float64 matrix."""
    from diagql.engine import covariates as module
    from diagql.engine.covariates import Covariates

    rng = np.random.default_rng(1)
    latent = rng.standard_normal((500, 4))
    block = rng.standard_normal((500, 3)).astype(np.float32)
    joined = np.concatenate([latent, block.astype(np.float64)], axis=1)
    z = Covariates((latent, block))
    assert z.width == 7
    idx = np.sort(rng.choice(500, 60, replace=False))
    np.testing.assert_array_equal(z.rows(idx), joined[idx])
    for width in (2, 4, 6):  # the first columns only: inside the latent, all of it, past it
        np.testing.assert_array_equal(z.rows(idx, width), joined[idx, :width])
    part = z.subset(idx[10:40])
    np.testing.assert_array_equal(part.rows(idx[[12, 30, 39]]), joined[idx[[12, 30, 39]]])
    old_run, module._RUN = module._RUN, 64  # several runs per group
    try:
        for matching in (np.arange(500), np.sort(rng.choice(500, 200, replace=False))):
            for groups in (3, 40):
                keys = rng.integers(0, groups, len(matching))
                population = {k: 1 for k in np.unique(keys).tolist()}
                got = z.means(matching, keys, population)
                assert sorted(got) == sorted(population)
                for key, mean in got.items():
                    np.testing.assert_allclose(mean, joined[matching[keys == key]].mean(axis=0),
                                               rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(z.means(matching, None, {None: 1})[None],
                                       joined[matching].mean(axis=0), rtol=1e-12, atol=1e-15)
    finally:
        module._RUN = old_run


def test_group_means_of_every_item_grouped_pair_each_item_with_its_own_row():
    """Every item matching, grouped, with item 0 in the lowest group and the last item in the
    highest: the group-sorted items span first..last in one run, but not in index order, so
    a slice would pair codes with other items' rows (EVALUATE's means on the ResNet were)."""
    from diagql.engine.covariates import Covariates

    rng = np.random.default_rng(2)
    latent = rng.standard_normal((300, 4))
    keys = rng.integers(0, 5, 300)
    keys[0], keys[-1] = 0, 4
    got = Covariates((latent,)).means(np.arange(300), keys, set(range(5)))
    for key in range(5):
        np.testing.assert_allclose(got[key], latent[keys == key].mean(axis=0), rtol=1e-12,
                                   atol=1e-15)


def test_argmax_on_a_block_is_exact_from_every_items_winner(db, cnn, digits):
    """The profile pass keeps every item's winner of each block, so an assisted ARGMAX on a
    block answers the matching items' exact shares (plain torch over all of them) with no
    error, from a sample; the plain estimator keeps the sample's own shares."""
    rows = _rows(cnn, digits[0], 3)
    matching = np.flatnonzero(digits[1].numpy() == 3)
    query = "ARGMAX NEURONS IN 2 WHERE class = 3 USING SAMPLE random(0.2, random_state=3)"
    result = db.query(query)
    items = result.plan.items
    assert 2 <= len(items) < len(matching)
    exact = np.bincount(rows[matching].argmax(axis=1), minlength=rows.shape[1]) / len(matching)
    np.testing.assert_allclose(result.values, exact, atol=1e-12)
    assert result.estimate.expected == 0.0 and result.estimate.exact
    assert result.n_items == len(matching)  # counted from every matching item
    assert "ARGMAX exact" in dict(result.plan.explain())["estimator"]
    assert "counted, not estimated" in to_text(result, width=200)
    assert json.loads(to_json(result))["estimate"]["exact"] is True
    db.execute("SET estimator = plain")
    try:
        plain = db.query(query).values
    finally:
        db.execute("SET estimator = assisted")
    own = np.bincount(rows[items].argmax(axis=1), minlength=rows.shape[1]) / len(items)
    np.testing.assert_allclose(plain, own, atol=1e-12)


def test_a_view_the_profile_holds_is_its_own_auxiliary(db, cnn, digits):
    """Layer 7 is the latent (the profile holds every item's row): an assisted sample query on
    it predicts each item by its own row, so its answer is the matching items' exact mean
    (plain torch), marked exact; the plain estimator keeps the sample's mean."""
    profile = db.profile
    assert profile.rows_of('["7"]') is profile.latents and profile.auxiliary('["7"]') is None
    rows = _rows(cnn, digits[0], 8)
    matching = np.flatnonzero(profile.labels == 3)
    exact = rows[matching].mean(axis=0)
    query = "AVG NEURONS IN 7 WHERE class = 3 USING SAMPLE random(0.1, random_state=4)"
    result = db.query(query)
    items = result.plan.items
    assert 2 <= len(items) < len(matching)
    np.testing.assert_allclose(result.values, exact, **F32)
    assert result.estimate.exact and result.estimate.expected == 0.0
    # exact to the held rows' float32 rounding: 8 ulps of each neuron's rows' size either
    # side (over spread items: within a few percent of all items' here), holding the truth
    half = (result.estimate.ci_high - result.estimate.ci_low) / 2
    size = np.sqrt(np.mean(rows ** 2, axis=0))
    np.testing.assert_allclose(half, 8 * np.finfo(np.float32).eps * size, rtol=0.1, atol=1e-12)
    assert np.all((result.estimate.ci_low <= exact) & (exact <= result.estimate.ci_high))
    top = db.query("TOPK 5 NEURONS IN 7 WHERE class = 3 USING SAMPLE random(0.1, random_state=4)")
    assert set(top.neurons.tolist()) == set(np.argsort(-exact)[:5].tolist())
    assert "own row (the profile holds every item's 7)" in \
        dict(db.query("EXPLAIN " + query).plan.explain())["estimator"]
    db.execute("SET estimator = plain")
    try:
        plain = db.query(query)
    finally:
        db.execute("SET estimator = assisted")
    np.testing.assert_allclose(plain.values, rows[items].mean(axis=0), **F32)
    assert np.abs(plain.values - exact).max() > 1e-3  # the sample alone is not exact


@pytest.mark.parametrize("layer", ["7", "8"])  # the latent, the logits
def test_a_held_view_answers_groups_the_sample_holds_few_or_none_of(db, cnn, digits, layer):
    """AVG and TOPK on a view the profile holds are the matching items' exact means (plain
    torch) for a group of which the sample holds one item or none, where a sample's mean has
    nothing to go on: before, such a group had no answer at all."""
    X, y = digits
    rows = _rows(cnn, X, int(layer) + 1)
    sample = db.sample("random(0.01, random_state=1)")
    held = np.bincount(y.numpy()[sample], minlength=10)
    for n in (0, 1):
        c = int(np.flatnonzero(held == n)[0])  # the sample holds 0 of class 2, 1 of class 3
        exact = rows[y.numpy() == c].mean(axis=0)
        where = f"WHERE class = {c} USING SAMPLE random(0.01, random_state=1)"
        avg = db.query(f"AVG NEURONS IN {layer} {where}")
        # computed from every matching item: its count is theirs, not the sample's n (OO3)
        assert avg.estimate.n == n and avg.n_items == avg.estimate.population == (y == c).sum()
        assert avg.estimate.exact
        np.testing.assert_allclose(avg.values, exact, rtol=1e-9, atol=1e-12)
        top = db.query(f"TOPK 3 NEURONS IN {layer} {where}")
        np.testing.assert_array_equal(top.neurons, np.argsort(-exact, kind="stable")[:3])
        assert "exact, from a sample: the profile holds every item's" in to_text(top)
    grouped = db.query(f"AVG NEURONS IN {layer} GROUP BY class "
                       "USING SAMPLE random(0.01, random_state=1)")
    assert set(grouped.groups) == set(range(10))
    for c, group in grouped.groups.items():
        np.testing.assert_allclose(group.values, rows[y.numpy() == c].mean(axis=0),
                                   rtol=1e-9, atol=1e-12)
        assert group.n_items == (y == c).sum().item()
    assert grouped.n_items == len(y) and f"{len(y):,} matching items" in to_text(grouped)


def test_a_held_view_of_any_width_answers_a_sample_exactly():
    """A latent wider than 128 had been predicted from its 64 principal components with the
    residual fitted, and a GRU's 200-wide one covered 0.82-0.88 under vas, gmm, ebtree and
    maxmargin (sweep II1). Its rows are in the profile: every sampler's AVG, TOPK and GROUP
    BY of it answer the matching items' exact means (plain torch), with no pass."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(12, 300), torch.nn.ReLU(),
                                torch.nn.Linear(300, 4)).eval()
    X = torch.randn(600, 12)
    with torch.no_grad():
        rows = model[:2](X).double().numpy()
        y = model(X).argmax(1)
    y[::7] = (y[::7] + 1) % 4  # some mistakes, so that WHERE incorrect matches
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    assert db.profile.latent_layer == "input of 2"  # the rows of layer 1
    wrong = np.flatnonzero(db.profile.labels != db.profile.predictions)
    for sampler in ("vas(0.1, random_state=1)", "maxmargin(0.1, random_state=2)", "ebtree()"):
        before = db.counters["items"]
        mean = db.query(f"AVG NEURONS IN 1 WHERE incorrect USING SAMPLE {sampler}")
        np.testing.assert_allclose(mean.values, rows[wrong].mean(axis=0)[mean.neurons],
                                   rtol=1e-6, atol=1e-7)
        assert mean.estimate.exact and mean.estimate.expected == 0.0
        top = db.query(f"TOPK 5 NEURONS IN 1 USING SAMPLE {sampler}")
        want = np.argsort(-rows.mean(axis=0), kind="stable")[:5]
        assert sorted(top.neurons.tolist()) == sorted(want.tolist())
        grouped = db.query(f"AVG NEURONS IN 1 GROUP BY class USING SAMPLE {sampler}")
        for c, group in grouped.groups.items():
            np.testing.assert_allclose(group.values[np.argsort(group.neurons)],
                                       rows[y.numpy() == c].mean(axis=0), rtol=1e-6, atol=1e-7)
        assert db.counters["items"] == before


def test_argmax_on_a_view_the_profile_holds_is_exact(db, cnn, digits):
    """Every item's winner of a held view is known: an assisted ARGMAX of a sample answers the
    matching items' own shares (plain torch), with an expected distance of 0; in EVALUATE the
    assisted answers of the layer are exact wherever a cell was sampled, so its S3 and S2 are
    both the share of cells the sample missed (each scored 1)."""
    logits = _rows(cnn, digits[0], 9)
    matching = np.flatnonzero((db.profile.labels == 2) & ~db.profile.correct)
    result = db.query("ARGMAX NEURONS IN 8 WHERE class = 2 AND incorrect "
                      "USING SAMPLE random(0.3, random_state=5)")
    assert 2 <= len(result.plan.items) < len(matching)
    exact = np.bincount(logits[matching].argmax(axis=1), minlength=10) / len(matching)
    np.testing.assert_allclose(result.values, exact, atol=1e-12)
    assert result.estimate.expected == 0.0
    scores = db.query("EVALUATE SAMPLERS random AT 0.2 LAYERS 8 SEEDS 1")
    row = dict(zip(scores.columns, scores.rows[0]))
    assert abs(row["S3 assisted"] - row["S2 assisted"]) < 1e-6 < row["S3"] - row["S3 assisted"]


def test_a_held_views_covariates_are_the_profiles_rows_and_its_winners_are_known(db):
    """A held view's covariates keep no copy of its rows: their parts are the profile's own
    logits, the rows they join on demand equal numpy's [latent covariates | logits], and every
    item's winner is kept as an index (one byte for 10 classes)."""
    from diagql.engine.covariates import for_view

    profile = db.profile
    logits = profile.logits
    key = next(k for k in profile.logit_views)
    chosen = for_view(profile, key)
    assert chosen.z.parts[1] is logits and len(chosen.z.parts) == 2
    winners = profile.winners_of(View(db.catalog[json.loads(key)[0]]))
    np.testing.assert_array_equal(winners, logits.argmax(axis=1))
    assert winners.itemsize == 1
    items = np.array([0, 5, 17, 400])
    want = np.hstack([covariates(profile)[items], logits[items]])
    np.testing.assert_array_equal(chosen.z.rows(items), want)


def test_another_models_held_rows_are_not_its_auxiliary(cnn, digits):
    """A query on model b's logits planned on model a's profile (its sample drawn there and
    reading no prediction) must not take a's logits for b's: the latent fit answers, as b's
    rows are not in a's profile."""
    from tests.models import build_cnn

    X, y = digits
    b = build_cnn(seed=3)
    db = diagql.connect({"a": cnn, "b": b}, (X, y), cache_dir=False, progress=False)
    own = db.query("AVG NEURONS IN a.8 USING SAMPLE random(0.2)")
    other = db.query("AVG NEURONS IN b.8 USING SAMPLE random(0.2)")
    assert own.plan.prediction is not None and "own" in own.plan.prediction.predictor
    assert other.plan.prediction is None
    assert "own row" not in dict(other.plan.explain())["estimator"]
    a_exact, b_exact = _rows(cnn, X, 9).mean(axis=0), _rows(b, X, 9).mean(axis=0)
    np.testing.assert_allclose(own.values, a_exact, **F32)
    assert np.abs(other.values - b_exact).max() < 0.5 * np.abs(a_exact - b_exact).max()
    # Nor a's winners of a block for b's: only the profile's own model's ARGMAX is exact.
    own = db.query("ARGMAX NEURONS IN a.2 USING SAMPLE random(0.2)")
    other = db.query("ARGMAX NEURONS IN b.2 USING SAMPLE random(0.2)")
    assert "ARGMAX exact" in dict(own.plan.explain())["estimator"]
    assert "ARGMAX exact" not in dict(other.plan.explain())["estimator"]
    assert other.plan.winner_shares is None and other.estimate.expected > 0


def test_fit_rows_keep_every_s_th_item_of_each_group_up_to_the_limit():
    assert prediction_module.fit_rows(None, 40, limit=40) is None
    keep = prediction_module.fit_rows(None, 101, limit=40)  # stride 3: items 0, 3, ..., 99
    np.testing.assert_array_equal(np.flatnonzero(keep), np.arange(0, 101, 3))
    codes = np.array([0, 1, 0, 2, 0, 0, 1, 0, 0])  # group 0 has 6 items: stride 2 at share 3
    assert prediction_module.fit_rows(codes, len(codes), limit=18, floor=1) is None
    keep = prediction_module.fit_rows(codes, len(codes), limit=9, floor=1)  # 3 groups: 3 each
    np.testing.assert_array_equal(np.flatnonzero(keep), [0, 1, 3, 4, 6, 7])
    # A group's share is never under the floor, whatever the number of groups.
    keep = prediction_module.fit_rows(codes, len(codes), limit=3, floor=3)
    np.testing.assert_array_equal(np.flatnonzero(keep), [0, 1, 3, 4, 6, 7])
    assert prediction_module.fit_rows(codes, len(codes), limit=3, floor=6) is None


@pytest.mark.parametrize("grouped", [False, True])
def test_a_large_groups_residual_variance_comes_from_every_s_th_row(grouped):
    """The residual's sums over the rows ``fit`` marks (their count, Σr, Σr², z_latentᵀr),
    with Σr, Σz and Σzzᵀ over every row (numpy)."""
    rng = np.random.default_rng(5)
    n, width, k, p = 300, 50, 3, 2
    prediction, rows, z = _toy_prediction(rng, width, k, p, n)
    codes = rng.integers(0, 3, size=n) if grouped else None
    keep = prediction_module.fit_rows(codes, n, limit=40 if codes is None else 120, floor=1)
    state = MeanState(width, groups=3 if grouped else None, covariates=p + k,
                      prediction=prediction)
    for start in range(0, n, 128):
        part = slice(start, start + 128)
        assert state.update(torch.from_numpy(rows[part]),
                            None if codes is None else torch.from_numpy(codes[part]),
                            torch.from_numpy(z[part]), fit=torch.from_numpy(keep[part]))
    R = rows - (prediction.mean + z[:, p:] @ prediction.basis.T)
    for g in range(3) if grouped else [None]:
        mine = np.ones(n, bool) if g is None else codes == g
        fit = mine & keep
        assert 20 <= fit.sum() <= 40
        r = prediction.sums(state if g is None else state.group(g), 900, np.zeros(p + k))
        np.testing.assert_allclose(r.total, R[mine].sum(axis=0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(r.cross.zz.numpy(), z[mine, :p].T @ z[mine, :p], rtol=1e-12)
        rows_fit = r.fit_rows
        assert rows_fit.n == fit.sum()
        np.testing.assert_allclose(rows_fit.total, R[fit].sum(axis=0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(rows_fit.squares, (R[fit] ** 2).sum(axis=0), rtol=1e-9)
        np.testing.assert_allclose(rows_fit.cross.zy.numpy(), z[fit, :p].T @ R[fit],
                                   rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(rows_fit.cross.z.numpy(), z[fit, :p].sum(axis=0),
                                   rtol=1e-12)


def test_a_query_whose_sample_passes_fit_rows_keeps_its_answer(db, monkeypatch):
    """Σr² from every s-th sampled item moves only the standard errors, not the answer."""
    query = "AVG NEURONS IN 2 GROUP BY class USING SAMPLE random(0.3, random_state=3)"
    every = db.query(query)
    monkeypatch.setattr(prediction_module, "FIT_ROWS", 20)
    monkeypatch.setattr(prediction_module, "FIT_FLOOR", 18)  # the classes' ~54 items: stride 3
    db.activations.clear()  # the sample's states, reduced over every row
    some = db.query(query)
    for key, group in every.groups.items():
        np.testing.assert_allclose(some.groups[key].values, group.values, rtol=1e-12)
        wide = group.estimate.ci_high - group.values
        ratio = (some.groups[key].estimate.ci_high - group.values) / wide
        assert not np.allclose(ratio, 1.0) and 0.5 < np.median(ratio) < 1.5


def test_explain_says_what_the_fit_was_checked_on(db):
    block = dict(db.query("EXPLAIN AVG NEURONS IN 2 USING SAMPLE random(0.1)").plan.explain())
    inner = dict(db.query("EXPLAIN AVG NEURONS IN 4 USING SAMPLE random(0.1)").plan.explain())
    assert "checked on 2's minor directions" in block["estimator"]
    # beside 2, with blocks after it: a function of 2's output, checked on 2's parts only
    assert ("checked on 2's minor directions, its leading ones' magnitudes and its neurons' "
            "magnitudes") in inner["estimator"]
    assert "latent's next components" not in inner["estimator"]


def test_a_layer_after_its_block_is_checked_on_the_blocks_neuron_magnitudes():
    """A ReLU after its Linear is checked on |y| of the Linear's neurons y (plain torch), the
    ones whose sign varies, each of unit variance: a narrow block's projections rebuild it."""
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(600, 5, generator=g), torch.arange(600) % 3
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].bias[:3] = 50.0  # three neurons always positive: no fold, not checked
        rows = model[0](X).double().numpy()
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    plan = db.query("EXPLAIN AVG NEURONS IN 1 USING SAMPLE maxmargin(0.2)").plan
    assert "its neurons' magnitudes" in dict(plan.explain())["estimator"]
    block = db.profile.auxiliary(View(db.catalog["0"]).key)
    folds = extrapolation.neuron_folds(db.profile, block)
    positive = (rows > 0).mean(axis=0)
    mixed = np.minimum(positive, 1 - positive) >= 0.02
    assert not mixed[:3].any() and mixed.sum() >= 6
    expected = np.abs(rows[:, mixed])
    np.testing.assert_allclose(folds, expected / expected.std(axis=0), rtol=1e-3, atol=1e-3)
    assert extrapolation.neuron_folds(db.profile, block) is folds  # once per profile
    # The block itself: checked on its own minor directions, not these magnitudes.
    inner = dict(db.query("EXPLAIN AVG NEURONS IN 0 USING SAMPLE maxmargin(0.2)").plan.explain())
    assert "neurons' magnitudes" not in inner["estimator"]


def test_the_latents_minor_components_follow_the_covariates(db):
    """The latent's principal components after the covariates' 10, each of unit variance and
    uncorrelated with the covariates and with each other over every item (numpy)."""
    minor = extrapolation.latent_minor(db.profile).astype(np.float64)
    z = covariates(db.profile)
    live = int((db.profile.latents.std(axis=0) > 0).sum())  # dead ReLUs carry nothing
    assert minor.shape == (len(z), min(extrapolation.LATENT_MINOR, live - z.shape[1]))
    np.testing.assert_allclose(minor.std(axis=0), 1.0, rtol=1e-5)
    both = np.hstack([z, minor])
    correlation = np.corrcoef(both, rowvar=False)
    np.testing.assert_allclose(correlation, np.eye(both.shape[1]), atol=1e-5)
    assert extrapolation.latent_minor(db.profile) is extrapolation.latent_minor(db.profile)


def test_states_of_shards_with_fit_rows_merge_into_the_whole():
    """A pass cut into shards (the Ray engine's parts) merges into the state one pass makes:
    Σr², Σr, z_latentᵀr and the rows counted over the fit rows, per group, and the pooled
    products over every row."""
    rng = np.random.default_rng(9)
    n, width, k, p = 240, 30, 4, 2
    prediction, rows, z = _toy_prediction(rng, width, k, p, n)
    codes = rng.integers(0, 2, size=n)
    keep = prediction_module.fit_rows(codes, n, limit=100, floor=50)
    directions = np.linalg.qr(rng.standard_normal((p, 2)))[0]

    def fed(part):
        state = MeanState(width, groups=2, covariates=p + k, prediction=prediction,
                          directions=directions)
        for start in range(part.start, part.stop, 64):
            piece = slice(start, min(start + 64, part.stop))
            assert state.update(torch.from_numpy(rows[piece]), torch.from_numpy(codes[piece]),
                                torch.from_numpy(z[piece]), fit=torch.from_numpy(keep[piece]))
        return state

    whole, merged = fed(slice(0, n)), fed(slice(0, 100)).merge(fed(slice(100, n)))
    np.testing.assert_allclose(merged.pooled.numpy(), whole.pooled.numpy(), rtol=1e-12)
    np.testing.assert_allclose(whole.pooled.numpy(), (z[:, :p] @ directions).T @ rows,
                               rtol=1e-9, atol=1e-9)
    for g in range(2):
        a, b = whole.group(g), merged.group(g)
        assert a.fit_count == b.fit_count == int((keep & (codes == g)).sum())
        for name in ("fit_squares", "fit_sum"):
            np.testing.assert_allclose(getattr(b, name).numpy(), getattr(a, name).numpy(),
                                       rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.fit_cross.zy.numpy(), a.fit_cross.zy.numpy(),
                                   rtol=1e-12, atol=1e-12)
        mine = keep & (codes == g)
        r = rows[mine] - (prediction.mean + z[mine, p:] @ prediction.basis.T)
        np.testing.assert_allclose(a.fit_cross.zy.numpy(), z[mine, :p].T @ r, rtol=1e-9,
                                   atol=1e-9)


def test_reduced_states_serve_only_a_plan_with_the_same_pooled_directions(db, cnn, digits):
    """The activation store's memo of reduced states (storage/activations.py) keys on the
    plan's pooled directions: two WHEREs whose sampled items are the same but whose matching
    populations differ correct toward different means, so the second may not reuse the
    first's pooled products. Each answer equals the one computed with nothing kept, and a
    plain plan over the same items is still served by the kept states (no pass)."""
    sample = "random(0.3, random_state=3)"
    first = db.query(f"AVG NEURONS IN 2 WHERE class = 3 USING SAMPLE {sample}")
    floor = float(db.profile.confidence[first.plan.items].min())
    everyone = np.flatnonzero(db.profile.labels == 3)
    assert (db.profile.confidence[everyone] < floor).any()  # unsampled items that drop out
    text = f"AVG NEURONS IN 2 WHERE class = 3 AND confidence >= {floor!r} USING SAMPLE {sample}"
    second = db.query(text)
    np.testing.assert_array_equal(second.plan.items, first.plan.items)
    assert not np.allclose(second.plan.directions, first.plan.directions)
    db.activations.clear()
    fresh = db.query(text)
    np.testing.assert_allclose(second.values, fresh.values, rtol=1e-12)
    assert not np.allclose(second.values, first.values, rtol=1e-9)
    before = db.counters.get("items", 0)
    db.execute("SET estimator = plain")
    try:
        plain = db.query(text)
    finally:
        db.execute("SET estimator = assisted")
    assert db.counters.get("items", 0) == before
    rows = _rows(cnn, digits[0], 3)[first.plan.items]
    np.testing.assert_allclose(plain.values, rows.mean(axis=0), rtol=1e-6, atol=1e-6)


def test_a_state_pickled_with_fit_rows_waiting_carries_their_sums():
    """A shard's state crosses to the driver pickled (engine/ray_engine.py): fit rows that
    were still waiting for about 1 MB to gather (MeanState._hold) are summed first."""
    import pickle

    rng = np.random.default_rng(11)
    n, width, k, p = 60, 20, 3, 2
    prediction, rows, z = _toy_prediction(rng, width, k, p, n)
    keep = np.arange(n) % 3 == 0
    state = MeanState(width, covariates=p + k, prediction=prediction)
    assert state.update(torch.from_numpy(rows), z=torch.from_numpy(z),
                        fit=torch.from_numpy(keep))
    assert state._waiting  # 20 rows of 20 neurons: far from 1 MB
    copy = pickle.loads(pickle.dumps(state))
    assert not copy._waiting and copy.fit_count == keep.sum()
    r = rows[keep] - (prediction.mean + z[keep, p:] @ prediction.basis.T)
    np.testing.assert_allclose(copy.fit_squares.numpy(), (r ** 2).sum(axis=0), rtol=1e-9)
    np.testing.assert_allclose(copy.fit_cross.zy.numpy(), z[keep, :p].T @ r, rtol=1e-9,
                               atol=1e-12)


def test_a_wrapped_models_layer_is_predicted_from_its_own_block():
    """The sweep's LSTM inside a wrapper: its fc (16 wide, its own 16 projections kept) was
    fitted on the latent alone, and maxmargin's intervals covered 0.69 of its neurons; seen
    through, a sample answers it as the bare model does, to float32 rounding of plain torch."""
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    inner = nn.Sequential()
    inner.add_module("proj", nn.Linear(6, 12))
    inner.add_module("act", nn.Tanh())
    inner.add_module("fc", nn.Linear(12, 8))
    inner.add_module("relu", nn.ReLU())
    inner.add_module("out", nn.Linear(8, 3))
    X = torch.randn(3000, 6)
    with torch.no_grad():
        y = (inner(X) + 0.5 * torch.randn(3000, 3)).argmax(dim=1)
        fc = inner.fc(inner.act(inner.proj(X))).double()
    conn = diagql.connect(Wrapper(inner.eval()), (X, y), cache_dir=False, progress=False)
    answer = conn.query("AVG NEURONS IN inner.fc GROUP BY class USING SAMPLE maxmargin(0.05)")
    assert "inner.fc's" in answer.plan.estimator_text
    for g, part in answer.groups.items():
        np.testing.assert_allclose(part.values, fc[y == g].mean(dim=0).numpy(), atol=1e-4)


def test_a_block_its_directions_span_is_answered_exactly_with_no_pass(db, cnn, digits):
    """Layer 6 (a Linear 32 wide) keeps 32 directions: they span it, so every item's row is
    the profile's to rebuild. A sample's AVG, TOPK and GROUP BY on it are the matching items'
    exact means (plain torch), groups the sample holds none of included, with no forward
    pass; an ARGMAX and a layer the directions do not span (2) still run the model."""
    X, y = digits
    block = db.profile.auxiliary('["6"]')
    assert block is not None and block.basis.shape == (32, 32) and block.spans
    assert not db.profile.auxiliary('["2"]').spans
    rows = _rows(cnn, X, 7)
    matching = np.flatnonzero(db.profile.labels == 3)
    exact = rows[matching].mean(axis=0)
    query = "AVG NEURONS IN 6 WHERE class = 3 USING SAMPLE random(0.05, random_state=2)"
    result = db.query(query)  # the first query of a connection probes the model once
    calls = []  # a pass that stops at its layer never returns from the model: pre-hooks
    hook = cnn.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        db.query("AVG NEURONS IN 6 USING SAMPLE random(0.1, random_state=5)")
        top = db.query("TOPK 4 NEURONS IN 6 WHERE class = 3 USING SAMPLE random(0.05)")
        grouped = db.query("AVG NEURONS IN 6 GROUP BY class USING SAMPLE random(0.005)")
        # AUTO's default sample drawn (not priced against a pass): it is taken, not a pass.
        db.query("AVG NEURONS IN 6 WHERE class = 3 USING SAMPLE maxmargin")
        auto = db.query("AVG NEURONS IN 6 WHERE class = 3 USING AUTO")
        assert not calls
        db.query("AVG NEURONS IN 2 USING SAMPLE random(0.6, random_state=11)")  # not cached
        assert calls
        calls.clear()
        db.query("ARGMAX NEURONS IN 6 WHERE correct USING SAMPLE random(0.05)")
    finally:
        hook.remove()
    assert 2 <= len(result.plan.items) < len(matching)
    np.testing.assert_allclose(result.values, exact, rtol=1e-5, atol=1e-6)
    assert result.estimate.exact and result.estimate.expected == 0.0
    np.testing.assert_array_equal(top.neurons, np.argsort(-exact, kind="stable")[:4])
    assert "AUTO chose a sample: every item's rows of 6 are rebuilt" in auto.plan.choice
    np.testing.assert_allclose(auto.values, exact, rtol=1e-5, atol=1e-6)
    missed = set(range(10)) - set(y.numpy()[grouped.plan.items].tolist())
    assert missed and set(grouped.groups) == set(range(10))
    for c, group in grouped.groups.items():
        np.testing.assert_allclose(group.values, rows[y.numpy() == c].mean(axis=0),
                                   rtol=1e-5, atol=1e-6)
    plan = dict(db.query("EXPLAIN " + query).plan.explain())
    assert plan["forward"].startswith("none: the rows of 6 are rebuilt from all 32")
    assert "profile pass checked" not in plan["forward"]  # no rows of it were compared
    assert "of 6 span it and rebuild every item's 6 (to float32 rounding)" in \
        " ".join(to_text(result).split())
    assert "exact" in plan["estimator"] and "span the layer" in plan["estimator"]
    # The plain estimator keeps the sample's own mean, read from the same rebuilt rows.
    db.execute("SET estimator = plain")
    try:
        plain = db.query(query)
    finally:
        db.execute("SET estimator = assisted")
    np.testing.assert_allclose(plain.values, rows[plain.plan.items].mean(axis=0), **F32)


def test_another_models_spanned_block_is_not_rebuilt_from_this_profile(cnn, digits):
    """Model b's layer 6 planned on model a's profile: a's directions span a's rows, not
    b's, so b's query runs b and is estimated, not read from a's projections."""
    from tests.models import build_cnn

    X, y = digits
    b = build_cnn(seed=3)
    db = diagql.connect({"a": cnn, "b": b}, (X, y), cache_dir=False, progress=False)
    other = db.query("AVG NEURONS IN b.6 USING SAMPLE random(0.2)")
    assert not other.plan.from_profile and not other.estimate.exact
    np.testing.assert_allclose(db.query("AVG NEURONS IN a.6 USING SAMPLE random(0.2)").values,
                               _rows(cnn, X, 7).mean(axis=0), rtol=1e-5, atol=1e-6)


class _BatchCentred(nn.Module):
    """Each row less its batch's mean: an item's output depends on its batch."""

    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def test_a_block_whose_rows_depend_on_the_batch_is_not_rebuilt():
    """Where the probe found an item's outputs depending on its batch (warned, and kept in the
    catalog's notices), the profile pass's rows are its own batches': a block its directions
    span is estimated from the sample's pass, not called exact (the AA3 sweep: layers after a
    sequence pooled with its padding, a left-padded GPT-2's blocks, 0.10-0.13 of the layers'
    scale off while said to be exact)."""
    torch.manual_seed(19)
    X, y = torch.randn(400, 6), torch.randint(0, 3, (400,))
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 8), _BatchCentred()), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    with pytest.warns(diagql.DiagQLWarning, match="other outputs when other items share"):
        db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
        db.profile
    assert not db.catalog.repeatable
    assert db.profile.auxiliary('["0"]').spans
    answer = db.query("AVG NEURONS IN 0 WHERE class = 1 USING SAMPLE random(0.2)")
    assert not answer.estimate.exact and not answer.plan.from_profile


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_held_views_channel_means_are_its_rows_averaged_per_channel(channels_last):
    """A held view's identity basis is never made (128 MB at a 4,096-wide latent); its
    CHANNELS prediction averages each channel's values of the row, as numpy's reshape does."""
    from types import SimpleNamespace

    from diagql.engine.prediction import BlockPrediction

    rng = np.random.default_rng(0)
    row, mean = rng.normal(size=4 * 5 * 6), rng.normal(size=4 * 5 * 6).astype(np.float32)
    held = SimpleNamespace(layer="map", mean=mean, basis=None)
    prediction = BlockPrediction(held, 3, channels=4, channels_last=channels_last)
    shaped = (lambda v: v.reshape(30, 4).mean(axis=0)) if channels_last else \
        (lambda v: v.reshape(4, 30).mean(axis=1))
    np.testing.assert_allclose(prediction.basis @ row, shaped(row), rtol=1e-12)
    np.testing.assert_allclose(prediction.mean, shaped(mean.astype(np.float64)), rtol=1e-6)
    assert BlockPrediction(held, 3).basis is None


class _Feeder(nn.Module):
    """b1's first Linear reads b0's output, which neither b1's narrow output nor the latent
    spans: b0's leading directions (its output's rank, 6, fits in their 8) do."""

    def __init__(self):
        super().__init__()
        self.b0 = nn.Sequential(nn.Linear(6, 16), nn.Identity())
        self.b1 = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        self.b2 = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.b0(x))))


def _sampled_means_per_class(model_class, layer: str, rows_of, atol: float):
    """Over 3,000 items labelled by a new ``model_class`` with a fifth of them flipped, each
    class's ``AVG NEURONS IN layer`` under maxmargin(0.05) against plain torch's
    ``rows_of(model, X)``; the last Result."""
    torch.manual_seed(0)
    X = torch.randn(3000, 6)
    model = model_class().eval()
    with torch.no_grad():
        y = model(X).argmax(1)
        flip = torch.rand(3000) < 0.2
        y[flip] = torch.randint(0, 3, (int(flip.sum()),))
        rows = rows_of(model, X).double().numpy()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    for c in range(3):
        result = conn.query(f"AVG NEURONS IN {layer} WHERE class = {c} "
                            f"USING SAMPLE maxmargin(0.05)")
        np.testing.assert_allclose(result.values, rows[(y == c).numpy()].mean(0), atol=atol)
    return result


def test_a_layer_inside_a_block_is_fitted_on_the_block_before_it_too():
    """A layer inside a block was fitted on the latent and its block's leading directions
    alone, which need not span what the block's first layers read (a transformer layer's
    attention reads the layer before: a RoBERTa's covered its exact means 0.23 under
    maxmargin(0.1)). The block before it is a covariate too: b1.0 here is a linear function
    of b0's output, and its sampled means are its exact ones (they had been 0.2 off)."""
    result = _sampled_means_per_class(_Feeder, "b1.0", lambda m, X: m.b1[0](m.b0(X)), 1e-4)
    assert (result.plan.neighbour, result.plan.feeder) == ("b1", "b0")
    assert "and the 8 of b0, the block before it" in result.plan.estimator_text


class _Pair(nn.Module):
    """A residual block's two branches, each reading the block's input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.skip = nn.Sequential(nn.Linear(16, 16), nn.Tanh())

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = nn.Sequential(nn.Linear(6, 16), nn.Identity())
        self.b1 = _Pair()
        self.b2 = nn.Sequential(nn.Linear(4 * 4, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.b0(x))))


def test_a_branch_is_fitted_on_the_block_its_input_came_from_not_its_sibling():
    """The skip branch reads b1's input, b0's output: the block registered before it is its
    sibling ``b1.body``, which had been taken as the block before (review RV1; its sampled
    means 0.016-0.031 off). The block before is found up the layer's inputs now: b1.skip.0 is
    linear in b0's output, so its sampled means are its exact ones but for the ridge's pull."""
    result = _sampled_means_per_class(_Branches, "b1.skip.0",
                                      lambda m, X: m.b1.skip[0](m.b0(X)), 2e-3)
    assert (result.plan.neighbour, result.plan.feeder) == ("b1.skip", "b0")


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e18])
def test_principal_directions_do_not_depend_on_the_rows_scale(scale):
    """Rows about 1e18 had overflowed the float32 range finder (x xᵀ q is 1e36 times the
    rows): the block's directions came out non-finite and the block was dropped, silently,
    its estimates 20x worse (sweep S36); tiny rows, whose squares near float32's smallest
    numbers, keep their directions too."""
    from diagql.model.auxiliaries import principal

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((600, 3)) @ rng.standard_normal((3, 80)) * np.linspace(1, 3, 80) \
        + 0.01 * rng.standard_normal((600, 80))
    mean, basis = principal(torch.from_numpy(rows * scale).float(), 3)
    centred = rows - rows.mean(axis=0)
    truth = np.linalg.svd(centred, full_matrices=False)[2][:3].T  # numpy's leading axes
    assert np.isfinite(basis.numpy()).all()
    np.testing.assert_allclose(mean.numpy() / scale, rows.mean(axis=0), rtol=1e-5, atol=1e-5)
    # the same subspace: the singular values of truthᵀ basis are its principal angles' cosines
    cosines = np.linalg.svd(truth.T @ basis.numpy(), compute_uv=False)
    assert cosines.min() > 0.999

