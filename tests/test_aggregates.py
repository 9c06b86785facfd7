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


# --- GROUP BY: one groups × neurons state -------------------------------------------------------

N_GROUPS = 6
EMPTY = (3, 5)  # groups no item belongs to


def group_codes() -> np.ndarray:
    codes = np.random.default_rng(11).choice([0, 1, 2, 4], size=N_ITEMS, p=[0.5, 0.3, 0.15, 0.05])
    assert not set(EMPTY) & set(codes.tolist())
    return codes


def reduce_grouped(state, values: torch.Tensor, codes: np.ndarray, batch: int):
    for start in range(0, len(values), batch):
        assert state.update(values[start:start + batch],
                            torch.from_numpy(codes[start:start + batch]))
    return state


GROUPED = [lambda: MeanState(N_NEURONS, groups=N_GROUPS),
           lambda: MeanState(N_NEURONS, False, groups=N_GROUPS),
           lambda: MaxState(N_NEURONS, groups=N_GROUPS),
           lambda: ArgmaxState(N_NEURONS, groups=N_GROUPS)]


@pytest.mark.parametrize("make", GROUPED, ids=["mean", "mean-no-spread", "max", "argmax"])
def test_a_grouped_state_equals_numpy_per_group(values, make):
    codes = group_codes()
    state = reduce_grouped(make(), values, codes, batch=50)
    truth = values.to(torch.float64).numpy()
    for g in range(N_GROUPS):
        rows = truth[codes == g]
        part = state.group(g)
        assert part.count == len(rows)
        if g in EMPTY:
            continue
        if isinstance(part, MeanState):
            np.testing.assert_allclose(part.finalize(), rows.mean(axis=0), rtol=1e-12, atol=1e-12)
            if part.sumsq is not None:
                np.testing.assert_allclose(part.sumsq.numpy(), (rows ** 2).sum(axis=0),
                                           rtol=1e-12)
        elif isinstance(part, MaxState):
            np.testing.assert_array_equal(part.finalize(), rows.max(axis=0))
        else:
            expected = np.bincount(rows.argmax(axis=1), minlength=N_NEURONS) / len(rows)
            np.testing.assert_array_equal(part.finalize(), expected)
    # A group without items holds nothing (the executor leaves it out of the answer).
    for g in EMPTY:
        part = state.group(g)
        if isinstance(part, MeanState):
            assert not part.sum.any()
        elif isinstance(part, ArgmaxState):
            assert not part.counts.any()


@pytest.mark.parametrize("make", GROUPED, ids=["mean", "mean-no-spread", "max", "argmax"])
def test_grouped_states_merge_over_a_split(values, make):
    codes = group_codes()
    merged = reduce_grouped(make(), values[:90], codes[:90], batch=40)
    merged.merge(reduce_grouped(make(), values[90:], codes[90:], batch=64))
    whole = reduce_grouped(make(), values, codes, batch=257)
    for g in range(N_GROUPS):
        if g not in EMPTY:
            np.testing.assert_allclose(merged.group(g).finalize(), whole.group(g).finalize(),
                                       rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", GROUPED + [lambda: MeanState(N_NEURONS), lambda: MaxState(N_NEURONS),
                                            lambda: ArgmaxState(N_NEURONS)],
                         ids=["mean", "mean-no-spread", "max", "argmax", "mean-1", "max-1",
                              "argmax-1"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_batch_with_nan_or_inf_leaves_the_state_as_it_was(values, make, bad):
    codes = torch.from_numpy(group_codes()[:50])
    state = make()
    grouped = isinstance(state.count, torch.Tensor)
    assert state.update(values[:50], codes if grouped else None)
    before = {name: value.clone() for name, value in vars(state).items()
              if isinstance(value, torch.Tensor)}
    spoiled = values[50:100].clone()
    spoiled[7, 2] = bad
    assert not state.update(spoiled, codes if grouped else None)
    for name, value in before.items():
        assert torch.equal(getattr(state, name), value), name


@pytest.mark.parametrize("n, width", [(300, 5_000), (90, 70_000)], ids=["5k", "70k"])
@pytest.mark.parametrize("grouped", [False, True], ids=["one", "grouped"])
def test_covariate_sums_of_wide_batches_equal_numpy(grouped, n, width):
    """A batch wider than one upcast piece (1 MB of float64: 26 rows of 5,000 neurons; at
    70,000 neurons pieces of the 4 rows' minimum) sums its covariates piece by piece; the
    sums are numpy's zᵀy, zᵀz, Σz over the whole (per group), and a batch with NaN adds
    nothing to them."""
    rng = np.random.default_rng(3)
    p = 4
    values = torch.from_numpy(rng.normal(size=(n, width)).astype(np.float32))
    z = rng.normal(size=(n, p))
    codes = rng.integers(0, 3, size=n)
    state = MeanState(width, groups=3 if grouped else None, covariates=p)
    for start in range(0, n, 128 if n > 128 else 30):
        stop = start + (128 if n > 128 else 30)
        assert state.update(values[start:stop],
                            torch.from_numpy(codes[start:stop]) if grouped else None,
                            torch.from_numpy(z[start:stop]))
    spoiled = values[:40].clone()
    spoiled[33, width - 1] = np.nan
    assert not state.update(spoiled, torch.from_numpy(codes[:40]) if grouped else None,
                            torch.from_numpy(z[:40]))
    Y = values.numpy().astype(np.float64)
    for g in range(3) if grouped else [None]:
        rows = np.ones(n, bool) if g is None else codes == g
        part = state if g is None else state.group(g)
        cross = part.fit_cross  # every row is a fit row: no ``fit`` given
        assert part.fit_count == rows.sum()
        np.testing.assert_allclose(part.fit_sum.numpy(), Y[rows].sum(axis=0), rtol=1e-12)
        np.testing.assert_allclose(cross.zy.numpy(), z[rows].T @ Y[rows], rtol=1e-12, atol=1e-11)
        np.testing.assert_allclose(cross.zz.numpy(), z[rows].T @ z[rows], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cross.z.numpy(), z[rows].sum(axis=0), rtol=1e-12, atol=1e-12)
