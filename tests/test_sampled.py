"""The sampled digest that stamps large data before each statement (storage/sampled.py): the
same bytes give the same digest, wholesale edits (scaling, shuffled rows, one column of every
row, a write through a strided view) change it, and the bytes it reads are the data's own.
Truth: plain numpy on the same arrays."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diagql
from diagql.storage.sampled import PIECE, SAMPLE_BYTES, byte_span, sampled_digest


def _large(rows: int = 2_000, columns: int = 2_500) -> np.ndarray:
    """20 MB of float32 (over SAMPLE_BYTES: sampled, not hashed whole)."""
    return np.random.RandomState(0).randn(rows, columns).astype(np.float32)


def test_the_same_bytes_give_the_same_digest_and_a_small_array_is_hashed_whole():
    X = _large()
    assert X.nbytes > 10 * SAMPLE_BYTES
    assert sampled_digest([X]) == sampled_digest([X.copy()]) == sampled_digest([X, X])
    assert sampled_digest([X]) == sampled_digest([torch.from_numpy(X)])  # one storage
    small = X[:50].copy()  # 0.5 MB: every byte
    before = sampled_digest([small])
    small[17, 1001] += 1
    assert sampled_digest([small]) != before
    everything = sampled_digest([X], budget=None)
    X[1999, 2499] += 1  # the very last element: hashed whole, it is seen
    assert sampled_digest([X], budget=None) != everything


@pytest.mark.parametrize("edit", [
    lambda X: X.__imul__(0.5),
    lambda X: X.__setitem__(slice(None), X[np.random.RandomState(1).permutation(len(X))]),
    lambda X: X.__setitem__((slice(None), 1234), X[:, 1234] - X[:, 1234].mean()),
    lambda X: X.__setitem__((slice(None), 7), 0.0),
], ids=["scaled", "rows shuffled", "one column centred", "one column zeroed"])
@pytest.mark.parametrize("rows, columns", [(2_000, 2_500), (1_280, 4_096), (80, 60_000)],
                         ids=["10 kB rows", "16 kB rows, 5 to a stratum", "240 kB rows"])
def test_wholesale_edits_change_the_digest(edit, rows, columns):
    """Rows of 16 kB, 5 to each of the 256 strata: had every piece begun its stratum, each
    would have read the first 1,024 columns of every fifth row, and column 1234 was missed."""
    X = _large(rows, columns)
    before = sampled_digest([X])
    original = X.copy()
    edit(X)
    assert not np.array_equal(X, original)
    assert sampled_digest([X]) != before


def test_a_strided_view_is_read_where_its_elements_lie():
    base = torch.randn(3_000, 1_000)
    view = base[100:2_900, 10:990:2]  # neither contiguous nor starting its storage
    span = byte_span(view)
    first = (100 * 1_000 + 10) * 4
    last = (2_899 * 1_000 + 988) * 4 + 4
    np.testing.assert_array_equal(span.numpy(), base.numpy().view(np.uint8).reshape(-1)[first:last])
    before = sampled_digest([view])
    base[100:2_900, 10:990:2] *= -1  # through the view's own elements, all of them
    assert sampled_digest([view]) != before


def test_fortran_ordered_and_read_only_arrays_are_read_without_a_warning(tmp_path):
    X = np.asfortranarray(_large())
    np.testing.assert_array_equal(byte_span(X).numpy(), X.T.reshape(-1).view(np.uint8))
    np.save(tmp_path / "X.npy", _large())
    mapped = np.load(tmp_path / "X.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampled_digest([mapped]) == sampled_digest([_large()])


def test_what_has_no_plain_bytes_is_left_out():
    assert byte_span(np.array([object(), 1], dtype=object)) is None
    assert byte_span(torch.eye(3).to_sparse()) is None
    assert sampled_digest([np.array([None, 1])]) == sampled_digest([])


def test_the_budget_bounds_what_is_read(monkeypatch):
    """About SAMPLE_BYTES in pieces of PIECE bytes, whatever the data's size."""
    read = []
    raw = torch.from_numpy(_large().reshape(-1).view(np.uint8))
    original = torch.Tensor.index_select

    def counting(self, dim, index):
        taken = original(self, dim, index)
        read.append(taken.numel())
        return taken

    monkeypatch.setattr(torch.Tensor, "index_select", counting)
    sampled_digest([raw])
    assert read == [SAMPLE_BYTES // PIECE * PIECE]


def test_every_samplers_reported_call_runs_again_as_written():
    """A result's sampler is its call's canonical text: ``vas(0.1, bandwidth=None, ...)`` had
    been refused when run again (sweep SX7)."""
    from diagql.samplers import REGISTRY

    torch.manual_seed(0)
    X, y = torch.randn(300, 6), torch.randint(0, 3, (300,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3)).eval()
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    for name in REGISTRY:
        first = db.query(f"AVG NEURONS IN 0 USING SAMPLE {name}")
        spec = first.provenance.sampler
        again = db.query(f"AVG NEURONS IN 0 USING SAMPLE {spec}")
        assert again.provenance.sampler == spec and "None" not in spec, spec
        np.testing.assert_array_equal(again.values, first.values)
