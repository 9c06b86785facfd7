"""Whether a layer's rows are its batch's items in the batch's order (model/row_order.py):
layers that return them in an order of their own are refused, where every answer but a mean
over all items put one item's row under another's; a tie between axes of the batch's size is
settled by the one that reverses with the batch. Truth: plain torch, each item alone or in
DiagQL's own batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader

import diagql
from diagql.errors import BindError

K, D, H = 3, 6, 8


class SortedLSTM(nn.Module):
    """The classic recipe: sort the batch by length, pack with enforce_sorted=True, and put
    only the final states back in order: the LSTM's own rows stay in length order."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, H)
        self.rnn = nn.LSTM(H, H, batch_first=True)
        self.head = nn.Linear(H, K)

    def forward(self, x, lengths):
        lengths, order = lengths.sort(descending=True)
        packed = pack_padded_sequence(self.inp(x)[order], lengths, batch_first=True)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1][order.argsort()])


class SortedDispatch(nn.Module):
    """A mixture of experts' dispatch: ``pre`` runs on the rows sorted by expert, which are
    scattered back into the batch's order after it."""

    def __init__(self):
        super().__init__()
        self.router, self.pre, self.head = nn.Linear(D, 3), nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        order = torch.argsort(self.router(x).argmax(1), stable=True)
        rows = torch.relu(self.pre(x[order]))
        back = torch.empty_like(rows)
        back[order] = rows
        return self.head(back)


def _alone(model, module, inputs: list) -> np.ndarray:
    """Each item's output of ``module``, the item run alone (where its row is its own)."""
    got = []
    handle = module.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
    with torch.no_grad():
        for x in inputs:
            model(*x)
    handle.remove()
    return torch.cat(got).numpy()


def _group_means(rows: np.ndarray, y: np.ndarray) -> dict:
    return {k: rows[y == k].mean(0) for k in np.unique(y)}


def test_an_lstm_left_in_length_order_is_refused_and_its_neighbours_are_exact():
    g = torch.Generator().manual_seed(0)
    n, t = 150, 7
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[:3] = torch.tensor([2, 3, 6])  # the probe's items: reversed by the sort
    X = torch.randn(n, t, D, generator=g)
    y = torch.randint(0, K, (n,), generator=g)
    torch.manual_seed(0)
    model = SortedLSTM().eval()
    items = [((X[i], lengths[i]), int(y[i])) for i in range(n)]
    db = diagql.connect(model, items, cache_dir=False, progress=False)
    with pytest.raises(BindError, match="its rows are not in its batch's order"):
        db.query("AVG NEURONS IN rnn GROUP BY class")
    truth = _group_means(_alone(model, model.head, [(X[i:i + 1], lengths[i:i + 1])
                                                     for i in range(n)]), y.numpy())
    result = db.query("AVG NEURONS IN head GROUP BY class")
    for key, part in result.groups.items():
        np.testing.assert_allclose(part.values, truth[key], atol=1e-5)


def test_a_layer_run_on_rows_sorted_by_expert_is_refused():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, D, generator=g)
    y = torch.randint(0, K, (200,), generator=g)
    torch.manual_seed(3)
    model = SortedDispatch().eval()
    with torch.no_grad():
        experts = model.router(X[:3]).argmax(1)
    # Two experts among the probe's items, in sorted order already: only the reversed batch
    # is dispatched in another order.
    assert experts.tolist() == sorted(experts.tolist()) and len(set(experts.tolist())) > 1
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with pytest.raises(BindError, match="its rows are not in its batch's order"):
        db.query("TOPK 3 INPUTS FOR pre[0]")
    shown = " ".join(str(row) for row in db.query("DESCRIBE pre").rows)
    assert "not in its batch's order" in shown
    truth = _group_means(_alone(model, model.router, [(X[i:i + 1],) for i in range(200)]),
                         y.numpy())
    for key, part in db.query("AVG NEURONS IN router GROUP BY class").groups.items():
        np.testing.assert_allclose(part.values, truth[key], atol=1e-5)


class CapacityDispatch(nn.Module):
    """A Switch-style mixture of experts: each expert runs on a buffer as long as the batch,
    slot j the j-th item routed to it, then zeros (the one-hot dispatch einsum)."""

    def __init__(self, experts: int = 4):
        super().__init__()
        self.router = nn.Linear(D, experts)
        self.experts = nn.ModuleList(nn.Linear(D, H) for _ in range(experts))
        self.head = nn.Linear(H, K)

    def forward(self, x):
        n, count = len(x), len(self.experts)
        onehot = nn.functional.one_hot(self.router(x).argmax(1), count).float()
        slot = ((onehot.cumsum(0) - 1) * onehot).long()
        dispatch = onehot.unsqueeze(-1) * nn.functional.one_hot(slot, n).float()  # (n, E, n)
        buffers = torch.einsum("bec,bd->ecd", dispatch, x)
        out = torch.stack([expert(buffers[e]) for e, expert in enumerate(self.experts)])
        return self.head(torch.einsum("bec,ecd->bd", dispatch, out))


def test_an_expert_none_of_the_first_items_reached_is_refused():
    """Its rows for the probe's items were all its buffer's padding, alike, so reversing them
    told nothing: it had been listed, and every answer read dispatch slots as items (an
    AVG of 1.09 where its routed items' mean is 12.0, top inputs never routed to it); the
    expert that all of the data's first items reached held them in the batch's order."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, D, generator=g)
    y = torch.randint(0, K, (300,), generator=g)
    torch.manual_seed(0)
    model = CapacityDispatch().eval()
    with torch.no_grad():
        routes = model.router(X).argmax(1)
    common = int(routes.bincount().argmax())  # the first six items all go to one expert
    order = torch.cat([torch.nonzero(routes == common)[:6, 0],
                       torch.nonzero(routes != common)[:, 0],
                       torch.nonzero(routes == common)[6:, 0]])
    X, y, routes = X[order], y[order], routes[order]
    assert len(set(routes.tolist())) == 4 and set(routes[:6].tolist()) == {common}
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    for e in range(4):
        with pytest.raises(BindError, match="its rows are not in its batch's order"):
            db.query(f"AVG NEURONS IN experts.{e}")
    truth = _group_means(_alone(model, model.router, [(X[i:i + 1],) for i in range(300)]),
                         y.numpy())
    for key, part in db.query("AVG NEURONS IN router GROUP BY class").groups.items():
        np.testing.assert_allclose(part.values, truth[key], atol=1e-5)


class FlatTokens(nn.Module):
    """Tokens flattened into the batch's axis before a Linear: rows are tokens, not items."""

    def __init__(self):
        super().__init__()
        self.tok, self.head = nn.Linear(D, H), nn.Linear(H, K)

    def forward(self, x):  # (batch, 4, D)
        rows = torch.relu(self.tok(x.reshape(-1, D)))
        return self.head(rows.reshape(len(x), 4, H).mean(1))


def test_rows_several_an_item_are_refused_saying_so():
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(40, 4, D, generator=g), torch.randint(0, K, (40,), generator=g)
    db = diagql.connect(FlatTokens().eval(), (X, y), cache_dir=False, progress=False)
    with pytest.raises(BindError, match=r"no axis of its output follows the batch \(shapes "
                                        r"\(4, 8\), \(8, 8\), \(12, 8\).*several rows an item"):
        db.query("AVG NEURONS IN tok")
    with torch.no_grad():
        truth = db.model.head(torch.relu(db.model.tok(X)).mean(1)).mean(0).numpy()
    np.testing.assert_allclose(db.query("AVG NEURONS IN head").values, truth, atol=1e-5)


class TimeFirst(nn.Module):
    """A Linear over a time-first (T, B, D) sequence, which has no batch_first to say which
    axis is the batch's."""

    def __init__(self):
        super().__init__()
        self.tok, self.head = nn.Linear(D, H), nn.Linear(H, K)

    def forward(self, x):
        return self.head(torch.relu(self.tok(x.transpose(0, 1))).mean(0))


def _pad(batch):
    longest = max(x.shape[0] for x, _ in batch)
    X = torch.zeros(len(batch), longest, D)
    for i, (x, _) in enumerate(batch):
        X[i, :len(x)] = x
    return X, torch.tensor([label for _, label in batch])


def test_a_time_axis_as_long_as_the_batch_is_told_from_the_batch_axis():
    """Items 0-2 of lengths 1, 2 and 3 and batches padded per batch: the time axis follows
    the batch in every probe too, and the first of the two axes was taken as the batch's;
    with batches of 8 items padded to 8 tokens, every answer but the overall mean was
    another item's (a GROUP BY off by up to 0.8)."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(120):
        label = int(torch.randint(0, K, (1,), generator=g))
        x = torch.randn((1, 2, 3)[i] if i < 3 else 8, D, generator=g)
        x[:, 0] += 1.5 * (label - 1)
        items.append((x, label))
    torch.manual_seed(0)
    model = TimeFirst().eval()
    got = []
    handle = model.tok.register_forward_hook(lambda m, i, o: got.append(o.mean(0)))
    with torch.no_grad():  # DiagQL's batches: 8 items in index order, padded per batch
        for start in range(0, len(items), 8):
            model(_pad(items[start:start + 8])[0])
    handle.remove()
    rows = torch.cat(got).numpy()
    y = np.array([label for _, label in items])
    loader = DataLoader(items, batch_size=8, collate_fn=_pad)
    db = diagql.connect(model, loader, cache_dir=False, progress=False, batch_size=8)
    assert any("reverses with the batch" in str(row) for row in db.query("DESCRIBE tok").rows)
    result = db.query("AVG NEURONS IN tok GROUP BY class")
    truth = _group_means(rows, y)
    for key, part in result.groups.items():
        np.testing.assert_allclose(part.values, truth[key], atol=1e-5)
    top = db.query("TOPK 3 INPUTS FOR tok[0]")
    assert [int(i) for i in top.items] == np.argsort(-rows[:, 0], kind="stable")[:3].tolist()


class _SortedTimeFirst(nn.Module):
    """Sorts its batch by length, runs a time-first GRU on it, and puts only the last states
    back in order: the GRU's (T, B, H) rows stay in length order."""

    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(50, H), nn.GRU(H, H), nn.Linear(H, K)

    def forward(self, ids, mask):
        lengths = mask.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        states, _ = self.rnn(self.emb(ids)[order].transpose(0, 1))
        states = states.transpose(0, 1)[torch.argsort(order)]
        return self.out(states[torch.arange(len(lengths)), lengths - 1])


def _pad_ids(batch):
    longest = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest, dtype=torch.bool)
    for j, (one, _) in enumerate(batch):
        ids[j, :len(one)], mask[j, :len(one)] = one, True
    return (ids, mask), torch.tensor([label for _, label in batch])


def test_rows_in_length_order_on_a_time_axis_as_long_as_the_batch_are_refused():
    """With items 0-2 of lengths 1, 2 and 3, the time axis followed the probe's batch too;
    neither axis reversed, and the tie went to batch_first: its TOPK INPUTS named items worth
    0.38 where their true values were 0.16 to -0.31."""
    g = torch.Generator().manual_seed(0)
    lengths = [1, 2, 3] + torch.randint(2, 14, (97,), generator=g).tolist()
    items = [(torch.randint(1, 50, (n,), generator=g), int(torch.randint(0, K, (1,),
                                                                           generator=g)))
             for n in lengths]
    torch.manual_seed(0)
    db = diagql.connect(_SortedTimeFirst().eval(), DataLoader(items, batch_size=32,
                                                              collate_fn=_pad_ids),
                        cache_dir=False, progress=False)
    with pytest.raises(BindError, match="its rows are not in its batch's order"):
        db.query("TOPK 3 INPUTS FOR rnn[0]")


class _Shuffled(nn.Module):
    """Shuffles its batch at random, runs ``inner`` on it, and puts the rows back: the model's
    output is the same each time, ``inner``'s rows are in a new order each pass."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        order = torch.randperm(len(x))
        rows = torch.empty_like(x)
        rows[order] = torch.relu(self.inner(x[order]))
        return self.head(rows)


def test_a_layer_run_on_a_shuffled_batch_is_refused_every_time():
    """Compared in order and reversed only, a random order lined up by chance in 6 of 30
    connections, and TOPK INPUTS then named other items."""
    X, y = torch.randn(100, D), torch.randint(0, K, (100,))
    for seed in range(10):
        torch.manual_seed(seed)
        db = diagql.connect(_Shuffled().eval(), (X, y), cache_dir=False, progress=False)
        assert "not in its batch's order" in (db.catalog["inner"].refused or ""), seed
        assert not db.catalog["head"].refused


def test_integer_rows_pass_a_one_ulp_difference_in_their_weighted_sum():
    # A BLAS may round a row's Σw·x 1 ulp apart at another place in the batch (seen on an AMD
    # EPYC: a bool mask layer was refused as rows in an order of their own); Σx, Σx², Σ|x| of
    # integers stay exact, and a row that differs in them is still told apart.
    from diagql.model.row_order import _same

    rows = np.array([[3.0, 3.0, 3.0, 1.2345678901234567], [1.0, 1.0, 1.0, -0.25]])
    nudged = rows.copy()
    nudged[0, 3] = np.nextafter(nudged[0, 3], 2.0)
    assert _same(rows, nudged, torch.bool)
    other = rows.copy()
    other[0, :3] = [2.0, 2.0, 2.0]
    assert not _same(rows, other, torch.int64)
    assert not _same(rows, rows[::-1], torch.int64)


class TopOneExperts(nn.Module):
    """A mixture of experts that runs each expert on the rows its gate routes to it, as many
    as it gets (none in some batches), and scatters them back."""

    def __init__(self, experts: int = 3):
        super().__init__()
        self.router = nn.Linear(D, experts)
        self.experts = nn.ModuleList(nn.Linear(D, H) for _ in range(experts))
        self.head = nn.Linear(H, K)

    def forward(self, x):
        choice = self.router(x).argmax(1)
        out = torch.zeros(len(x), H)
        for e, expert in enumerate(self.experts):
            routed = choice == e
            if routed.any():
                out[routed] = expert(x[routed])
        return self.head(out)


def test_a_routed_expert_is_refused_as_routed_rows():
    """An expert's rows are the tokens its gate sent it: they had been told as a parametrized
    weight's (the same shape in two probes) or with no reason at all (SW1)."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(120, D, generator=g), torch.randint(0, K, (120,), generator=g)
    torch.manual_seed(1)
    model = TopOneExperts().eval()
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    refused = []
    for name in ("experts.0", "experts.1", "experts.2"):
        try:
            if "routed to it" in dict(db.query(f"DESCRIBE {name}").rows).get("why", ""):
                refused.append(name)
        except BindError as error:  # one that no probe's items reached: refused so
            assert "an expert a router picks" in error.message
    assert refused  # the probes' first items did not all go to one expert
    with pytest.raises(BindError, match="the rows a gate routed to it \\(a mixture of experts' "
                                        "expert\\), not one an item: query a layer after the "
                                        "model gathers them back per item"):
        db.query(f"AVG NEURONS IN {refused[0]}")
