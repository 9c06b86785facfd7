"""Group keys: the (true class, correctness) cell codes and their inverse, and the order in
which group keys are shown."""
from __future__ import annotations

import itertools

import numpy as np

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
