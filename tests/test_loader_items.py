"""A DataLoader's sampler decides which items DiagQL answers over (model/loader_items.py):
a validation split's SubsetRandomSampler, a batch sampler of its own; samplers with no fixed
items are refused, and drop_last's dropped items are said to be read. Truth: plain torch on
the items the loader yields."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import (DataLoader, SubsetRandomSampler, TensorDataset,
                              WeightedRandomSampler)

import diagql
from diagql.errors import DiagQLError, DiagQLWarning
from tests import models


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    X, y = torch.randn(300, 10), torch.randint(0, 4, (300,))
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return model, X, y


def _loader_items(loader) -> list[int]:
    return sorted(int(i) for batch in loader for i in batch[2])


def _indexed(X, y):
    return TensorDataset(X, y, torch.arange(len(X)))


def _avg(db) -> np.ndarray:
    return db.query("AVG NEURONS IN 0").values


def _truth(model, X, items) -> np.ndarray:
    with torch.no_grad():
        return model[0](X[items]).double().mean(0).numpy()


def test_a_subset_sampler_is_the_items_answered(world, tmp_path):
    model, X, y = world
    split = list(range(200, 300))
    loader = DataLoader(TensorDataset(X, y), batch_size=32, sampler=SubsetRandomSampler(split))
    db = diagql.connect(model, loader, progress=False, cache_dir=tmp_path)
    result = db.query("AVG NEURONS IN 0")
    assert result.n_items == 100
    np.testing.assert_allclose(result.values, _truth(model, X, split), rtol=1e-6, atol=1e-7)
    wrong = db.query("AVG NEURONS IN 0 WHERE incorrect")
    with torch.no_grad():
        predicted = model(X[split]).argmax(1)
    assert wrong.n_items == int((predicted != y[split]).sum())


def test_the_whole_dataset_and_its_split_do_not_share_a_cache_entry(world, tmp_path):
    model, X, y = world
    data = TensorDataset(X, y)
    whole = diagql.connect(model, DataLoader(data, batch_size=50), progress=False,
                           cache_dir=tmp_path)
    np.testing.assert_allclose(_avg(whole), _truth(model, X, slice(None)), rtol=1e-6, atol=1e-7)
    split = list(range(0, 300, 3))
    part = diagql.connect(model, DataLoader(data, sampler=SubsetRandomSampler(split)),
                          progress=False, cache_dir=tmp_path)
    np.testing.assert_allclose(_avg(part), _truth(model, X, split), rtol=1e-6, atol=1e-7)


def test_a_batch_sampler_of_its_own_gives_its_items(world):
    model, X, y = world
    batches = [[5, 1, 9], [40, 41], [299]]
    loader = DataLoader(_indexed(X, y), batch_sampler=batches)
    items = _loader_items(loader)
    db = diagql.connect(model, DataLoader(TensorDataset(X, y), batch_sampler=batches),
                        progress=False)
    np.testing.assert_allclose(_avg(db), _truth(model, X, items), rtol=1e-6, atol=1e-7)


def test_shuffling_reads_every_item_without_a_word(world):
    model, X, y = world
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        db = diagql.connect(model, DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True),
                            progress=False)
        result = db.query("AVG NEURONS IN 0")
    assert result.n_items == 300


def test_drop_last_is_said_and_every_item_read(world):
    model, X, y = world
    with pytest.warns(DiagQLWarning, match=r"drops its last 44 of 300 items.*reads all 300") \
            as caught:
        db = diagql.connect(model, DataLoader(TensorDataset(X, y), batch_size=64,
                                              drop_last=True), progress=False)
    assert db.query("AVG NEURONS IN 0").n_items == 300
    assert caught[0].filename == __file__  # the user's line, not DiagQL's (data.py:79 before)


def test_a_few_items_of_a_loader_with_workers_are_read_in_this_process(world):
    """Every probe read of a few items started the loader's workers anew: where processes
    spawn (macOS, Windows), SHOW LAYERS over a loader of 2 workers took 139 s."""
    model, X, y = world
    data = models.CountedItems(X, y)
    db = diagql.connect(model, DataLoader(data, batch_size=50, num_workers=2), progress=False,
                        cache_dir=False)
    db.query("SHOW LAYERS")
    probed = data.reads
    assert 0 < probed < 300  # the probe's reads, here; none of them in a worker
    with torch.no_grad():
        hidden = model[1](model[0](X)).double()
    np.testing.assert_allclose(db.query("AVG NEURONS IN 1").values, hidden.mean(0).numpy(),
                               rtol=1e-6)
    assert data.reads - probed < 300  # the passes over every item ran in the workers


def test_a_sampler_with_replacement_is_refused(world):
    model, X, y = world
    loader = DataLoader(TensorDataset(X, y), sampler=WeightedRandomSampler([1.0] * 300, 300))
    with pytest.raises(DiagQLError, match="WeightedRandomSampler.*with replacement.*Subset"):
        diagql.connect(model, loader, progress=False)


def test_a_sampler_that_draws_other_items_each_time_is_refused(world):
    model, X, y = world

    class Draws(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(torch.randperm(300)[:50].tolist())

        def __len__(self):
            return 50

    with pytest.raises(DiagQLError, match="yields other items each time"):
        diagql.connect(model, DataLoader(TensorDataset(X, y), sampler=Draws()), progress=False)


def test_a_sampler_past_the_dataset_is_refused(world):
    model, X, y = world
    with pytest.raises(DiagQLError, match="index 300, outside its dataset of 300 items"):
        diagql.connect(model, DataLoader(TensorDataset(X, y), sampler=[0, 300]), progress=False)


def test_a_sequential_sampler_over_part_of_the_dataset_gives_that_part(world):
    model, X, y = world
    loader = DataLoader(TensorDataset(X, y), sampler=torch.utils.data.SequentialSampler(range(50)))
    db = diagql.connect(model, loader, progress=False)
    np.testing.assert_allclose(_avg(db), _truth(model, X, list(range(50))), rtol=1e-6, atol=1e-7)


def test_items_named_by_a_split_are_the_datasets_own_indices(world):
    """Top inputs and drawn samples name the data set's items (``loader.dataset[i]``), not
    their positions in the split."""
    model, X, y = world
    split = sorted(np.random.default_rng(0).choice(300, 120, replace=False).tolist())
    loader = DataLoader(TensorDataset(X, y), batch_size=32, sampler=SubsetRandomSampler(split))
    db = diagql.connect(model, loader, progress=False, cache_dir=False)
    top = db.query("TOPK 3 INPUTS FOR 0[5]")
    with torch.no_grad():
        first = model[0](X).numpy()
    best = sorted(split, key=lambda i: (-first[i, 5], i))[:3]
    assert top.items.tolist() == best
    np.testing.assert_allclose(top.values, first[best, 5], rtol=1e-6)
    drawn = db.sample("random(0.25, random_state=0)")
    assert len(drawn) == 30 and set(drawn.tolist()) <= set(split)
    db.query("SET estimator = plain")  # the sample's own mean: over the items drawn
    sampled = db.query("AVG NEURONS IN 0 USING SAMPLE random(0.25, random_state=0)")
    np.testing.assert_allclose(sampled.values, _truth(model, X, drawn), rtol=1e-6, atol=1e-7)


def _padded(items):
    padded = nn.utils.rnn.pad_sequence([item[0] for item in items], batch_first=True)
    return padded, torch.stack([item[1] for item in items])


def _sorted_by_length(items):
    return _padded(sorted(items, key=lambda item: -len(item[0])))


def test_a_collate_fn_that_reorders_a_batch_is_refused():
    """Sorted by length (for pack_padded_sequence(enforce_sorted=True)): row j of a batch is
    no longer the j-th item, and every answer that names items would name others."""
    torch.manual_seed(0)
    data = [(torch.randn(int(n), 4), torch.tensor(int(n) % 3))
            for n in torch.randint(2, 9, (40,))]

    class Mean(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.fc(x).mean(1))

    loader = DataLoader(data, batch_size=8, collate_fn=_sorted_by_length)
    with pytest.raises(DiagQLError, match="collate_fn returns a batch's items in another "
                                          "order .* keep their order"):
        diagql.connect(Mean(), loader, progress=False, cache_dir=False).query("AVG NEURONS IN fc")
    db = diagql.connect(Mean(), DataLoader(data, batch_size=8, collate_fn=_padded),
                        progress=False, cache_dir=False)
    assert db.query("AVG NEURONS IN fc").n_items == 40
    # Stored by length, the first 16 all of one: a stable sort keeps them in order, and the
    # check (on the first 16 only) had let it answer for other items, unwarned.
    stored = sorted([(torch.randn(int(n), 4), torch.tensor(int(n) % 3))
                     for n in torch.randint(2, 9, (200,))], key=lambda item: len(item[0]))
    assert len(stored[15][0]) == len(stored[0][0])
    loader = DataLoader(stored, batch_size=8, collate_fn=_sorted_by_length)
    with pytest.raises(DiagQLError, match="collate_fn returns a batch's items in another"):
        diagql.connect(Mean(), loader, progress=False, cache_dir=False).query("AVG NEURONS IN fc")


class _Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def _pad_images(items):
    side = max(x.shape[-1] for x, _ in items)
    return (torch.stack([nn.functional.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))
                         for x, _ in items]), torch.stack([t for _, t in items]))


def test_padding_to_a_batchs_largest_image_is_warned_of_past_the_first_items():
    """The first 20 images are 8 x 8, the rest larger: the probe's first items had shown no
    batch dependence, and GROUP BY class and WHERE class answered one question two ways."""
    torch.manual_seed(2)
    sides = [8] * 20 + [9, 10, 11, 12, 13] * 8
    data = [(torch.randn(1, s, s), torch.tensor(i % 3)) for i, s in enumerate(sides)]
    loader = DataLoader(data, batch_size=16, collate_fn=_pad_images)
    with pytest.warns(DiagQLWarning, match="other outputs when other items share its batch"):
        diagql.connect(_Pooled(), loader, progress=False, cache_dir=False).catalog
    same = [(torch.randn(1, 8, 8), torch.tensor(i % 3)) for i in range(60)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        diagql.connect(_Pooled(), DataLoader(same, batch_size=16, collate_fn=_pad_images),
                       progress=False, cache_dir=False).catalog


def test_torchs_batch_sampler_given_reads_its_samplers_items(world):
    """BatchSampler(..., drop_last=True) given as batch_sampler= had dropped its last items
    unsaid, where batch_size=, drop_last=True reads and says them."""
    model, X, y = world
    for inner in (torch.utils.data.SequentialSampler, torch.utils.data.RandomSampler):
        batches = torch.utils.data.BatchSampler(inner(range(300)), 64, drop_last=True)
        with pytest.warns(DiagQLWarning, match=r"drops its last 44 of 300 items"):
            db = diagql.connect(model, DataLoader(TensorDataset(X, y), batch_sampler=batches),
                                progress=False, cache_dir=False)
        np.testing.assert_allclose(_avg(db), _truth(model, X, np.arange(300)), rtol=1e-6,
                                   atol=1e-7)


class _OpenedPerWorker(torch.utils.data.Dataset):
    """Reads only once its worker_init_fn has run (as an HDF5 file opened per worker)."""

    def __init__(self, X, y):
        self.X, self.y, self.opened = X, y, False

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        if torch.utils.data.get_worker_info() is not None and not self.opened:
            raise RuntimeError("worker not initialised")
        return self.X[i], self.y[i]


def _open(_):
    torch.utils.data.get_worker_info().dataset.opened = True


def test_a_loaders_worker_init_fn_runs_in_the_workers_that_read(world):
    model, X, y = world
    items = np.arange(0, 300, 3)
    loader = DataLoader(_OpenedPerWorker(X, y), batch_size=32, num_workers=2,
                        worker_init_fn=_open, sampler=SubsetRandomSampler(items.tolist()))
    db = diagql.connect(model, loader, progress=False, cache_dir=False)
    np.testing.assert_allclose(_avg(db), _truth(model, X, items), rtol=1e-6, atol=1e-7)


def _standardise(batch):
    """A collate_fn that standardises each batch's inputs by the batch's own statistics."""
    X = torch.stack([x for x, _ in batch])
    y = torch.stack([t for _, t in batch])
    return (X - X.mean(dim=0)) / X.std(dim=0), y


def test_a_loaders_own_collate_fn_runs_over_the_loaders_batch_size(world):
    """A collate_fn may pad or normalise per batch: DiagQL's batches of 256 had given a loader
    of batches of 50 other numbers (0.1450 against 0.1438; 275 mistakes against 276),
    unwarned. The loader's batch size is the connection's unless one is given; an item alone
    standardised by a batch of one (NaN) against the same item in a batch is warned of."""
    model, X, y = world
    loader = DataLoader(TensorDataset(X, y), batch_size=50, collate_fn=_standardise)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conn = diagql.connect(model, loader, cache_dir=False, progress=False)
        avg = conn.query("AVG NEURONS IN 1 WHERE incorrect")
    assert conn.settings.batch_size == 50
    assert any("collate_fn that normalises each batch" in str(w.message) for w in caught)
    rows, mistakes = [], []
    with torch.no_grad():
        for xb, yb in loader:  # the user's own batches, in the loader's order
            out = model(xb)
            rows.append(model[1](model[0](xb)))
            mistakes.append(out.argmax(dim=1) != yb)
    rows, mistakes = torch.cat(rows), torch.cat(mistakes)
    assert avg.n_items == int(mistakes.sum())
    np.testing.assert_allclose(avg.values, rows[mistakes].double().mean(dim=0).numpy(),
                               rtol=1e-5, atol=1e-6)
    given = diagql.connect(model, loader, batch_size=30, cache_dir=False, progress=False)
    assert given.settings.batch_size == 30


class _Corrupt(torch.utils.data.Dataset):
    """Item 137 cannot be read (a corrupt file)."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        if i == 137:
            raise OSError("corrupt file 137.png")
        return self.X[i], self.y[i]


def test_a_workers_failure_is_its_own_message_not_the_workers_traceback(world):
    """torch re-raises a worker's exception with the worker's whole traceback in its message:
    the error shows its last line and the worker, one line (--debug keeps the traceback)."""
    model, X, y = world
    loader = DataLoader(_Corrupt(X, y), batch_size=32, num_workers=1)
    db = diagql.connect(model, loader, progress=False, cache_dir=False)
    with pytest.raises(DiagQLError) as info:
        db.query("AVG NEURONS IN 0")
    message = str(info.value)
    assert "reading the data raised OSError: corrupt file 137.png (in the Dataset's " \
           "__getitem__ or the DataLoader's collate_fn, in DataLoader worker process 0)" in message
    assert "Traceback" not in message and "\n" not in message
