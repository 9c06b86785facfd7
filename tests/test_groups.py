"""Group keys: the (true class, correctness) cell codes and their inverse, and the order in
which group keys are shown."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from diagql.engine.groups import cell_codes, cell_of, n_cells, sorted_keys


def test_each_class_and_correctness_has_its_own_code_and_comes_back():
    n_classes = 7
    pairs = list(itertools.product(range(n_classes), (True, False)))
    labels = np.array([label for label, _ in pairs])
    correct = np.array([right for _, right in pairs])
    codes = cell_codes(labels, correct)
    assert codes.dtype == np.int64
    assert len(set(codes.tolist())) == len(pairs) == n_cells(n_classes)
    assert codes.min() == 0 and codes.max() == n_cells(n_classes) - 1
    back_labels, back_correct = cell_of(codes)
    np.testing.assert_array_equal(back_labels, labels)
    np.testing.assert_array_equal(back_correct, correct)
    for code, (label, right) in zip(codes.tolist(), pairs):
        assert cell_of(code) == (label, right)
    # A class's correct cell comes first, then its incorrect one, then the next class.
    assert codes.tolist() == sorted(codes.tolist())


def test_group_keys_sort_numerically_and_false_before_true():
    assert sorted_keys([10, 2, 1]) == [1, 2, 10]
    assert sorted_keys({True: 0, False: 0}) == [False, True]
    assert sorted_keys(np.array([3, 0, 2]).tolist()) == [0, 2, 3]


def test_a_table_of_thousands_of_groups_draws_fifty_and_counts_the_rest():
    """9,208 groups had taken 24 s to draw (4.4 M characters) after a 0.6 s query."""
    import diagql

    torch.manual_seed(0)
    X, y = torch.randn(3000, 6), torch.arange(3000) % 300
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 300))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    result = db.query("AVG NEURONS IN 0 GROUP BY class")
    text = str(result)
    assert "… 250 more groups (in --format csv and result.groups)" in " ".join(text.split())
    assert len(result.groups) == 300 and len(result.to_dict()["groups"]) == 300
    with torch.no_grad():
        truth = model[0](X[y == 299]).double().mean(0).numpy()
    np.testing.assert_allclose(result.groups[299].values, truth, atol=1e-6)
