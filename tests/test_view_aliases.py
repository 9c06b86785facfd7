"""Layers whose rows equal a block's view (model/view_aliases.py): found by the profile pass,
stored with the profile, and a sample query on them predicted from the block's projections;
answers checked against plain torch and numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.model.profile import Profile
from diagql.model.view_aliases import Alias


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act2 = nn.ReLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))) + x)


class HalfWhenDark(nn.Module):
    """A global pooling on items whose map's mean passes ``threshold``, half of it on the
    others: equal to the block's channel means on some items only."""

    def __init__(self, threshold: float = 0.3):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        means = x.mean(dim=(2, 3))
        return torch.where(x.mean(dim=(1, 2, 3))[:, None] > self.threshold, means, means / 2)


class GapNet(nn.Module):
    """A stem, a residual block, a global average pooling and a Flatten, a same-width Linear."""

    def __init__(self, pool: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = Residual(8)
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.mix(self.flat(self.pool(self.block(self.stem(x)))))))


class MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


class TokenNet(nn.Module):
    """Tokens (N, 10, 6) through a per-token encoder, mean-pooled by a module of its own, then
    a hidden layer (whose ReLU is the latent, so the pooling is no row the profile holds)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Linear(6, 16)
        self.encoder = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.pool = MeanPool()
        self.hidden = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.pool(self.encoder(self.embed(x))))))


def _images(n: int = 1200):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, 1, 8, 8, generator=g) + torch.linspace(-1, 1, n)[:, None, None, None]
    return X, torch.arange(n) % 3


def _hooked(model, X, name):
    out = {}
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda module, args, output: out.__setitem__("rows", output.detach().clone()))
    with torch.no_grad():
        model(X)
    handle.remove()
    return out["rows"].double().reshape(len(X), -1).numpy()


def test_a_global_pooling_a_flatten_and_a_blocks_last_activation_are_found():
    X, y = _images()
    model = GapNet().eval()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    aliases = conn.profile.auxiliaries.aliases
    assert aliases == {'["pool"]': Alias('["block"]', 8), '["flat"]': Alias('["block"]', 8),
                       '["block.act2"]': Alias('["block"]')}
    # Same width as the pooling, but not equal to any block view: no alias.
    assert '["mix"]' not in aliases
    # Stored with the profile and read back; an entry of an older version has none.
    arrays = conn.profile.to_arrays()
    assert Profile.from_arrays(arrays, len(X)).auxiliaries.aliases == aliases
    del arrays["aux_aliases"]
    assert Profile.from_arrays(arrays, len(X)).auxiliaries.aliases == {}
    arrays["aux_aliases"] = np.str_('{"[\\"pool\\"]": 3}')
    with pytest.raises(ValueError, match="aliases"):
        Profile.from_arrays(arrays, len(X))


def test_a_layer_equal_on_some_items_only_is_no_alias():
    X, y = _images()
    model = GapNet(pool=HalfWhenDark()).eval()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    pooled = _hooked(model, X, "pool")
    block = _hooked(model, X, "block").reshape(len(X), 8, -1).mean(axis=2)
    equal = np.all(np.isclose(pooled, block, rtol=1e-5, atol=1e-6), axis=1)
    assert 0.1 < equal.mean() < 0.9  # equal on some items, not on others
    assert '["pool"]' not in conn.profile.auxiliaries.aliases


def test_a_sample_query_on_a_pooling_is_predicted_from_the_blocks_projections(monkeypatch):
    """Its error against plain torch shrinks as a query of the block's channel means does:
    fitted beside the block on half of its leading projections it had been 3-20x the one
    predicted from all of them with known coefficients."""
    from diagql.model import view_aliases

    X, y = _images()
    model = GapNet().eval()
    truth = _hooked(model, X, "pool")
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    assert conn.profile.auxiliaries.aliases
    monkeypatch.setattr(view_aliases, "candidates", lambda catalog, views: [])
    before = diagql.connect(model, (X, y), cache_dir=False, progress=False)  # as before
    assert not before.profile.auxiliaries.aliases
    errors, unaliased = [], []
    for seed in range(3):
        for c in range(3):
            statement = f"AVG NEURONS IN pool WHERE class = {c} USING SAMPLE " \
                        f"weighted(0.05, random_state={seed})"
            want = truth[y.numpy() == c].mean(axis=0)
            for db, out in ((conn, errors), (before, unaliased)):
                got = db.query(statement)
                out.append(np.abs(np.asarray(got.values) - want[got.neurons]).max())
    assert "the layer equals block's channel means" in str(conn.query(
        "EXPLAIN AVG NEURONS IN pool USING SAMPLE weighted(0.05)"))
    assert np.mean(errors) < np.mean(unaliased) / 2, (errors, unaliased)


def test_a_mean_pool_module_of_an_encoder_answers_as_the_encoders_mean_does():
    """The encoder's mean over tokens is held whole by its 16 projections, so a sample's
    answer on the pooling module is the matching items' exact mean, as plain torch gives it."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(900, 10, 6, generator=g)
    y = torch.arange(900) % 3
    model = TokenNet().eval()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    assert conn.profile.auxiliaries.aliases['["pool"]'] == Alias('["encoder", "TOKENS MEAN"]')
    truth = _hooked(model, X, "pool")
    for c in range(3):
        got = conn.query(f"AVG NEURONS IN pool WHERE class = {c} USING SAMPLE "
                         f"random(0.1, random_state={c})")
        want = truth[y.numpy() == c].mean(axis=0)[got.neurons]
        np.testing.assert_allclose(got.values, want, rtol=0, atol=1e-5)
        assert np.all(got.estimate.ci_low <= want + 1e-6) and \
            np.all(want - 1e-6 <= got.estimate.ci_high)


def test_a_pooling_equal_on_the_first_items_only_is_no_alias():
    """The comparison runs over every item the blocks are fitted on, not the first batch's: a
    pooling that differs from the block's channel means past the first 400 items (data whose
    first items are bright) had been aliased on the first 256 (the X1 sweep's padding case)."""
    X, y = _images()
    brightness = _hooked(GapNet().eval(), X, "block").mean(axis=1)
    threshold = float(np.quantile(brightness, 0.6))
    order = np.argsort(-brightness, kind="stable")  # the brightest 40% first
    X, y = X[order], y[order]
    model = GapNet(pool=HalfWhenDark(threshold)).eval()
    pooled = _hooked(model, X, "pool")
    block = _hooked(model, X, "block").reshape(len(X), 8, -1).mean(axis=2)
    equal = np.all(np.isclose(pooled, block, rtol=1e-5, atol=1e-6), axis=1)
    assert equal[:400].all() and equal[400:].mean() < 0.9
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    assert '["pool"]' not in conn.profile.auxiliaries.aliases


def test_rows_are_equal_to_rounding_on_each_columns_own_scale():
    """A massive channel (5e3) beside others near 1 does not let a 0.02 difference in a small
    one pass as rounding (the X1 sweep), while float32 rounding of a mean does."""
    from diagql.model.same_rows import rounding_equal

    g = torch.Generator().manual_seed(0)
    theirs = torch.rand(64, 6, generator=g)
    theirs[:, 0] *= 5000
    assert rounding_equal(theirs * (1 + 3e-7), theirs)
    off = theirs.clone()
    off[:, 3] += 0.02
    assert not rounding_equal(off, theirs)
    assert not rounding_equal(theirs + float("nan"), theirs)


class GapHead(nn.Module):
    """A stem and a block, globally pooled straight into the head: the latent (the head's
    input) is the block's channel means."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = Residual(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.flat(self.pool(self.block(self.stem(x)))))


def test_a_maps_channel_means_held_as_the_latent_answer_exactly_with_no_pass():
    """AVG CHANNELS IN a map whose channel means are the latent reads the profile's rows: the
    matching items' exact means under any sampler, as plain torch gives them, and no forward
    pass (the X2 sweep: estimated, 0.05-0.53 off under weighted(0.05))."""
    X, y = _images()
    model = GapHead().eval()
    truth = _hooked(model, X, "block").reshape(len(X), 8, -1).mean(axis=2)
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    assert '["block", "CHANNELS"]' in conn.profile.latent_views
    conn.sample("weighted(0.05, random_state=0)")
    before = conn.counters["items"]
    for c in range(3):
        want = truth[y.numpy() == c].mean(axis=0)
        for using in ("SAMPLE weighted(0.05, random_state=0)", "FULL"):
            got = conn.query(f"AVG CHANNELS IN block WHERE class = {c} USING {using}")
            np.testing.assert_allclose(got.values, want[got.neurons], rtol=1e-5, atol=1e-6)
    assert conn.counters["items"] == before
    explained = str(conn.query("EXPLAIN AVG CHANNELS IN block USING SAMPLE vas(0.1)"))
    assert "the channel means of block are the profile's latent" in " ".join(explained.split())
    # The map's own neurons are no latent rows: estimated, from a pass, on other covariates;
    # its channel means asked again after them, for the same items, are still exact.
    assert '["block"]' not in conn.profile.latent_views
    statement = "IN block WHERE class = 1 USING SAMPLE weighted(0.05, random_state=0)"
    neurons = conn.query("AVG NEURONS " + statement)
    assert neurons.estimate.expected > 0 and len(neurons.values) == 8 * 64
    got = conn.query("AVG CHANNELS " + statement)
    np.testing.assert_allclose(got.values, truth[y.numpy() == 1].mean(axis=0)[got.neurons],
                               rtol=1e-5, atol=1e-6)
