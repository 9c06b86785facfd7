"""Aggregate states merged over a split of the items equal the state over all of them, and
numpy's answer on the whole: the executor merges cached rows' states with a pass's, and
shards' states are merged the same way."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diagql.engine.aggregates import ArgmaxState, MaxState, MeanState

N_ITEMS, N_NEURONS = 257, 13


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def values(request) -> torch.Tensor:
    rng = np.random.default_rng(7)
    data = rng.normal(size=(N_ITEMS, N_NEURONS)) * rng.uniform(0.1, 10, size=N_NEURONS)
    data[5, 3] = data[5].max() + 1  # ties for the maximum: the lower neuron wins
    data[5, 8] = data[5, 3]
    return torch.from_numpy(data).to(request.param)


def reduce(state, values: torch.Tensor, batch: int):
    for start in range(0, len(values), batch):
        assert state.update(values[start:start + batch])
    return state


# Splits: in the middle, uneven, one part empty, and into more than two shards.
SPLITS = [[128], [1, 200], [0], [N_ITEMS], [17, 18, 100, 256]]


@pytest.mark.parametrize("cuts", SPLITS, ids=[str(c) for c in SPLITS])
@pytest.mark.parametrize("make", [lambda: MeanState(N_NEURONS), lambda: MeanState(N_NEURONS, False),
                                  lambda: MaxState(N_NEURONS), lambda: ArgmaxState(N_NEURONS)],
                         ids=["mean", "mean-no-spread", "max", "argmax"])
def test_merge_over_a_split_equals_the_state_over_the_whole(values, cuts, make):
    parts = np.split(np.arange(N_ITEMS), cuts)
    states = [reduce(make(), values[part], batch=50) for part in parts]
    merged = states[0]
    for other in states[1:]:
        assert merged.merge(other) is merged
    whole = reduce(make(), values, batch=64)
    truth = values.to(torch.float64).numpy()

    assert merged.count == whole.count == N_ITEMS
    if isinstance(merged, MeanState):
        np.testing.assert_allclose(merged.finalize(), truth.mean(axis=0), rtol=1e-12, atol=1e-12)
        if merged.sumsq is not None:
            np.testing.assert_allclose(merged.sumsq.numpy(), (truth ** 2).sum(axis=0), rtol=1e-12)
        else:
            assert whole.sumsq is None
    elif isinstance(merged, MaxState):
        np.testing.assert_array_equal(merged.finalize(), truth.max(axis=0))
    else:
        expected = np.bincount(truth.argmax(axis=1), minlength=N_NEURONS) / N_ITEMS
        np.testing.assert_array_equal(merged.finalize(), expected)
    np.testing.assert_allclose(merged.finalize(), whole.finalize(), rtol=1e-12, atol=1e-12)


def test_merging_an_empty_state_changes_nothing(values):
    state = reduce(MeanState(N_NEURONS), values, batch=100)
    before = state.finalize().copy()
    state.merge(MeanState(N_NEURONS))
    assert state.count == N_ITEMS
    np.testing.assert_array_equal(state.finalize(), before)
    maximum = MaxState(N_NEURONS).merge(reduce(MaxState(N_NEURONS), values, batch=100))
    np.testing.assert_array_equal(maximum.finalize(), values.to(torch.float64).numpy().max(axis=0))
