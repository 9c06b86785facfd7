"""VAS and the explicable boundary tree, checked against their definitions on small data whose
answer is known: losses and trees are recomputed here with plain numpy, independently."""
from __future__ import annotations

import numpy as np
import pytest

from diagql.errors import BindError
from diagql.samplers.base import SampleData
from diagql.samplers.ebtree import EBTreeSampler
from diagql.samplers.vas import VASSampler


def standardized(latents: np.ndarray) -> np.ndarray:
    X = np.asarray(latents, dtype=np.float64)
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    return (X - X.mean(axis=0)) / scale


def vas_loss(X: np.ndarray, indices, eps: float) -> float:
    """Σ over unordered pairs of the sample of exp(−‖a − b‖² / ε²)."""
    S = X[np.asarray(indices)]
    sq = ((S[:, None, :] - S[None, :, :]) ** 2).sum(axis=-1)
    kernel = np.exp(-sq / eps**2)
    return float((kernel.sum() - np.trace(kernel)) / 2)


def blobs(sizes, dim=8, spread=0.3, seed=0, distance=10.0):
    """Well-separated Gaussian clusters; labels = predictions = cluster."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), dim))
    centers *= distance / np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    X = centers[labels] + rng.normal(scale=spread, size=(len(labels), dim))
    return SampleData(X.astype(np.float32), labels, labels.copy(), len(sizes))


def noisy(n=400, k=4, dim=6, flip=0.1, seed=0):
    """Overlapping clusters whose predictions disagree with the cluster on a fraction of items."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    X = rng.normal(size=(k, dim))[labels] * 2 + rng.normal(size=(n, dim))
    predictions = labels.copy()
    flipped = rng.random(n) < flip
    predictions[flipped] = rng.integers(0, k, flipped.sum())
    return SampleData(X.astype(np.float32), labels, predictions, k)


# ---------------------------------------------------------------- VAS


@pytest.mark.parametrize("size, expected", [(0.1, 40), (1, 1), (37, 37), (400, 400), (1.0, 400)])
def test_vas_size_is_exact(size, expected):
    indices = VASSampler(size, random_state=0).fit(noisy()).indices_
    assert len(indices) == expected == len(np.unique(indices))
    assert indices.min() >= 0 and indices.max() < 400


def test_vas_is_deterministic_per_seed_and_seeds_differ():
    data = noisy()
    first = VASSampler(0.1, random_state=3).fit(data).indices_
    again = VASSampler(0.1, random_state=3).fit(data).indices_
    other = VASSampler(0.1, random_state=4).fit(data).indices_
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_vas_loss_is_lower_than_random_samples():
    data = blobs([300, 200, 100, 50, 50])
    X = standardized(data.latents)
    sampler = VASSampler(30, random_state=0).fit(data)
    ours = vas_loss(X, sampler.indices_, sampler.bandwidth_)
    assert ours == pytest.approx(sampler.loss_, rel=1e-9)
    rng = np.random.default_rng(1)
    randoms = [vas_loss(X, rng.choice(len(X), 30, replace=False), sampler.bandwidth_)
               for _ in range(20)]
    assert ours < min(randoms)


def test_vas_covers_every_well_separated_cluster():
    # One cluster holds 1% of the data: a random sample of 20 misses it most of the time.
    sizes = [400, 300, 200, 90, 10]
    data = blobs(sizes, seed=2)
    for seed in range(3):
        chosen = VASSampler(20, random_state=seed).fit(data).indices_
        counts = np.bincount(data.labels[chosen], minlength=len(sizes))
        assert (counts >= 1).all(), counts
        assert counts.max() - counts.min() <= 2, counts  # the kernel spreads items evenly


def test_vas_interchange_never_increases_the_loss():
    data = noisy(seed=5)
    X = standardized(data.latents)
    for eps in (None, 0.5, 3.0):
        sampler = VASSampler(25, bandwidth=eps, random_state=1).fit(data)
        assert len(sampler.initial_indices_) == 25
        start = vas_loss(X, sampler.initial_indices_, sampler.bandwidth_)
        end = vas_loss(X, sampler.indices_, sampler.bandwidth_)
        assert end <= start + 1e-9
        assert end < start  # on 400 items some interchange happens


def test_vas_matches_a_brute_force_interchange():
    """Add each streamed item, then drop whichever item's removal leaves the lowest loss."""
    data = noisy(n=80, seed=7)
    X = standardized(data.latents)
    eps, n, seed = 1.5, 9, 11
    order = np.random.default_rng(seed).permutation(len(X))
    sample = list(order[:n])
    for t in order[n:]:
        expanded = sample + [t]
        losses = [vas_loss(X, expanded[:i] + expanded[i + 1:], eps) for i in range(n + 1)]
        del expanded[int(np.argmin(losses))]
        sample = expanded
    fitted = VASSampler(n, bandwidth=eps, random_state=seed).fit(data)
    np.testing.assert_array_equal(fitted.indices_, np.sort(sample))


def test_vas_default_bandwidth_scales_with_the_data():
    data = noisy()
    bandwidth = VASSampler(0.1, random_state=0).fit(data).bandwidth_
    X = standardized(data.latents)
    distances = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))[np.triu_indices(len(X), 1)]
    assert 0.3 * np.median(distances) < bandwidth < 0.7 * np.median(distances)


@pytest.mark.parametrize("bad", [-1.0, 0, 0.0, float("nan"), float("inf"), "wide", True])
def test_vas_rejects_a_bad_bandwidth(bad):
    with pytest.raises(BindError) as exc:
        VASSampler(0.1, bandwidth=bad).validate(100)
    assert exc.value.param == "bandwidth"


def test_vas_parameters_are_listed_and_kept():
    assert [p.name for p in VASSampler.params()] == ["size", "bandwidth", "random_state"]
    assert VASSampler(0.05, bandwidth=2.0, random_state=1).spec() == \
        "vas(0.05, bandwidth=2.0, random_state=1)"


# ---------------------------------------------------------------- EB tree


def reference_tree(X: np.ndarray, predictions, order, max_children=None):
    """Mathy et al.'s boundary tree, written plainly: lists of nodes, parents and children."""
    nodes, parent, children = [order[0]], [-1], [[]]
    for item in order[1:]:
        node = descend(X, nodes, children, X[item], max_children)
        if predictions[nodes[node]] != predictions[item]:
            nodes.append(item)
            parent.append(node)
            children.append([])
            children[node].append(len(nodes) - 1)
    return nodes, parent, children


def descend(X, nodes, children, x, max_children=None):
    node = 0
    while True:
        candidates = list(children[node])
        if max_children is None or len(candidates) < max_children:
            candidates = [node] + candidates  # first, so a tie keeps the query at the node
        distances = [((X[nodes[c]] - x) ** 2).sum() for c in candidates]
        nearest = candidates[int(np.argmin(distances))]
        if nearest == node:
            return node
        node = nearest


@pytest.mark.parametrize("max_children", [None, 2, 3])
def test_ebtree_matches_the_plain_boundary_tree(max_children):
    data = noisy(seed=3)
    X = standardized(data.latents)
    fitted = EBTreeSampler(max_children=max_children, random_state=5).fit(data)
    order = np.random.default_rng(5).permutation(len(X))
    nodes, parent, children = reference_tree(X, data.predictions, order, max_children)
    np.testing.assert_array_equal(fitted.nodes_, nodes)
    np.testing.assert_array_equal(fitted.parent_, parent)
    np.testing.assert_array_equal(fitted.indices_, np.sort(nodes))
    if max_children is not None:
        assert max(len(c) for c in children) <= max_children
    # Descending the final tree: the fitted tree and the plain one agree item by item.
    ends = [descend(X, nodes, children, x, max_children) for x in X]
    np.testing.assert_array_equal(fitted.apply(data.latents), ends)


def test_ebtree_root_is_the_first_item_and_edges_cross_the_boundary():
    data = noisy(seed=4)
    fitted = EBTreeSampler(random_state=9).fit(data)
    assert fitted.nodes_[0] == np.random.default_rng(9).permutation(len(data))[0]
    assert fitted.parent_[0] == -1
    later = np.arange(1, len(fitted.nodes_))
    assert ((fitted.parent_[1:] >= 0) & (fitted.parent_[1:] < later)).all()
    # A node joins the tree only under a node the model labels differently.
    child, parent = fitted.nodes_[1:], fitted.nodes_[fitted.parent_[1:]]
    assert (data.predictions[child] != data.predictions[parent]).all()
    assert len(np.unique(fitted.nodes_)) == len(fitted.nodes_)
    np.testing.assert_array_equal(fitted.node_predictions_, data.predictions[fitted.nodes_])


def test_ebtree_on_two_separated_blobs_is_tiny_and_classifies_every_item():
    data = blobs([300, 300], dim=5, seed=1)
    for seed in range(4):
        fitted = EBTreeSampler(random_state=seed).fit(data)
        assert 2 <= len(fitted.indices_) <= 4
        assert set(data.predictions[fitted.indices_]) == {0, 1}
        reached = fitted.node_predictions_[fitted.apply(data.latents)]
        np.testing.assert_array_equal(reached, data.predictions)


def test_ebtree_nodes_lie_near_a_linear_boundary():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(2000, 2))
    predictions = (X[:, 0] > 0).astype(np.int64)
    data = SampleData(X.astype(np.float32), predictions, predictions, 2)
    fitted = EBTreeSampler(random_state=0).fit(data)
    assert len(fitted.indices_) < 200
    # Uniform data has median |x| = 0.5; the tree's nodes crowd the line x = 0.
    assert np.median(np.abs(X[fitted.nodes_[1:], 0])) < 0.15
    reached = fitted.node_predictions_[fitted.apply(X)]
    assert (reached == predictions).mean() > 0.97


def test_ebtree_is_deterministic_per_seed():
    data = noisy(seed=6)
    first = EBTreeSampler(random_state=2).fit(data)
    again = EBTreeSampler(random_state=2).fit(data)
    other = EBTreeSampler(random_state=3).fit(data)
    np.testing.assert_array_equal(first.nodes_, again.nodes_)
    np.testing.assert_array_equal(first.parent_, again.parent_)
    assert not np.array_equal(first.nodes_, other.nodes_)


def test_ebtree_with_unanimous_predictions_is_a_single_node():
    data = noisy()
    unanimous = SampleData(data.latents, data.labels, np.full(len(data), 2), data.n_classes)
    fitted = EBTreeSampler(random_state=0).fit(unanimous)
    assert len(fitted.indices_) == 1
    assert fitted.indices_[0] == np.random.default_rng(0).permutation(len(data))[0]


def test_ebtree_has_no_size():
    assert [p.name for p in EBTreeSampler.params()] == ["max_children", "random_state"]
    assert EBTreeSampler(random_state=0).validate(100) is None
    assert EBTreeSampler(max_children=4, random_state=0).spec() == \
        "ebtree(max_children=4, random_state=0)"


@pytest.mark.parametrize("bad", [0, 1, -3, 2.5, "many", True])
def test_ebtree_rejects_bad_max_children(bad):
    with pytest.raises(BindError) as exc:
        EBTreeSampler(max_children=bad).validate(100)
    assert exc.value.param == "max_children"
