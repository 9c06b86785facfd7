"""Padded sets of points (a PointNet's shared MLP, a Linear over (batch, points, 3)): their
real positions come from a padding mask under a name of the model's own (``forward(points,
mask)``), whichever of its two values marks real points; and a layer whose length follows the
batch's longest item is told so even where the data's first item is the longest, which every
probe of the first items pads to (docs/ARCHITECTURE.md, "Data model": real tokens).

The truth is plain torch: each item run alone, unpadded, its hidden layer's output reduced
over its own points.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import diagql
from diagql.model.input_masks import real_positions


class Clouds(Dataset):
    """Sets of 5-12 points in 3-D, labels 0-2; the first set is the longest of all."""

    def __init__(self, n: int = 60):
        g = torch.Generator().manual_seed(0)
        sizes = torch.randint(5, 12, (n,), generator=g)
        sizes[0] = 12
        self.items = [(torch.randn(int(p), 3, generator=g), int(i % 3)) for i, p in
                      enumerate(sizes)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items, padding_true: bool = False, fixed: int | None = None):
    """((points padded to the batch's longest set, or to ``fixed`` points, mask), labels);
    the mask True at real points, or True at padding (torch's key_padding_mask) with
    ``padding_true``."""
    longest = fixed or max(len(points) for points, _ in items)
    points = torch.zeros(len(items), longest, 3)
    real = torch.zeros(len(items), longest, dtype=torch.bool)
    for j, (p, _) in enumerate(items):
        points[j, :len(p)] = p
        real[j, :len(p)] = True
    return (points, ~real if padding_true else real), torch.tensor([y for _, y in items])


class PointNet(nn.Module):
    """A shared MLP over each point, max-pooled over the real points."""

    def __init__(self, padding_true: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Linear(3, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 3)
        self.padding_true = padding_true

    def pooled(self, points, real):
        h = self.act(self.mlp(points))
        return self.head(h.masked_fill(~real[..., None], float("-inf")).max(1).values)


class MaskNet(PointNet):
    def forward(self, points, mask):
        return self.pooled(points, mask)


class PaddingMaskNet(PointNet):
    def forward(self, points, padding_mask):
        return self.pooled(points, ~padding_mask)


class Unmasked(PointNet):
    """Takes no mask (its max over every position counts a padded point's activations)."""

    def forward(self, points):
        return self.head(self.act(self.mlp(points)).max(1).values)


def unmasked_collate(items):
    (points, _), labels = collate(items)
    return points, labels


def truth(model, data, position=None) -> np.ndarray:
    """The mean over items of ``act``'s output for each item alone, reduced over its points
    (their mean, or one point)."""
    rows = []
    with torch.no_grad():
        for points, _ in data.items:
            h = model.act(model.mlp(points))
            rows.append((h.mean(0) if position is None else h[position]).double().numpy())
    return np.mean(rows, axis=0)


def dense(result, width: int) -> np.ndarray:
    values = np.full(width, np.nan)
    values[np.asarray(result.neurons)] = result.values
    return values


@pytest.mark.parametrize("model_cls,padding_true", [(MaskNet, False), (PaddingMaskNet, True)])
@pytest.mark.parametrize("batch_size,fixed", [(16, None), (7, None), (7, 14)],
                         ids=["16", "7", "7-to-14-points"])
def test_a_padding_mask_under_the_models_own_name_marks_real_points(model_cls, padding_true,
                                                                     batch_size, fixed):
    """Padded to a fixed 14 points, no row is whole: the mask True at padding had been read
    the other way round, every answer its padding's (the Linear's bias)."""
    data = Clouds()
    model = model_cls().eval()
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, collate_fn=lambda items: collate(items, padding_true, fixed))
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        db = diagql.connect(model, loader, cache_dir=False)
        described = dict((row[0], row[1]) for row in db.query("DESCRIBE act").rows)
        assert described["real tokens"] == \
            f"the {'padding_mask' if padding_true else 'mask'} of the batch input"
        mean = db.query("AVG NEURONS IN act USING FULL")
        last = db.query("AVG NEURONS IN act TOKEN -1 USING FULL")
    np.testing.assert_allclose(dense(mean, 16), truth(model, data), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dense(last, 16), truth(model, data, -1), rtol=1e-5, atol=1e-6)


def test_a_length_that_follows_the_batch_is_told_where_the_first_item_is_the_longest():
    data = Clouds()
    loader = torch.utils.data.DataLoader(data, batch_size=16, collate_fn=unmasked_collate)
    db = diagql.connect(Unmasked().eval(), loader, cache_dir=False)
    shape = next(row[1] for row in db.query("DESCRIBE act").rows if row[0] == "axes")
    assert "length 12 in the probe, changing with the batch" in shape
    with pytest.warns(diagql.DiagQLWarning, match="layer 'act': its sequence length changes "
                                                  "with the batch"):
        db.query("AVG NEURONS IN act USING FULL")


def _beside(real: torch.Tensor) -> torch.Tensor:
    """A sequence input (batch, sequence, 2) for a mask: zeros where ``real`` is False."""
    x = torch.randn(*real.shape, 2, generator=torch.Generator().manual_seed(1))
    x[~real] = 0.0
    return x


def test_real_positions_reads_either_meaning_and_refuses_a_mask_of_something_else():
    right = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]).bool()
    for mask in (right.int(), (~right).int(), right, ~right, right.float()):
        assert real_positions({"x": _beside(right), "mask": mask}, "mask").tolist() == \
            right.tolist()
    left = right.flip(1)  # a decoder's left padding
    assert real_positions({"x": _beside(left), "mask": left}, "mask").tolist() == left.tolist()
    # Padded to a fixed length, no row whole: the input's padding tells the meaning, whatever
    # the name, and an additive mask's 0 is real.
    fixed = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    x = _beside(fixed)
    for key, mask in (("mask", ~fixed), ("key_padding_mask", ~fixed), ("mask", fixed),
                      ("mask", torch.zeros(2, 4).masked_fill(~fixed, float("-inf")))):
        assert real_positions({"x": x, key: mask}, key).tolist() == fixed.tolist()
    time_first = {"x": x.transpose(0, 1), "mask": ~fixed}  # (sequence, batch, 2)
    assert real_positions(time_first, "mask").tolist() == fixed.tolist()
    assert real_positions({"x": x, "mask": torch.zeros(2, 4)}, "mask").tolist() == \
        [[True] * 4] * 2
    # Masks of something else: every position holds the input's own values.
    every = torch.randn(3, 4, 2)
    forecast = torch.tensor([[0, 0, 1, 1]] * 3)  # the last steps to predict
    scattered = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]])  # masked tokens
    for mask in (forecast, scattered, forecast.bool()):
        assert real_positions({"x": every, "mask": mask}, "mask") is None
    assert real_positions({"x": every, "mask": torch.tensor([[0, 1, 2, 2]] * 3)}, "mask") is None


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(30, 8, padding_idx=0), nn.Linear(8, 8)

    def forward(self, ids):
        return torch.tanh(self.lin(self.emb(ids)))


class _DualEncoder(nn.Module):
    """A query and a document, each padded to one length, each with its own mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.doc_enc, self.head = _Tokens(), _Tokens(), nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask, doc_ids, doc_attention_mask):
        def pool(h, m):
            m = m.unsqueeze(-1).float()
            return (h * m).sum(1) / m.sum(1)
        return self.head(torch.cat([pool(self.enc(input_ids), attention_mask),
                                    pool(self.doc_enc(doc_ids), doc_attention_mask)], 1))


def _padded(n: int, length: int, low: int, high: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return torch.randint(1, 30, (n, length), generator=g) * mask, mask


class _SharedDualEncoder(nn.Module):
    """One encoder for both inputs (a siamese retriever), called on the query's ids, then the
    document's; ``lin`` also on the document's embeddings the model's forward looks up in a
    table of its own (no module: they cannot be traced to their ids)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.enc, self.head = _Tokens(), nn.Linear(24, 3)
        self.table = nn.Parameter(torch.randn(30, 8))
        self.lin = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask, doc_ids, doc_attention_mask):
        def pool(h, m):
            m = m.unsqueeze(-1).float()
            return (h * m).sum(1) / m.sum(1)
        return self.head(torch.cat([pool(self.enc(input_ids), attention_mask),
                                    pool(self.enc(doc_ids), doc_attention_mask),
                                    pool(self.lin(self.table[doc_ids]), doc_attention_mask)], 1))


def _masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    m = mask.unsqueeze(-1).double()
    return ((rows.double() * m).sum(1) / m.sum(1)).mean(0).numpy()


def test_each_encoder_of_a_dual_encoder_reads_the_mask_of_its_own_ids():
    """A dual encoder's document layers were averaged over the query's attention_mask where
    both inputs are padded to one length (the sweep's `doc_enc`: a silently wrong mean over
    tokens and TOKEN -1). A module called on an input's ids, and every module it calls, reads
    the mask named for them (doc_ids: doc_attention_mask), a shared encoder's each call too;
    a layer that cannot be traced to its ids (over embeddings looked up in the model's own
    forward) reads attention_mask, warned of. One mask says nothing."""
    ids, mask = _padded(120, 12, 2, 6, 0)
    doc_ids, doc_mask = _padded(120, 12, 5, 12, 1)
    data = {"input_ids": ids, "attention_mask": mask, "doc_ids": doc_ids,
            "doc_attention_mask": doc_mask, "labels": torch.arange(120) % 3}
    model = _DualEncoder().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        db = diagql.connect(model, data, cache_dir=False, progress=False)
        with torch.no_grad():
            for name, rows, real in [
                    ("enc", model.enc(ids), mask), ("enc.lin", model.enc.lin(model.enc.emb(ids)),
                                                    mask),
                    ("doc_enc", model.doc_enc(doc_ids), doc_mask),
                    ("doc_enc.emb", model.doc_enc.emb(doc_ids), doc_mask),
                    ("doc_enc.lin", model.doc_enc.lin(model.doc_enc.emb(doc_ids)), doc_mask)]:
                np.testing.assert_allclose(db.query(f"AVG NEURONS IN {name}").values,
                                           _masked_mean(rows, real), atol=1e-6, err_msg=name)
    shared = _SharedDualEncoder().eval()
    with pytest.warns(diagql.DiagQLWarning, match=r"several attention masks of one shape "
                                                  r"\('attention_mask', 'doc_attention_mask'\): "
                                                  r".* could not trace lin to an input's ids"):
        db = diagql.connect(shared, data, cache_dir=False, progress=False)
        db.catalog
    with torch.no_grad():
        for name, rows, real in [("enc#1", shared.enc(ids), mask),
                                 ("enc.lin#2", shared.enc.lin(shared.enc.emb(doc_ids)),
                                  doc_mask),
                                 ("lin", shared.lin(shared.table[doc_ids]), mask)]:
            np.testing.assert_allclose(db.query(f"AVG NEURONS IN {name}").values,
                                       _masked_mean(rows, real), atol=1e-6, err_msg=name)
    single = {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(120) % 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        db = diagql.connect(_OneEncoder().eval(), single, cache_dir=False, progress=False)
        assert "enc" in db.layers


class _OneEncoder(_DualEncoder):
    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.head(torch.cat([(self.enc(input_ids) * m).sum(1) / m.sum(1)] * 2, 1))


class _Repacked(nn.Module):
    """A GRU over ids padded to 14, packed by their lengths and padded back inside forward:
    its layers after pad_packed_sequence are as long as the batch's longest item."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn = nn.Embedding(30, 8), nn.GRU(8, 8, batch_first=True)
        self.act, self.head = nn.Tanh(), nn.Linear(8, 3)

    def forward(self, ids, lens):
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(ids), lens.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out = self.act(nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0],
                                                        batch_first=True)[0])
        real = (torch.arange(out.shape[1])[None, :] < lens[:, None]).float()[..., None]
        return self.head((out * real).sum(dim=1) / lens[:, None].float())


def test_lengths_mark_a_layer_as_long_as_the_batchs_longest_item():
    """Lengths marked only layers as long as the padded ids: after pad_packed_sequence a
    layer is as long as the batch's longest item, and its padding had counted in TOKEN -1
    (10-15% off in batches of 16) under a warning that the lengths marked none of it (sweep
    SS9)."""
    torch.manual_seed(1)
    n, width = 120, 14
    lens = torch.where(torch.rand(n) < 0.05, torch.tensor(width), torch.randint(1, 4, (n,)))
    ids = torch.randint(1, 30, (n, width)) * (torch.arange(width) < lens[:, None])
    y = ids[:, 0] % 3
    model = _Repacked().eval()
    with torch.no_grad():
        seen = []
        hook = model.act.register_forward_hook(lambda m, i, o: seen.append(o))
        model(ids, lens)
        hook.remove()
    last = torch.stack([seen[0][i, lens[i] - 1] for i in range(n)]).double().numpy()
    mean = torch.stack([seen[0][i, :lens[i]].mean(0) for i in range(n)]).double().numpy()
    items = [{"ids": ids[i], "lens": lens[i], "labels": y[i]} for i in range(n)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        db = diagql.connect(model, items, batch_size=16, cache_dir=False, progress=False)
        tail = db.query("AVG NEURONS IN act TOKEN -1 WHERE class = 0")
        means = db.query("AVG NEURONS IN act")
    chosen = (y == 0).numpy()
    np.testing.assert_allclose(tail.values, last[chosen].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(means.values, mean.mean(0), rtol=1e-5, atol=1e-6)
    assert not [w for w in caught if "marks none of them" in str(w.message)]
    assert "lens of the batch input" in db.catalog["act"].mask


class _MaskedMean(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.proj, self.head = nn.Embedding(30, 8, padding_idx=0), nn.Linear(8, 8), \
            nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        h, m = torch.relu(self.proj(self.emb(input_ids))), attention_mask.float()[..., None]
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


def test_an_item_with_no_real_token_is_named_by_its_index_with_what_to_do():
    """An empty text (its mask all 0) had every token query refused with "an item of this
    batch has no real token", naming neither the item nor a remedy (SW2)."""
    torch.manual_seed(0)
    lengths = torch.randint(1, 9, (40,))
    lengths[13] = 0
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 30, (40, 8)) * mask
    items = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": i % 2} for i in range(40)]
    db = diagql.connect(_MaskedMean().eval(), items, batch_size=8, cache_dir=False,
                        progress=False)
    for query in ("AVG NEURONS IN proj", "TOPK 3 NEURONS IN proj TOKENS MAX"):
        with pytest.raises(diagql.DiagQLError, match=r"^item 13 has no real token at layer "
                                                     r"'proj' .*leave the items with no real "
                                                     r"token \(empty texts\) out of the data"):
            db.query(query)
    kept = [item for i, item in enumerate(items) if i != 13]
    db = diagql.connect(_MaskedMean().eval(), kept, batch_size=8, cache_dir=False,
                        progress=False)
    model, real = _MaskedMean().eval(), np.delete(mask.numpy(), 13, axis=0).astype(bool)
    with torch.no_grad():
        h = model.proj(model.emb(torch.from_numpy(np.delete(ids.numpy(), 13, axis=0))))
    truth = np.stack([h[i][real[i]].double().mean(0).numpy() for i in range(39)]).mean(0)
    np.testing.assert_allclose(db.query("AVG NEURONS IN proj").values, truth, rtol=1e-5)


class _ConfiguredEncoder(nn.Module):
    """A model that carries a Hugging Face-style config with its pad token."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        torch.manual_seed(2)
        self.config = SimpleNamespace(pad_token_id=0)
        self.emb, self.head = nn.Embedding(30, 8), nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids).mean(1))


def test_input_ids_padded_with_the_pad_token_and_no_mask_are_warned_of():
    """A BERT's right-padded items without their attention_mask had their padding averaged
    into every token view, 0.14-0.38 off, unwarned (SW2); with the mask, no warning."""
    torch.manual_seed(0)
    lengths = torch.randint(3, 9, (30,))
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 30, (30, 8)) * mask
    bare = [{"input_ids": ids[i], "labels": i % 2} for i in range(30)]
    with pytest.warns(diagql.DiagQLWarning, match=r"input_ids end in the model's pad token "
                                                  r"\(0, its config's pad_token_id\) and come "
                                                  r"with no attention_mask"):
        diagql.connect(_ConfiguredEncoder().eval(), bare, cache_dir=False,
                       progress=False).query("AVG NEURONS IN emb")
    masked = [{**item, "attention_mask": mask[i]} for i, item in enumerate(bare)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pad token.*", category=diagql.DiagQLWarning)
        diagql.connect(_ConfiguredEncoder().eval(), masked, cache_dir=False,
                       progress=False).query("AVG NEURONS IN emb")


def test_no_real_token_survives_a_pickle_as_a_ray_workers_error_does():
    import pickle

    from diagql.model.input_masks import NoRealToken

    error = pickle.loads(pickle.dumps(NoRealToken("proj", 3).at_item("13")))
    assert (error.layer, error.row) == ("proj", 3)
    assert error.message.startswith("item 13 has no real token at layer 'proj'")


def test_padding_of_one_value_per_item_is_read_and_padding_of_none_is_warned_of():
    """Items padded, then standardised each on its own: each row's padding is one value of its
    own, and the mask had been read as no padding at all, the padding averaged in unwarned
    (sweep SX1: 0.12-0.23 off). Padding of random values cannot tell the mask's meaning: warned."""
    data = Clouds()
    (points, real), labels = collate(data.items)
    standardised = (points - points.mean(1, keepdim=True)) / points.std(1, keepdim=True)
    assert real_positions({"x": standardised, "mask": real}, "mask").tolist() == real.tolist()
    model = MaskNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        db = diagql.connect(model, [((x, m), y) for x, m, y in zip(standardised, real, labels)],
                            cache_dir=False, progress=False)
        mean = db.query("AVG NEURONS IN act USING FULL")
    with torch.no_grad():
        h = model.act(model.mlp(standardised)).double()
    own = ((h * real[..., None]).sum(1) / real.sum(1, keepdim=True)).mean(0).numpy()
    np.testing.assert_allclose(dense(mean, 16), own, rtol=1e-5, atol=1e-6)
    noisy = torch.where(real[..., None], points, torch.randn(points.shape))
    assert real_positions({"x": noisy, "mask": real}, "mask") is None
    with pytest.warns(diagql.DiagQLWarning, match="'mask' argument looks like a padding mask"):
        diagql.connect(model, [((x, m), y) for x, m, y in zip(noisy, real, labels)],
                       cache_dir=False, progress=False).query("DESCRIBE act")
    # Masks of something else warn of nothing: the same last steps in every row, scattered,
    # a causal (length, length) mask (sweep SX5).
    from diagql.model.input_masks import warn_unread_masks
    every = torch.randn(3, 4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        for mask in (torch.tensor([[0, 0, 1, 1]] * 3),
                     torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]]),
                     torch.ones(4, 4).tril().bool()):
            warn_unread_masks({"x": every, "mask": mask})
    # One value per row is padding only where it tells: a forecast's one masked step holds
    # the input's own value (it had been read as padding), a window filled forward its last.
    steps = torch.randn(3, 5, 2)
    one = torch.tensor([[1, 1, 1, 1, 0]] * 2 + [[1, 1, 1, 1, 1]]).bool()
    assert real_positions({"x": steps, "mask": one}, "mask") is None
    filled = steps.clone()
    window = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    for row, length in enumerate(window.sum(1).tolist()):
        filled[row, length:] = filled[row, length - 1]
    assert real_positions({"x": filled, "mask": window}, "mask") is None
