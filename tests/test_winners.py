"""Every layer's winner per item, kept by the profile pass (model/winners.py): checked against
plain torch hooks, through in-place ops that rewrite a tensor an earlier layer's winners came
from, and not kept for a layer with NaN rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import diagql


class NanRows(nn.Module):
    """A Linear whose output is NaN for the items whose first feature is above 1.5."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        out = self.lin(x)
        return torch.where(x[:, :1] > 1.5, out * float("nan"), out)


class InPlace(nn.Module):
    """Linear -> BatchNorm (negative values) -> ReLU(inplace=True) -> a tensor op that returns
    its input (Identity) -> Linear; and a branch whose output is NaN for some items."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.act = nn.ReLU(inplace=True)
        self.same = nn.Identity()
        self.head = nn.Linear(12, 3)
        self.odd = NanRows()

    def forward(self, x):
        h = self.same(self.act(self.bn(self.lin(x))))
        return self.head(h) + 0 * self.odd(x)[:, :1].nan_to_num()


def _outputs(model, X) -> dict[str, np.ndarray]:
    """Each module's output per item, copied when it ran (plain hooks)."""
    out = {}
    handles = [module.register_forward_hook(
        lambda m, i, o, name=name: out.__setitem__(name, o.detach().clone().numpy()))
        for name, module in model.named_children()]
    try:
        with torch.no_grad():
            model(X)
    finally:
        for handle in handles:
            handle.remove()
    return out


def test_every_layers_winners_are_plain_torchs_through_in_place_ops():
    torch.manual_seed(0)
    model = InPlace().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)  # shifted: BatchNorm gives negative values
    X = torch.randn(300, 6)
    y = torch.randint(0, 3, (300,))
    db = diagql.connect(model, (X, y), batch_size=64, cache_dir=False, progress=False)
    truth = _outputs(model, X)
    assert (truth["bn"] < 0).any() and not np.array_equal(truth["bn"], truth["act"])
    profile = db.profile
    kept = {name: profile.winners_of(db.query(f"EXPLAIN ARGMAX NEURONS IN {name}").plan
                                     .bound.view)
            for name in ("lin", "bn", "act", "same", "head", "odd")}
    for name in ("lin", "bn", "act", "same", "head"):
        np.testing.assert_array_equal(kept[name], truth[name].argmax(axis=1), err_msg=name)
    # NaN rows: marked with the winner 'width' (one past the last neuron), so that a query on
    # the layer over them is refused with no pass, and one that leaves them out is counted.
    odd = truth["odd"]
    nan_rows = np.isnan(odd).any(axis=1)
    assert nan_rows.any() and not nan_rows.all()
    np.testing.assert_array_equal(kept["odd"], np.where(nan_rows, odd.shape[1],
                                                        np.nan_to_num(odd).argmax(axis=1)))
    with pytest.raises(diagql.DiagQLError, match=f"layer 'odd' has NaN or infinite activations "
                                                 f"for {nan_rows.sum()} of 300 items"):
        db.query("ARGMAX NEURONS IN odd")
    db.counters.clear()
    result = db.query("ARGMAX NEURONS IN bn WHERE class = 1")
    assert db.counters.get("passes", 0) == 0
    matching = y.numpy() == 1
    np.testing.assert_allclose(result.values, np.bincount(
        truth["bn"][matching].argmax(axis=1), minlength=12) / matching.sum(), atol=1e-12)


def test_layers_whose_outputs_share_a_sum_and_freed_memory_keep_their_own_winners():
    # Softmax rows sum to 1, so every Softmax's output sums to the batch size; each is freed
    # before the next is made, which may take the same address. The keeper had reused the
    # first Softmax's winners for the others (ARGMAX USING FULL then answered wrongly).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Softmax(dim=1), nn.Linear(8, 8),
                          nn.Softmax(dim=1), nn.Linear(8, 8), nn.Softmax(dim=1),
                          nn.Linear(8, 3)).eval()
    X, y = torch.randn(500, 10), torch.randint(0, 3, (500,))
    db = diagql.connect(model, (X, y), batch_size=100, cache_dir=False, progress=False)
    with torch.no_grad():
        for i in range(len(model)):
            truth = model[:i + 1](X).argmax(dim=1).numpy()
            result = db.query(f"ARGMAX NEURONS IN {i} USING FULL")
            np.testing.assert_allclose(result.values, np.bincount(truth, minlength=result.values
                                                                  .shape[0]) / len(X),
                                       atol=1e-12, err_msg=str(i))


def test_an_argmax_of_channels_is_counted_from_each_items_winning_channel():
    """A conv map keeps each item's winning channel (the largest channel mean) too: CHANNELS'
    ARGMAX, exact or sampled (assisted), runs no forward pass and gives plain torch's shares."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 3)).eval()
    X = torch.randn(400, 2, 8, 8)
    y = torch.randint(0, 3, (400,))
    db = diagql.connect(model, (X, y), batch_size=64, cache_dir=False, progress=False)
    with torch.no_grad():
        channel_means = model[:2](X).mean(dim=(2, 3)).double().numpy()
    winners = channel_means.argmax(axis=1)
    matching = np.flatnonzero(y.numpy() == 2)
    assert len(np.unique(winners[matching])) > 2
    exact = np.bincount(winners[matching], minlength=6) / len(matching)
    db.counters.clear()
    full = db.query("ARGMAX CHANNELS IN 1 WHERE class = 2")
    sampled = db.query("ARGMAX CHANNELS IN 1 WHERE class = 2 USING SAMPLE random(0.2)")
    assert db.counters.get("passes", 0) == 0
    assert len(sampled.plan.items) < len(matching) and sampled.estimate.exact
    for result in (full, sampled):
        np.testing.assert_allclose(result.values, exact, atol=1e-12)
    np.testing.assert_array_equal(sampled.values, full.values)


def test_counted_shares_are_usings_fulls_to_the_last_bit():
    """Shares whose float sum is not 1 were renormalised, 1 ulp off USING FULL's: a strict
    ci_low <= exact <= ci_high found 15% of an exact answer's neurons outside."""
    from diagql.engine.estimate import shares
    from diagql.engine.regression import Fitted

    counts = np.array([1137, 1056, 1107, 1095, 1107, 1068, 1093])
    exact = counts / counts.sum()
    assert exact.sum() != 1.0
    fitted = Fitted(exact, np.zeros(7), 0, exact=True)
    np.testing.assert_array_equal(shares(fitted), exact)


def test_the_winners_stay_within_their_budget(monkeypatch):
    """Views past the budget keep no winners (in the catalog's order): their ARGMAX runs the
    model, and gives the same answer."""
    from diagql.model import winners

    torch.manual_seed(0)
    model = InPlace().eval()
    X, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    monkeypatch.setattr(winners, "BUDGET", 2 * 200)  # two one-byte views
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    assert len(db.profile.winners) == 2
    db.counters.clear()
    result = db.query("ARGMAX NEURONS IN odd.lin")  # neither kept nor the latent's rows
    assert db.counters["passes"] == 1
    with torch.no_grad():
        rows = model.odd.lin(X).numpy()
    np.testing.assert_allclose(result.values, np.bincount(rows.argmax(axis=1), minlength=5)
                               / 200, atol=1e-12)



class TwiceCalled(nn.Module):
    """A ResNet basic block's habit: one ReLU(inplace=True) module called twice per pass."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.bn(self.c1(x)))
        out = self.c2(h)
        out += h
        return self.head(self.relu(out).mean(dim=(2, 3)))


def test_each_call_of_a_module_called_twice_keeps_its_own_winners():
    """block.relu#1 and #2 had no winners kept: their ARGMAX was estimated from a sample
    (expected JS 0.20 against an actual 0.62 under vas in a sweep) or run."""
    torch.manual_seed(0)
    model = TwiceCalled().eval()
    X, y = torch.randn(300, 3, 8, 8), torch.randint(0, 3, (300,))
    db = diagql.connect(model, (X, y), batch_size=64, cache_dir=False, progress=False)
    seen = []
    handle = model.relu.register_forward_hook(
        lambda m, i, o: seen.append(o.detach().clone().flatten(1).numpy()))
    with torch.no_grad():
        model(X)
    handle.remove()
    matching = y.numpy() == 2
    for call, rows in enumerate(seen, start=1):
        db.counters.clear()
        full = db.query(f"ARGMAX NEURONS IN relu#{call} WHERE class = 2")
        assert db.counters.get("passes", 0) == 0  # counted from the profile
        truth = np.bincount(rows[matching].argmax(axis=1), minlength=rows.shape[1]) / \
            matching.sum()
        np.testing.assert_allclose(full.values, truth, atol=1e-12)
        sampled = db.query(f"ARGMAX NEURONS IN relu#{call} WHERE class = 2 "
                           f"USING SAMPLE vas(0.1)")
        assert sampled.estimate.exact
        np.testing.assert_allclose(sampled.values, truth, atol=1e-12)


def test_an_argmax_is_counted_for_groups_the_sample_holds_none_of():
    """With no matching item sampled, an ARGMAX whose winners the profile keeps answered
    nothing (JS 1.0 against the baseline), though it is exact whatever the sample."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 6 * 6, 3)).eval()
    X, y = torch.randn(300, 1, 8, 8), torch.randint(0, 3, (300,))
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with torch.no_grad():
        maps, predicted = model[:2](X), model(X).argmax(1)
    winners = maps.mean(dim=(2, 3)).argmax(1).numpy()
    wrong = (predicted != y).numpy()
    result = conn.query("ARGMAX CHANNELS IN 1 WHERE incorrect GROUP BY class "
                        "USING SAMPLE random(2) WITH BASELINE")
    labels = y.numpy()
    # none of theirs sampled, counted from all of them all the same
    assert sum(result.groups[c].estimate.n == 0 for c in range(3)) >= 2
    for c in range(3):
        mine = winners[wrong & (labels == c)]
        group = result.groups[c]
        np.testing.assert_allclose(group.values, np.bincount(mine, minlength=5) / len(mine),
                                   rtol=1e-12)
        assert group.estimate.exact and group.metrics["js_distance"] == 0.0
        assert group.n_items == len(mine)
    assert "none of its" not in str(result)
    single = conn.query("ARGMAX CHANNELS IN 1 WHERE incorrect AND class = 2 "
                        "USING SAMPLE random(2)")
    mine = winners[wrong & (labels == 2)]
    np.testing.assert_allclose(single.values, np.bincount(mine, minlength=5) / len(mine),
                               rtol=1e-12)
    conn.query("SET estimator = plain")  # the sample's own answer: none, as it says
    assert "none of its" in str(conn.query("ARGMAX CHANNELS IN 1 WHERE incorrect GROUP BY "
                                           "class USING SAMPLE random(2)"))
