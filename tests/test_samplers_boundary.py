"""The latent-space samplers against their definitions (paper IV; docs/ARCHITECTURE.md, "Samplers and metrics"), on
Gaussian blobs where the answer is known: well-separated classes plus a few planted items halfway
between two class centres, which any boundary-seeking sampler must find first."""
from __future__ import annotations

import numpy as np
import pytest

from diagql.errors import BindError, ExecutionError
from diagql.samplers.base import SampleData
from diagql.samplers.boundary import log_likelihood_ratio, two_ended
from diagql.samplers.gmm import GMMSampler
from diagql.samplers.latentgrid import LatentGridSampler
from diagql.samplers.maxmargin import (
    INTERCEPT_SCALING,
    MaxMarginSampler,
    _stratified_folds,
    svm_log_proba,
)
from diagql.samplers.weighted import WeightedSampler

SAMPLERS = (MaxMarginSampler, GMMSampler, LatentGridSampler, WeightedSampler)
N_CLASSES, PER_CLASS, DIMS = 4, 250, 6
PLANTED_PAIRS = ((0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 3))


def blobs(seed=0):
    """SampleData of 4 blobs in 6 dims, then 6 planted items at midpoints between two centres
    (labelled with the first), and the planted indices. Predictions: the labels, with the
    planted items and 2% of the rest flipped."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_CLASSES, DIMS)) * 4
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    latents = centres[labels] + rng.normal(size=(len(labels), DIMS))
    planted = np.array([(centres[a] + centres[b]) / 2 + rng.normal(size=DIMS) * 0.05
                        for a, b in PLANTED_PAIRS])
    latents = np.vstack([latents, planted]).astype(np.float32)
    labels = np.concatenate([labels, [a for a, _ in PLANTED_PAIRS]])
    predictions = labels.copy()
    flip = rng.random(len(labels)) < 0.02
    flip[-len(PLANTED_PAIRS):] = True
    predictions[flip] = (labels[flip] + 1) % N_CLASSES
    planted_at = np.arange(len(labels) - len(PLANTED_PAIRS), len(labels))
    return SampleData(latents, labels, predictions, N_CLASSES), planted_at


@pytest.fixture(scope="module")
def data():
    return blobs()[0]


@pytest.fixture(scope="module")
def planted():
    return blobs()[1]


def assert_two_ended(indices, groups, ratio, j):
    """In every group holding k chosen items: the round(j·k) lowest ratios and the
    k - round(j·k) highest, and nothing else; items of equal ratio may stand in for each other
    (ties are broken at random), so the chosen ratios are compared as a multiset."""
    chosen = np.zeros(len(ratio), dtype=bool)
    chosen[indices] = True
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        k = int(chosen[members].sum())
        low = round(j * k)
        ranked = np.sort(ratio[members])
        expected = np.sort(np.concatenate([ranked[:low], ranked[len(ranked) - (k - low):]]))
        np.testing.assert_array_equal(np.sort(ratio[members[chosen[members]]]), expected,
                                      err_msg=f"group {g}: k={k}, low={low}")


# --- the shared two-ended selection -----------------------------------------------------------

def test_log_likelihood_ratio_is_own_over_best_rival():
    proba = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    logs = log_likelihood_ratio(np.log(proba), np.array([0, 0]))
    assert logs == pytest.approx(np.log([2.0, 1 / 3]))
    # Far from every boundary the probabilities underflow, the logs stay ordered and finite.
    far = log_likelihood_ratio(np.array([[0.0, -2000.0], [0.0, -3000.0]]), np.array([0, 0]))
    assert far.tolist() == [2000.0, 3000.0]


@pytest.mark.parametrize("j", [0, 0.25, 0.5, 0.7, 1])
def test_two_ended_takes_round_jk_from_the_low_end_and_sums_to_n(j):
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 5, size=400)
    ratio = rng.integers(0, 30, size=400).astype(float)  # many ties: broken at random
    chosen = two_ended(groups, ratio, 57, j, np.random.default_rng(0))
    assert len(chosen) == len(set(chosen.tolist())) == 57
    assert_two_ended(chosen, groups, ratio, j)
    sizes = np.bincount(groups)
    taken = np.bincount(groups[chosen], minlength=5)
    assert np.all(np.abs(taken - 57 * sizes / 400) < 2)  # proportional to group size


def test_two_ended_breaks_ties_at_random():
    """With every ratio equal, each end is a uniform draw, not the first or last indices."""
    groups, ratio = np.zeros(100, dtype=int), np.zeros(100)
    counts = np.zeros(100)
    for seed in range(400):
        chosen = two_ended(groups, ratio, 10, 0.5, np.random.default_rng(seed))
        assert len(set(chosen.tolist())) == 10
        counts[chosen] += 1
    assert counts[:5].max() < 100 and counts[-5:].max() < 100  # by index: 400 each
    assert counts.min() > 10 and counts.max() < 80  # about 40 each


def test_two_ended_never_asks_a_group_for_more_than_it_has():
    groups = np.array([0] * 3 + [1] * 97)
    chosen = two_ended(groups, np.arange(100.0), 100, 0.7, np.random.default_rng(0))
    assert sorted(chosen.tolist()) == list(range(100))


# --- maxmargin ----------------------------------------------------------------------------------

def svm_space(latents):
    """The maxmargin space of latents no wider than FIT_DIMS: standardised per dimension."""
    X = np.asarray(latents, dtype=np.float64)
    return ((X - X.mean(axis=0)) / X.std(axis=0)).astype(np.float32)


def two_class(data):
    keep = data.labels < 2
    return SampleData(data.latents[keep], data.labels[keep], data.predictions[keep] % 2, 2)


@pytest.mark.parametrize("classes", [N_CLASSES, 2])
@pytest.mark.parametrize("space, intercept_scaling", [("raw", 1.0), ("standardised", 10.0)])
def test_maxmargin_probabilities_are_calibrated_linear_svc(data, classes, space,
                                                           intercept_scaling):
    """The fast solver gives sklearn's CalibratedClassifierCV(LinearSVC(), cv=3) answer, also
    as the samplers call it (standardised latents, a barely regularised intercept)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import LinearSVC

    data = data if classes == N_CLASSES else two_class(data)
    X = data.latents if space == "raw" else svm_space(data.latents)
    reference = CalibratedClassifierCV(LinearSVC(intercept_scaling=intercept_scaling), cv=3)
    expected = reference.fit(X, data.labels).predict_proba(X)
    got = np.exp(svm_log_proba(X, data.labels, data.n_classes,
                               intercept_scaling=intercept_scaling))
    assert got.shape == expected.shape
    assert got.sum(axis=1) == pytest.approx(1)
    assert np.abs(got - expected).max() < 0.01
    assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1))


@pytest.mark.parametrize("classes", [N_CLASSES, 2])
def test_maxmargin_fits_its_classifiers_a_block_at_a_time_to_the_same_answer(
        data, monkeypatch, classes):
    """Blocks of one-vs-rest classifiers (1,000 classes over 50,000 items had held every
    class's items x classes arrays at once) and items' probabilities made a chunk at a time
    give the answer of one block: the classifiers are independent."""
    import diagql.samplers.maxmargin as maxmargin

    data = data if classes == N_CLASSES else two_class(data)
    X = svm_space(data.latents)
    whole = svm_log_proba(X, data.labels, data.n_classes, intercept_scaling=INTERCEPT_SCALING)
    # One classifier a block, and 1,007 // (2 x classes) items a chunk.
    monkeypatch.setattr(maxmargin, "BLOCK_BYTES", 4 * (len(X) + 1))
    blocked = svm_log_proba(X, data.labels, data.n_classes, intercept_scaling=INTERCEPT_SCALING)
    assert np.abs(np.exp(blocked) - np.exp(whole)).max() < 1e-4  # float32 margins: 6e-6
    assert np.array_equal(blocked.argmax(axis=1), whole.argmax(axis=1))


@pytest.mark.parametrize("seed", range(6))
def test_maxmargin_folds_are_sklearns_stratified_kfold(seed):
    """The folds made without importing sklearn are StratifiedKFold(3)'s, for labels in any
    order, classes numbered out of order, and classes of uneven sizes."""
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(seed)
    n, classes = int(rng.integers(9, 400)), int(rng.integers(2, 9))
    labels = rng.permutation(np.concatenate([np.arange(classes).repeat(3),
                                             rng.integers(0, classes, n)])) * 7 - 3
    if seed == 0:
        labels = np.sort(labels)  # the demo's data is sorted by label
    expected = StratifiedKFold(3).split(np.zeros((len(labels), 1)), labels)
    for (train, test), (want_train, want_test) in zip(_stratified_folds(labels, 3), expected,
                                                      strict=True):
        assert np.array_equal(train, want_train) and np.array_equal(test, want_test)


@pytest.mark.parametrize("j", [0, 0.7, 1])
def test_maxmargin_paper_method_is_two_ended_per_predicted_class(data, j):
    sampler = MaxMarginSampler(0.1, j=j, method="paper", random_state=0).fit(data)
    assert len(sampler.indices_) == round(0.1 * len(data))
    assert np.mean(sampler.groups_ == data.labels) > 0.98  # trained on the true labels
    assert_two_ended(sampler.indices_, sampler.groups_, sampler.log_ratio_, j)


@pytest.mark.parametrize("method", ["diagql", "paper"])
def test_maxmargin_with_j_1_picks_the_planted_boundary_items(data, planted, method):
    sampler = MaxMarginSampler(40, j=1, method=method, random_state=0).fit(data)
    assert set(planted.tolist()) <= set(sampler.indices_.tolist())
    if method == "paper":  # j = 0 keeps well away from them (diagql seeds every cell first)
        exemplars = MaxMarginSampler(40, j=0, method=method, random_state=0).fit(data)
        assert not set(planted.tolist()) & set(exemplars.indices_.tolist())


def herded_by_hand(X, candidates, held, target, k):
    """Greedy kernel herding written out: each step adds the candidate that brings the mean of
    the held items and the picks closest to the target."""
    total, count, picks = X[held].sum(axis=0), len(held), []
    free = list(candidates)
    for _ in range(min(k, len(free))):
        gaps = [np.sum(((total + X[c]) / (count + 1) - target) ** 2) for c in free]
        best = free.pop(int(np.argmin(gaps)))
        picks.append(best)
        total, count = total + X[best], count + 1
    return set(picks)


@pytest.mark.parametrize("j", [0, 0.3, 0.7, 1])
def test_maxmargin_default_method_seeds_groups_then_mistakes_then_herds(data, j):
    n = 40
    sampler = MaxMarginSampler(n, j=j, random_state=0).fit(data)
    chosen = set(sampler.indices_.tolist())
    assert len(chosen) == n == len(sampler.indices_)
    # The ratio is the SVM's view of the model's own prediction, grouped by that prediction,
    # the SVM fitted in the standardised latents.
    assert np.array_equal(sampler.groups_, data.predictions)
    X = svm_space(data.latents)
    log_proba = svm_log_proba(X, data.labels, data.n_classes, intercept_scaling=INTERCEPT_SCALING)
    rows = np.arange(len(data))
    rival = log_proba.copy()
    rival[rows, data.predictions] = -np.inf
    ratio = log_proba[rows, data.predictions] - rival.max(axis=1)
    np.testing.assert_allclose(sampler.log_ratio_, ratio)
    assert len(np.unique(ratio)) == len(ratio)  # no ties to break here
    wrong = data.labels != data.predictions
    groups = data.labels * 2 + wrong
    X64 = X.astype(np.float64)
    # 1. per (class, correctness) group: the mistake of lowest ratio, or the correct item
    #    nearest the group's mean; then per (true, predicted) cell its lowest-ratio mistake
    seeds = set()
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if wrong[members[0]]:
            seeds.add(int(members[np.argmin(ratio[members])]))
        else:
            centre = X64[members].mean(axis=0)
            seeds.add(int(members[np.argmin(((X64[members] - centre) ** 2).sum(axis=1))]))
    # ... most boundary first, while the seeds are fewer than round(j·n)
    cells = data.labels * 100 + data.predictions
    firsts = []
    for c in np.unique(cells[wrong]):
        members = np.flatnonzero(cells == c)
        firsts.append(int(members[np.argmin(ratio[members])]))
    firsts = [i for i in sorted(firsts, key=lambda i: ratio[i]) if i not in seeds]
    seeds |= set(firsts[:max(round(j * n) - len(seeds), 0)])
    assert seeds <= chosen
    # 2. then mistakes before correct items, each by lowest ratio, up to round(j·n) in all
    order = np.lexsort((ratio, ~wrong))
    boundary = [int(i) for i in order if int(i) not in seeds][:max(round(j * n) - len(seeds), 0)]
    assert set(boundary) <= chosen
    # 3. the rest: one for every group with items left, the others shared by group size, and
    #    herded so that the mean of each group's items in the sample (its seeds and boundary
    #    items too) tracks the group's mean
    held = seeds | set(boundary)
    rest = chosen - held
    assert len(rest) == n - len(held)
    open_groups = [g for g in np.unique(groups) if not set(np.flatnonzero(groups == g)) <= held]
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        mine = rest & set(members.tolist())
        free = [int(i) for i in members if int(i) not in held]
        if rest:
            assert len(mine) >= min(1, len(free))
        share = 1 + (len(rest) - len(open_groups)) * len(members) / len(data)
        assert abs(len(mine) - share) <= 1 or len(mine) == len(free), (g, len(mine), share)
        if mine:
            already = [int(i) for i in members if int(i) in held]
            target = X64[members].mean(axis=0)
            assert mine == herded_by_hand(X64, free, already, target, len(mine))


def test_maxmargin_with_more_confusion_cells_than_items_keeps_js_share():
    """40 classes whose mistakes fill 566 (true, predicted) cells, a sample of 200: one seed per
    cell had filled it with mistakes whatever j (160 of 200 at j = 0, 0.5 and 1; a 100-class
    model's 5,000-item sample had been 98% mistakes). The cells' seeds now stop at the
    boundary's share: j moves the mistakes' share, and every (class, correctness) group
    keeps its seed."""
    rng = np.random.default_rng(1)
    classes, n = 40, 200
    centres = rng.normal(size=(classes, 8)) * 3
    labels = np.repeat(np.arange(classes), 50)
    latents = (centres[labels] + rng.normal(size=(len(labels), 8))).astype(np.float32)
    wrong = rng.random(len(labels)) < 0.35
    predictions = np.where(wrong, (labels + rng.integers(1, classes, len(labels))) % classes,
                           labels)
    assert len(np.unique((labels * classes + predictions)[wrong])) > 2 * n
    data = SampleData(latents, labels, predictions, classes)
    groups = labels * 2 + wrong
    mistakes = []
    for j in (0, 0.5, 1):
        chosen = MaxMarginSampler(n, j=j, random_state=0).fit(data).indices_
        assert len(set(chosen.tolist())) == n
        assert set(np.unique(groups[chosen])) == set(np.unique(groups))
        mistakes.append(int(wrong[chosen].sum()))
    # j = 0: the incorrect groups' seeds (40) and their exemplars' share; j = 1: mistakes
    # as far as the boundary's share reaches.
    assert mistakes[0] <= n // 2 and mistakes[0] < mistakes[1] < mistakes[2], mistakes


def test_maxmargin_with_fewer_items_than_groups_keeps_js_share():
    """40 classes, each with correct and incorrect items: 80 groups. With n below 80 the first
    n seeds had been the incorrect groups' (every item a mistake at j = 0.3 for n of 1 to 79:
    review RV1); now round(j·n) of them are mistakes, the rest correct groups' typical items."""
    rng = np.random.default_rng(2)
    classes = 40
    centres = rng.normal(size=(classes, 8)) * 3
    labels = np.repeat(np.arange(classes), 30)
    latents = (centres[labels] + rng.normal(size=(len(labels), 8))).astype(np.float32)
    wrong = np.zeros(len(labels), dtype=bool)
    wrong[::30] = wrong[1::30] = True  # two mistakes per class
    predictions = np.where(wrong, (labels + 1) % classes, labels)
    data = SampleData(latents, labels, predictions, classes)
    for n, j, expected in ((1, 0.3, 0), (1, 0.7, 1), (5, 0.3, 2), (30, 0.3, 9), (79, 1.0, 40),
                           (79, 0.0, 39)):
        chosen = MaxMarginSampler(n, j=j, random_state=0).fit(data).indices_
        assert len(set(chosen.tolist())) == n
        assert int(wrong[chosen].sum()) == expected, (n, j)
        # one item per group: no two from the same (class, correctness) group
        assert len(set((labels * 2 + wrong)[chosen].tolist())) == n


def test_maxmargin_default_method_is_deterministic_and_needs_its_name(data):
    a = MaxMarginSampler(30, random_state=1).fit(data).indices_
    b = MaxMarginSampler(30, random_state=1).fit(data).indices_
    assert np.array_equal(a, b)
    with pytest.raises(BindError) as err:
        MaxMarginSampler(30, method="fast").fit(data)
    assert err.value.param == "method"


def test_maxmargin_handles_two_classes(data):
    data = two_class(data)
    sampler = MaxMarginSampler(20, j=0.5, method="paper", random_state=0).fit(data)
    assert len(sampler.indices_) == 20
    assert_two_ended(sampler.indices_, sampler.groups_, sampler.log_ratio_, 0.5)
    assert np.mean(sampler.groups_ == data.labels) > 0.98


def test_maxmargin_absent_classes_get_no_probability(data):
    three = data.labels < 3  # n_classes stays 4: class 3 has no items
    data = SampleData(data.latents[three], data.labels[three], data.predictions[three], 4)
    log_proba = svm_log_proba(data.latents, data.labels, data.n_classes)
    assert np.all(log_proba[:, 3] == -np.inf)
    assert np.exp(log_proba).sum(axis=1) == pytest.approx(1)


def test_maxmargin_copes_with_a_class_too_rare_for_three_folds(data, planted):
    labels = data.labels.copy()
    labels[planted[:2]] = 4  # two items of a fifth class: sklearn's cv=3 would refuse
    rare = SampleData(data.latents, labels, data.predictions, 5)
    sampler = MaxMarginSampler(50, j=1, method="paper", random_state=0).fit(rare)
    assert len(sampler.indices_) == 50
    assert_two_ended(sampler.indices_, sampler.groups_, sampler.log_ratio_, 1)


def test_maxmargin_needs_two_classes(data):
    one = SampleData(data.latents, np.zeros_like(data.labels), data.predictions, N_CLASSES)
    with pytest.raises(ExecutionError, match="two true classes"):
        MaxMarginSampler(10).fit(one)


# --- gmm ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("covariance", ["full", "spherical"])
@pytest.mark.parametrize("j", [0, 0.7, 1])
def test_gmm_is_two_ended_per_component(data, covariance, j):
    sampler = GMMSampler(0.1, j=j, covariance=covariance, random_state=0).fit(data)
    assert len(sampler.indices_) == round(0.1 * len(data))
    assert sampler.mixture_.n_components == N_CLASSES
    assert_two_ended(sampler.indices_, sampler.groups_, sampler.log_ratio_, j)


def test_gmm_components_are_the_blobs(data):
    from sklearn.metrics import adjusted_rand_score

    sampler = GMMSampler(0.1, random_state=0).fit(data)
    assert adjusted_rand_score(data.labels, sampler.groups_) > 0.95


class SubsampledGMM(GMMSampler):
    max_fit_items = 300  # forces the subsampled fit the sampler uses on large data sets


def test_gmm_subsample_is_stratified_by_prediction_and_seeded(data):
    a = SubsampledGMM(0.1, random_state=0).fit(data)
    b = SubsampledGMM(0.1, random_state=0).fit(data)
    c = SubsampledGMM(0.1, random_state=1).fit(data)
    assert np.array_equal(a.indices_, b.indices_)
    assert not np.array_equal(a.indices_, c.indices_)
    assert_two_ended(c.indices_, c.groups_, c.log_ratio_, 0.7)


# --- latentgrid ---------------------------------------------------------------------------------

def cells_by_hand(latents, dims, bins):
    """PCA by SVD (axes signed so the largest loading is positive), quantile bins, cell ids."""
    X = latents.astype(np.float64) - latents.mean(axis=0)
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    vt = vt[:dims] * np.sign(vt[np.arange(dims), np.abs(vt[:dims]).argmax(axis=1)])[:, None]
    Z = X @ vt.T
    ids = [np.digitize(z, np.quantile(z, np.linspace(0, 1, bins + 1)[1:-1])) for z in Z.T]
    return np.ravel_multi_index(ids, (bins,) * dims)


@pytest.mark.parametrize("dims, bins, size", [(5, 2, 0.05), (3, 3, 0.2), (2, 4, 100), (4, 2, 0.9)])
def test_latentgrid_takes_equally_from_every_nonempty_cell(data, dims, bins, size):
    sampler = LatentGridSampler(size, dims=dims, bins=bins, random_state=0).fit(data)
    n = size if isinstance(size, int) else round(size * len(data))
    assert len(sampler.indices_) == n
    cells = cells_by_hand(data.latents, dims, bins)
    keys, sizes = np.unique(cells, return_counts=True)
    taken = np.array([np.isin(np.flatnonzero(cells == key), sampler.indices_).sum()
                      for key in keys])
    # Equal shares: a level L with every cell at min(size, L) or L + 1.
    level = taken.max() - 1 if np.any(taken < np.minimum(sizes, taken.max())) else taken.max()
    assert np.all((taken == np.minimum(sizes, level)) | (taken == level + 1)), (taken, sizes)
    if n >= len(keys):
        assert np.all(taken > 0)


def test_latentgrid_randomness_is_seeded(data):
    a, b, c = (LatentGridSampler(0.1, random_state=s).fit(data) for s in (0, 0, 1))
    assert np.array_equal(a.indices_, b.indices_)
    assert not np.array_equal(a.indices_, c.indices_)


# --- weighted -------------------------------------------------------------------------------------

def test_weighted_weights_are_the_clipped_inverse_ratio(data, planted):
    sampler = WeightedSampler(0.1, random_state=0).fit(data)
    log_proba = svm_log_proba(svm_space(data.latents), data.labels, data.n_classes,
                              intercept_scaling=INTERCEPT_SCALING)
    ratio = np.exp(log_likelihood_ratio(log_proba, log_proba.argmax(axis=1)))
    assert sampler.weights_ == pytest.approx(1 / np.clip(ratio, 1e-6, 1e3))
    assert sampler.weights_[planted].min() > np.median(sampler.weights_)


def test_weighted_prefers_boundary_items_and_is_seeded(data, planted):
    runs = [WeightedSampler(0.05, random_state=s).fit(data).indices_ for s in range(5)]
    assert all(len(r) == round(0.05 * len(data)) for r in runs)
    assert np.array_equal(runs[0], WeightedSampler(0.05, random_state=0).fit(data).indices_)
    assert not np.array_equal(runs[0], runs[1])
    planted_rate = np.mean([np.isin(planted, r).mean() for r in runs])
    assert planted_rate > 0.5  # against 5% for a uniform draw


# --- what every sampler here shares ---------------------------------------------------------------

@pytest.mark.parametrize("cls", SAMPLERS)
@pytest.mark.parametrize("size", [0.05, 0.5, 1.0, 1, 17])
def test_sizes_are_exact(data, cls, size):
    sampler = cls(size, random_state=3).fit(data)
    expected = size if isinstance(size, int) else max(1, round(size * len(data)))
    assert len(sampler.indices_) == len(np.unique(sampler.indices_)) == expected
    assert sampler.indices_.min() >= 0 and sampler.indices_.max() < len(data)


@pytest.mark.parametrize("cls", SAMPLERS)
def test_same_seed_same_sample(data, cls):
    assert np.array_equal(cls(0.1, random_state=7).fit(data).indices_,
                          cls(0.1, random_state=7).fit(data).indices_)


@pytest.mark.parametrize("cls, params, param", [
    (MaxMarginSampler, {"j": 1.5}, "j"),
    (MaxMarginSampler, {"j": -0.1}, "j"),
    (MaxMarginSampler, {"j": "high"}, "j"),
    (GMMSampler, {"j": 1.5}, "j"),
    (GMMSampler, {"j": -0.1}, "j"),
    (GMMSampler, {"covariance": "diag2"}, "covariance"),
    (LatentGridSampler, {"dims": 0}, "dims"),
    (LatentGridSampler, {"dims": 2.5}, "dims"),
    (LatentGridSampler, {"bins": 1}, "bins"),
    (WeightedSampler, {"size": 0}, "size"),
])
def test_bad_parameters_name_the_parameter(data, cls, params, param):
    with pytest.raises(BindError) as exc:
        cls(**params).validate(len(data))
    assert exc.value.param == param
    assert param in str(exc.value)
    with pytest.raises(BindError):
        cls(**params).fit(data)


@pytest.mark.parametrize("cls", SAMPLERS)
def test_parameters_are_stored_unchanged(cls):
    params = {p.name: p.default for p in cls.params()}
    sampler = cls(**params)
    assert sampler.get_params() == params
    assert cls.description and "\n" not in cls.description
    assert all(p.domain for p in cls.params())


def test_the_svm_is_fitted_once_for_every_size_j_and_seed(monkeypatch):
    """maxmargin and weighted fitted the same SVM again for each size, j and seed (EVALUATE's
    six draws at 200,000 items: six fits of 1.7 s); the kept fit draws what a fresh one does."""
    from diagql.samplers import maxmargin

    data, _ = blobs(3)
    fits = []
    monkeypatch.setattr(maxmargin, "svm_log_proba",
                        lambda *a, **k: fits.append(1) or svm_log_proba(*a, **k))
    maxmargin._LAST_FIT.clear()
    calls = [(MaxMarginSampler, dict(size=0.05)), (MaxMarginSampler, dict(size=0.1, j=0.4)),
             (WeightedSampler, dict(size=0.05, random_state=1)),
             (MaxMarginSampler, dict(size=0.1, j=0.4, random_state=7))]
    kept = [cls(**kwargs).fit(data).indices_ for cls, kwargs in calls]
    assert len(fits) == 1
    for (cls, kwargs), drawn in zip(calls, kept):
        maxmargin._LAST_FIT.clear()
        np.testing.assert_array_equal(cls(**kwargs).fit(data).indices_, drawn)


def test_two_ended_samplers_say_their_seed_only_breaks_ties(cnn, digits):
    """maxmargin and gmm take each group's two ends of a ratio: two seeds gave the same 200
    items while random_state read as any sampler's (sweep MM3); SHOW SAMPLERS says what it
    does for them, and the samples agree to within ties."""
    import diagql

    db = diagql.connect(cnn, digits, cache_dir=False, progress=False)
    rows = {row[0]: row for row in db.query("SHOW SAMPLERS").rows}
    assert "random_state: a whole number (defaults to SET seed); the items are the two " \
           "ends of a ratio, so it only breaks ties" in rows["maxmargin"][2]
    assert "it starts the mixture's fit and breaks ties" in rows["gmm"][2]
    assert "only breaks ties" not in rows["random"][2]
    one, two = (set(db.sample(f"maxmargin(0.1, random_state={s})").tolist()) for s in (0, 7))
    assert len(one & two) >= 0.9 * len(one)
