"""SIMILARITY: linear CKA against independent numpy implementations (the Gram-matrix form over
small N, Song et al.'s unbiased HSIC written out, delete-one by recomputation), its invariances,
and the statement end to end on a small model whose activations plain torch hooks collect."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.engine import cka, similarity
from diagql.errors import BindError, ExecutionError, ParseError

# --- independent truth ------------------------------------------------------------------------


def gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s linear CKA in its Gram form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))
    with K = XcXcᵀ, the rows centred first (HKH with H = I - 11ᵀ/n)."""
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    k, ell = xc @ xc.T, yc @ yc.T
    return float(np.sum(k * ell) / np.sqrt(np.sum(k * k) * np.sum(ell * ell)))


def unbiased_hsic(k: np.ndarray, ell: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, as printed."""
    n = len(k)
    k, ell = k.copy(), ell.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(ell, 0)
    one = np.ones(n)
    return float((np.trace(k @ ell) + (one @ k @ one) * (one @ ell @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * one @ k @ ell @ one) / (n * (n - 3)))


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)  # only for digits: the estimator ignores it
    k, ell = xc @ xc.T, yc @ yc.T
    return unbiased_hsic(k, ell) / np.sqrt(unbiased_hsic(k, k) * unbiased_hsic(ell, ell))


def pair(n: int, dx: int, dy: int, seed: int = 0, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dx))
    y = x @ rng.normal(size=(dx, dy)) + 2.0 * rng.normal(size=(n, dy))
    return x + offset, y - offset / 2


def fed(state, x, y, batch: int = 7):
    for start in range(0, len(x), batch):
        assert state.update(torch.from_numpy(x[start:start + batch]),
                            torch.from_numpy(y[start:start + batch]))
    return state


# --- the states ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, dx, dy, offset", [(40, 5, 9, 0.0), (25, 60, 8, 0.0),
                                               (50, 6, 4, 1e3)])
def test_exact_cka_matches_the_gram_form(n, dx, dy, offset):
    x, y = pair(n, dx, dy, offset=offset)
    truth = gram_cka(x, y)
    moments = fed(cka.MomentState([dx, dy]), x, y)
    rows = fed(cka.RowState([dx, dy]), x, y)
    assert abs(moments.matrix()[0, 1] - truth) < 1e-10
    assert abs(rows.matrix()[0, 1] - truth) < 1e-10
    # Shards fed apart and merged, as another pass or a Ray worker would feed them.
    left, right = fed(cka.MomentState([dx, dy]), x[:11], y[:11]), \
        fed(cka.MomentState([dx, dy]), x[11:], y[11:])
    assert abs(left.merge(right).matrix()[0, 1] - truth) < 1e-10


def test_a_large_mean_costs_no_precision():
    """Centred per batch and merged by Chan's update: 1e3 offsets leave the value intact,
    where XᵀX − n·μμᵀ would cancel about six of the sixteen digits."""
    x, y = pair(60, 4, 3, seed=3)
    shifted = fed(cka.MomentState([4, 3]), x + 1e3, y - 5e2, batch=5).matrix()[0, 1]
    assert abs(shifted - gram_cka(x, y)) < 1e-10


def test_invariant_under_rotation_and_isotropic_scaling_and_one_with_itself():
    x, y = pair(30, 6, 5, seed=1)
    rotation, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(6, 6)))
    base = fed(cka.MomentState([6, 5]), x, y).matrix()[0, 1]
    turned = fed(cka.MomentState([6, 5]), 3.7 * x @ rotation, 0.01 * y).matrix()[0, 1]
    assert abs(base - turned) < 1e-10
    matrix = fed(cka.MomentState([6, 6]), x, x @ rotation).matrix()
    assert np.allclose(matrix, 1.0, atol=1e-12, rtol=0)


def test_a_batch_with_nan_is_refused_and_leaves_the_state_as_it_was():
    x, y = pair(10, 3, 3)
    state = fed(cka.MomentState([3, 3]), x, y)
    before = state.matrix()
    bad = torch.from_numpy(y[:2].copy())
    bad[0, 1] = float("nan")
    assert not state.update(torch.from_numpy(x[:2]), bad)
    assert state.count == 10 and np.array_equal(state.matrix(), before)


def test_a_constant_layer_has_an_undefined_cka():
    x, _ = pair(10, 3, 3)
    state = fed(cka.MomentState([3, 2]), x, np.ones((10, 2)))
    assert np.isnan(state.matrix()[0, 1]) and state.matrix()[0, 0] == 1.0


@pytest.mark.parametrize("n, dx, dy", [(12, 30, 40), (80, 5, 7), (15, 40, 3)])
def test_debiased_cka_and_its_jackknife_match_recomputation(n, dx, dy):
    """Over an infinite population (population=None), Gram form (n ≤ width), feature form
    (n > width) and the two mixed: the estimate equals Song et al.'s unbiased HSIC written out,
    and the interval equals t · the jackknife standard error from n explicit delete-one
    recomputations."""
    from scipy.special import stdtrit

    x, y = pair(n, dx, dy, seed=n)
    rows = fed(cka.RowState([dx, dy]), x, y).rows()
    value, low, high = cka.debiased_matrix(rows, population=None)
    truth = debiased_cka(x, y)
    assert abs(value[0, 1] - truth) < 1e-10
    left_out = np.array([debiased_cka(np.delete(x, i, 0), np.delete(y, i, 0)) for i in range(n)])
    se = np.sqrt((n - 1) / n * np.sum((left_out - left_out.mean()) ** 2))
    half = stdtrit(n - 1, 0.975) * se
    assert abs(low[0, 1] - max(truth - half, 0)) < 1e-10
    assert abs(high[0, 1] - min(truth + half, 1)) < 1e-10
    assert value[0, 0] == value[1, 1] == 1.0


def population_hsic(x: np.ndarray, y: np.ndarray, population: int) -> float:
    """An estimate of the plain HSIC, tr(KHLH) / N², of the N = ``population`` items that the
    sample (x, y) was drawn from uniformly without replacement, written out over index tuples:
    tr(KHLH) / N² is the mean over all N⁴ tuples (i, j, p, q) of h = K_ij L_ij − 2 K_ij L_iq
    + K_ij L_pq; the tuples whose indices coincide in the same pattern number (N)_m (m distinct
    indices), and the sample's mean of h over its tuples of a pattern is unbiased for the
    population's. O(n⁴): for a few items only."""
    n = len(x)
    k, ell = x @ x.T, y @ y.T
    means: dict[tuple, list] = {}
    for i, j, p, q in np.ndindex(n, n, n, n):
        labels: dict[int, int] = {}
        pattern = tuple(labels.setdefault(v, len(labels)) for v in (i, j, p, q))
        means.setdefault(pattern, []).append(k[i, j] * ell[i, j] - 2 * k[i, j] * ell[i, q]
                                             + k[i, j] * ell[p, q])
    total = 0.0
    for pattern, values in means.items():
        m = len(set(pattern))
        total += np.prod([population - t for t in range(m)]) * np.mean(values)
    return total / population ** 4


def population_cka(x, y, population):
    return population_hsic(x, y, population) / np.sqrt(
        population_hsic(x, x, population) * population_hsic(y, y, population))


@pytest.mark.parametrize("n, dx, dy", [(6, 9, 8), (7, 2, 3)])
def test_a_samples_cka_estimates_its_populations_plain_cka(n, dx, dy):
    """The estimate targets the exact answer, the plain CKA over the N matching items (Song et
    al.'s targets an infinite population: at n near N it kept the gap, and its interval shrank
    around it): it equals the tuple-by-tuple estimate written out (Gram and feature forms), its
    jackknife is n recomputations of it, each HSIC averages to the population's over every
    possible sample, and a sample of all N items gives the plain CKA."""
    from scipy.special import stdtrit

    population = 11
    x, y = pair(n, dx, dy, seed=3, offset=4.0)
    rows = fed(cka.RowState([dx, dy]), x, y).rows()
    value, low, high = cka.debiased_matrix(rows, population=population)
    truth = population_cka(x, y, population)
    assert abs(value[0, 1] - np.clip(truth, 0, 1)) < 1e-10
    left_out = np.array([population_cka(np.delete(x, i, 0), np.delete(y, i, 0), population)
                         for i in range(n)])
    se = np.sqrt((n - 1) / n * np.sum((left_out - left_out.mean()) ** 2)
                 * (population - n) / (population - 1))
    half = stdtrit(n - 1, 0.975) * se
    assert abs(low[0, 1] - np.clip(truth - half, 0, 1)) < 1e-10
    assert abs(high[0, 1] - np.clip(truth + half, 0, 1)) < 1e-10
    # Unbiased: over every sample of 5 of 8 items, the mean estimate is the population's.
    import itertools

    xs, ys = pair(8, dx, dy, seed=4)
    xc, yc = xs - xs.mean(axis=0), ys - ys.mean(axis=0)
    plain = np.sum((xc @ xc.T) * (yc @ yc.T)) / 8 ** 2
    estimates = [population_hsic(xs[list(pick)], ys[list(pick)], 8)
                 for pick in itertools.combinations(range(8), 5)]
    assert np.mean(estimates) == pytest.approx(plain, rel=1e-9)
    # The whole population: its plain CKA.
    whole, low, high = cka.debiased_matrix([xc, yc], population=8)
    assert whole[0, 1] == pytest.approx(gram_cka(xs, ys), abs=1e-12)
    assert low[0, 1] == pytest.approx(whole[0, 1], abs=1e-12) == high[0, 1]


def test_debiased_cka_is_nearer_the_full_data_cka_than_the_plain_one_on_small_samples():
    """The reason for the estimator: over many small uniform samples of a weakly related
    pair, the plain CKA of the sample is biased upward, the debiased one far less."""
    x, y = pair(4000, 50, 50, seed=5)
    y = y + 6.0 * np.random.default_rng(6).normal(size=y.shape)
    truth = gram_cka(x[:2000], y[:2000])
    rng = np.random.default_rng(7)
    plain, debiased = [], []
    for _ in range(30):
        pick = rng.choice(2000, 40, replace=False)
        rows = [x[pick] - x[pick].mean(0), y[pick] - y[pick].mean(0)]
        plain.append(cka.plain_matrix(rows)[0, 1])
        debiased.append(cka.debiased_matrix(rows)[0][0, 1])
    assert abs(np.mean(debiased) - truth) < 0.5 * abs(np.mean(plain) - truth)


# --- the statement --------------------------------------------------------------------------------


LAYERS = ("encoder.1", "encoder.3", "head")


@pytest.fixture(scope="module")
def acts(mlp, digits):
    """Every item's output of each layer, by plain torch hooks (float64 numpy)."""
    X, _ = digits
    got = {}
    modules = dict(mlp.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: got.__setitem__(name, out.detach().double().numpy()))
        for name in LAYERS]
    try:
        with torch.no_grad():
            mlp.eval()(X)
    finally:
        for handle in handles:
            handle.remove()
    return got


@pytest.fixture(scope="module")
def db(mlp, digits):
    return diagql.connect(mlp, digits, cache_dir=False, progress=False, batch_size=300)


def test_the_reported_time_holds_the_cka_itself(db, monkeypatch):
    """The caption's time was the pass's alone: a wide layer's Gram, most of the statement's
    time (1.8 s of 2.5 s), was left out, so SIMILARITY read ten times faster than it ran."""
    import time as clock

    for state in (cka.MomentState, cka.RowState):  # whichever holds the rows
        def slow(self, real=state.matrix):
            clock.sleep(0.3)
            return real(self)

        monkeypatch.setattr(state, "matrix", slow)
    assert db.query("SIMILARITY encoder.1, head").timings["query"] >= 0.3


def test_exact_value_and_matrix_over_all_items(db, acts):
    result = db.query("SIMILARITY encoder.1, head")
    assert result.kind == "similarity" and result.n_items == 1797
    assert abs(result.value - gram_cka(acts["encoder.1"], acts["head"])) < 1e-10
    before = db.counters["passes"]
    matrix = db.query("SIMILARITY head, encoder.1, encoder.3, head").matrix
    assert db.counters["passes"] == before + 1  # one pass for every layer
    order = ["head", "encoder.1", "encoder.3", "head"]
    truth = np.array([[gram_cka(acts[a], acts[b]) for b in order] for a in order])
    assert np.abs(matrix - truth).max() < 1e-10


def test_where_and_group_by_select_the_items(db, acts, digits):
    labels = digits[1].numpy()
    result = db.query("SIMILARITY encoder.3, head WHERE class IN (3, 8) GROUP BY class")
    assert list(result.groups) == [3, 8]
    for key, group in result.groups.items():
        mine = labels == key
        assert group.n_items == mine.sum()
        assert abs(group.value - gram_cka(acts["encoder.3"][mine], acts["head"][mine])) < 1e-10


def test_a_sample_gives_the_estimated_value_its_interval_and_the_baseline(db, acts):
    result = db.query("SIMILARITY encoder.1, encoder.3 USING SAMPLE random(0.1) WITH BASELINE")
    items = db.sample("random(0.1)")
    x, y = acts["encoder.1"][items], acts["encoder.3"][items]
    assert result.n_items == len(items)
    # The estimator (checked tuple by tuple above) over plain torch's rows of the sampled
    # items, for the 1,797 matching items; near Song et al.'s infinite-population value.
    rows = [x - x.mean(axis=0), y - y.mean(axis=0)]
    assert abs(result.value - cka.debiased_matrix(rows, population=1797)[0][0, 1]) < 1e-10
    assert abs(result.value - debiased_cka(x, y)) < 2e-3
    estimate = result.estimate
    assert estimate.reliable and estimate.n == len(items) and estimate.population == 1797
    assert estimate.ci_low[0, 1] < result.value < estimate.ci_high[0, 1]
    exact = gram_cka(acts["encoder.1"], acts["encoder.3"])
    assert abs(result.baseline.value - exact) < 1e-10
    assert result.metrics["cka_abs_error"] == pytest.approx(abs(result.value - exact), abs=1e-12)


def test_records_carry_an_interval_only_where_the_table_shows_one(db):
    """A stratified sample's interval, which the table refuses (the sampler does not draw
    uniformly), had reached CSV and to_pandas (sweep SY4)."""
    uniform = db.query("SIMILARITY encoder.1, encoder.3 USING SAMPLE random(0.1)").records()
    assert {"ci_low", "ci_high"} <= set(uniform[0])
    result = db.query("SIMILARITY encoder.1, encoder.3 USING SAMPLE stratified(0.1)")
    assert not result.estimate.reliable
    assert not {"ci_low", "ci_high"} & set(result.records()[0])


def test_a_sample_of_every_matching_item_gives_the_exact_cka(db, acts, digits):
    """It had answered the infinite-population estimate with a zero-width interval that missed
    the exact value (0.890566 for 0.890627)."""
    mine = digits[1].numpy() == 3
    result = db.query("SIMILARITY encoder.1, encoder.3 WHERE class = 3 USING SAMPLE random(1.0)")
    exact = gram_cka(acts["encoder.1"][mine], acts["encoder.3"][mine])
    assert result.value == pytest.approx(exact, abs=1e-12)
    assert result.estimate.exact and result.estimate.reliable
    assert "exact, from a sample: it holds every matching item" in str(result)


def test_nan_activations_are_blamed_on_their_layer_alone():
    """Only 'bad' is NaN; the message had named every layer of the statement."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bad, self.head = (torch.nn.Linear(4, 5), torch.nn.Identity(),
                                            torch.nn.Linear(5, 3))

        def forward(self, x):
            h = torch.relu(self.fc(x))
            self.bad(h * float("nan"))
            return self.head(h)

    X, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    conn = diagql.connect(Net(), (X, y), cache_dir=False, progress=False)
    with pytest.raises(ExecutionError) as info:
        conn.query("SIMILARITY fc, head, bad")
    assert info.value.message == ("layer 'bad' has NaN or infinite activations for 30 of 30 "
                                  "items (the first is item 0); CKA with it over them is "
                                  "undefined")


def test_a_non_uniform_sampler_shows_no_interval(db):
    for sampler in ("latentgrid", "stratified"):
        result = db.query(f"SIMILARITY encoder.3, head USING SAMPLE {sampler}(0.1)")
        assert not result.estimate.reliable and "interval" not in str(result).split("\n")[1]
        assert f"no interval: {sampler} does not draw every item with the same probability" \
            in " ".join(str(result).split())
        assert result.estimate.reason.endswith("USING SAMPLE random(0.1) gives an interval, "
                                               "WITH BASELINE the real error")


def test_renderings(db):
    pair_result = db.query("SIMILARITY encoder.3, head USING SAMPLE random(0.2) WITH BASELINE")
    text = str(pair_result)
    assert f"{pair_result.value:.4f}" in text and "95% interval" in text and "|error|" in text
    data = json.loads(diagql.results.render.to_json(pair_result))
    assert data["value"] == pair_result.value and data["layers"] == ["encoder.3", "head"]
    assert data["baseline"]["value"] == pair_result.baseline.value
    (record,) = pair_result.records()
    assert record["layer_x"] == "encoder.3" and record["exact"] == pair_result.baseline.value
    matrix = db.query("SIMILARITY encoder.1, encoder.3, head")
    assert matrix.value is None and len(matrix.records()) == 3
    assert "█" in str(matrix) and "encoder.3" in diagql.results.render.to_html(matrix)


def test_explain(db):
    result = db.query("EXPLAIN SIMILARITY encoder.1, head USING SAMPLE random(0.1) WITH BASELINE")
    steps = [step for step, _ in result.rows]
    assert steps[:3] == ["sample", "filter", "forward"] and "baseline" in steps
    passes = db.counters["passes"]
    rows = dict(db.query("EXPLAIN SIMILARITY encoder.1, encoder.3, head").rows)
    assert db.counters["passes"] == passes  # EXPLAIN runs nothing
    assert rows["measure"].startswith("exact linear CKA of every pair of layers")


@pytest.mark.parametrize("text, error, words", [
    ("SIMILARITY encoder.1, haed", BindError, "did you mean 'head'"),
    ("SIMILARITY encoder.1, head BY kca", BindError, "unknown similarity measure 'kca'"),
    ("SIMILARITY encoder.1, head TOKEN 0", BindError, "applies to sequence layers"),
    ("SIMILARITY head", ParseError, "expected"),
    ("SIMILARITY encoder.1, head USING AUTO", BindError, "not USING AUTO"),
])
def test_mistakes_are_one_line_errors(db, text, error, words):
    with pytest.raises(error) as info:
        db.query(text)
    assert words in info.value.message


def test_a_statement_past_the_memory_limit_is_refused_before_any_pass(db, monkeypatch):
    monkeypatch.setattr(similarity, "MEMORY_LIMIT", 1000)
    passes = db.counters["passes"]
    with pytest.raises(ExecutionError, match="exact CKA here needs"):
        db.query("SIMILARITY encoder.1, head")
    assert db.counters["passes"] == passes


def test_completion_offers_layers_and_measures():
    from prompt_toolkit.document import Document

    from diagql.shell.completion import DiagQLCompleter

    completer = DiagQLCompleter(lambda: [("conv2", "Sequential"), ("fc3", "Linear")])

    def offered(text):
        return [c.text for c in completer.get_completions(Document(text), None)]

    assert offered("SIMILARITY conv2, ") == ["conv2", "fc3"]
    assert offered("SIMILARITY conv2, fc3 BY ") == ["cka"]


def test_a_sample_with_too_few_matching_items_has_no_value_and_scores_the_worst(db, digits):
    result = db.query("SIMILARITY encoder.3, head WHERE class = 3 USING SAMPLE random(10) "
                      "WITH BASELINE")
    assert result.n_items < cka.MIN_ITEMS
    assert result.value is None or np.isnan(result.value)
    assert result.metrics["cka_abs_error"] == 1.0
    assert result.baseline.value > 0
    text = " ".join(str(result).split())
    assert (f"no estimate: {result.n_items} matching sampled item" in text and
            f"needs at least {cka.MIN_ITEMS}" in text) or \
        f"none of its {(digits[1] == 3).sum()} matching items sampled" in text
    assert "(no estimate counts 1)" in text


def test_a_group_with_too_few_sampled_items_is_said_to_have_no_estimate(db):
    """GROUP BY with one class sampled 3 times: its row showed '—' and an error of 1 under a
    line about the others' intervals only."""
    result = db.query("SIMILARITY encoder.3, head GROUP BY class USING SAMPLE random(0.03) "
                      "WITH BASELINE")
    small = [g for g, part in result.groups.items()
             if part.estimate is not None and part.n_items < cka.MIN_ITEMS]
    assert small and len(small) < len(result.groups)
    text = " ".join(str(result).split())
    assert f"no estimate for {len(small)} group" in text
    assert "(no estimate counts 1)" in text


def test_a_non_uniform_samples_small_group_says_why_and_a_layer_with_itself_is_one(db):
    """Under maxmargin a group of under MIN_ITEMS sampled items showed '—' under maxmargin's
    reason alone (sweep SS5), and a layer against itself, as ACROSS CHECKPOINTS pairs the
    final model's, read '—' there too: its CKA is 1 over any items it varies on."""
    result = db.query("SIMILARITY encoder.3, head GROUP BY class USING SAMPLE maxmargin(0.03)")
    small = [g for g, part in result.groups.items() if 2 <= part.n_items < cka.MIN_ITEMS]
    assert small
    text = " ".join(str(result).split())
    assert "no interval: maxmargin does not draw" in text
    assert f"needs at least {cka.MIN_ITEMS}" in text
    itself = db.query("SIMILARITY head, head, encoder.3 GROUP BY class "
                      "USING SAMPLE maxmargin(0.03)")
    for key in small:
        matrix = itself.groups[key].matrix
        np.testing.assert_allclose(np.diag(matrix), 1.0)
        assert matrix[0, 1] == 1.0 and np.isnan(matrix[0, 2])


def test_a_matrix_of_long_layer_names_numbers_its_columns_and_keeps_its_row_labels():
    """Five BERT layers' labels as headers made a 250-column table whose row labels were
    squeezed to nothing (sweep SS5): the columns are headed by the rows' numbers instead."""
    torch.manual_seed(0)
    names = [f"encoder_block_number_{i}_feed_forward_output" for i in range(4)]
    model = nn.Sequential()
    for name in names:
        model.add_module(name, nn.Sequential(nn.Linear(6, 6), nn.Tanh()))
    model.add_module("head", nn.Linear(6, 3))
    X = torch.randn(40, 6)
    db = diagql.connect(model, (X, torch.arange(40) % 3), cache_dir=False, progress=False)
    result = db.query(f"SIMILARITY {', '.join(names)}")
    lines = str(result).splitlines()
    for i, name in enumerate(names):
        row = next(line for line in lines if f"{i + 1} {name}" in line)
        assert row.count("1.000") == 1
    assert max(len(line) for line in lines[1:]) <= 110
    with torch.no_grad():
        first = model[0](X).double().numpy()
        second = model[1](model[0](X)).double().numpy()
    row = next(line for line in lines if f"1 {names[0]}" in line)
    assert f"{gram_cka(first, second):.3f}" in row


def test_one_matching_item_says_why_there_is_no_cka(db):
    """Exact over one item: every layer is constant, CKA undefined; it showed '—' with no word
    why, '1 matching items', and the baseline comparison 'mean |error| nan'."""
    result = db.query("SIMILARITY encoder.1, head WHERE class = 3 GROUP BY predicted")
    singles = [key for key, group in result.groups.items() if group.n_items == 1]
    assert singles, "the digits give class 3 a prediction made once"
    group = result.groups[singles[0]]
    assert np.isnan(group.value)
    assert group.notes == ["one matching item: CKA over it is undefined (NaN)"]
    assert "1 matching item ·" in str(group)
    # Shown with the whole answer, the note names its group.
    assert f"predicted = {singles[0]}: one matching item: CKA over it is undefined" in \
        str(result).replace("\n", " ")
    sampled = db.query("SIMILARITY encoder.1, head WHERE class = 3 GROUP BY predicted USING "
                       "SAMPLE random(1.0) WITH BASELINE")
    assert np.isnan(sampled.groups[singles[0]].metrics["cka_abs_error"])
    # the mean over groups leaves out the group without an exact value
    defined = [g.metrics["cka_abs_error"] for g in sampled.groups.values()
               if not np.isnan(g.baseline.value)]
    assert sampled.metrics["cka_abs_error"] == pytest.approx(np.mean(defined))
    assert "nan" not in str(sampled)
    alone = db.query("SIMILARITY encoder.1, head WHERE class = 3 AND predicted = "
                     f"{singles[0]} USING SAMPLE random(1.0) WITH BASELINE")
    assert "|error| — (the exact CKA is undefined)" in str(alone)
    # Strict JSON: the undefined error is null, in the groups and overall.
    data = json.loads(json.dumps(sampled.to_dict(), allow_nan=False))
    assert None in [group["metrics"]["cka_abs_error"] for group in data["groups"]]


def test_json_of_an_undefined_interval_is_strict_json(db):
    """Three sampled items: no debiased CKA nor interval. The JSON line said NaN there, which
    is not JSON (jq and JSON.parse refuse the line); it says null."""
    result = db.query("SIMILARITY encoder.3, head USING SAMPLE random(3)")
    # Undefined off the diagonal; each layer with itself is 1.
    assert np.isnan(result.estimate.ci_low[0, 1]) and np.isnan(result.estimate.ci_low[1, 0])

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON")

    from diagql.results.render import to_json

    data = json.loads(to_json(result), parse_constant=refuse)
    assert data["estimate"]["ci_low"] == [[1.0, None], [None, 1.0]]
    assert data["value"] is None and data["n_items"] == 3
    # The Python API's dict too (it had held NaN: json.dumps(..., allow_nan=False) raised).
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False)) == data


def test_plot_writes_the_heat_map_and_a_bad_target_is_refused_first(
        db, plots_and_refuses_a_bad_target):
    plots_and_refuses_a_bad_target(db, "SIMILARITY encoder.1, encoder.3, head PLOT '{target}'")


def test_the_heat_maps_image_holds_its_long_labels(tmp_path):
    """Long layer names ("encoder.layers.1.linear1 TOKENS MEAN") spilled off the figure's
    left edge, so two rows read "ENS MEAN" alike: the image is now as large as what is
    drawn."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from diagql.results.plots import draw

    class Long(nn.Module):
        def __init__(self):
            super().__init__()
            self.the_first_encoder_block_with_a_long_name = nn.Linear(4, 6)
            self.the_second_encoder_block_with_a_long_name = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.the_second_encoder_block_with_a_long_name(
                torch.relu(self.the_first_encoder_block_with_a_long_name(x))))

    torch.manual_seed(0)
    db = diagql.connect(Long(), (torch.randn(60, 4), torch.randint(0, 2, (60,))),
                        cache_dir=False, progress=False)
    target = tmp_path / "cka.png"
    result = db.query(f"SIMILARITY the_first_encoder_block_with_a_long_name, "
                      f"the_second_encoder_block_with_a_long_name, head PLOT '{target}'")
    figure = draw(result)
    drawn = figure.get_tightbbox(figure.canvas.get_renderer())  # inches
    height, width = imread(target).shape[:2]
    assert width >= drawn.width * 85 - 2 and height >= drawn.height * 85 - 2


def test_many_groups_heat_maps_wrap_into_rows_and_say_how_many_are_drawn():
    """A hundred groups were a hundred heat maps in one row, an image 15,000 pixels wide."""
    pytest.importorskip("matplotlib")
    from diagql.results.plots import draw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 30))
    db = diagql.connect(model, (torch.randn(900, 4), torch.arange(900) % 30), cache_dir=False,
                        progress=False)
    figure = draw(db.query("SIMILARITY 0, 2 WHERE class < 9 GROUP BY class"))
    maps = [ax for ax in figure.axes if ax.images]
    assert len(maps) == 9 and "groups drawn" not in figure._suptitle.get_text()
    assert len({round(ax.get_position().y0, 3) for ax in maps}) == 2  # rows of six
    figure = draw(db.query("SIMILARITY 0, 2 GROUP BY class"))
    maps = [ax for ax in figure.axes if ax.images]
    assert len(maps) == 24 and "24 of its 30 groups drawn" in figure._suptitle.get_text()
    assert figure.get_figwidth() < 25
    # With a baseline, each sample's map keeps its exact one beside it.
    figure = draw(db.query("SIMILARITY 0, 2 WHERE class < 5 GROUP BY class "
                           "USING SAMPLE random(0.5) WITH BASELINE"))
    titles = [ax.get_title() for ax in figure.axes if ax.images]
    assert titles[:2] == ["class = 0", "class = 0, exact"] and len(titles) == 10


def test_another_models_layers_are_named_with_it_and_read_its_predictions(mlp, cnn, digits,
                                                                         acts):
    """SIMILARITY wide.x, wide.y WHERE incorrect had run over the default model's mistakes and
    been headed CKA(x, y), which reads as the default model's layers."""
    X, y = digits
    db = diagql.connect({"base": cnn, "wide": mlp}, digits, cache_dir=False, progress=False)
    first, second = LAYERS[:2]
    result = db.query(f"SIMILARITY wide.{first}, wide.{second} WHERE incorrect")
    with torch.no_grad():
        wrong = (mlp(X).argmax(1) != y).numpy()
        base_wrong = (cnn(X).argmax(1) != y).numpy()
    assert wrong.sum() != base_wrong.sum()
    assert result.n_items == int(wrong.sum())
    np.testing.assert_allclose(result.value, gram_cka(acts[first][wrong], acts[second][wrong]),
                               rtol=1e-9)
    assert result.labels == [f"wide.{first}", f"wide.{second}"]
    mixed = db.query(f"SIMILARITY wide.{first}, base.8 WHERE incorrect")
    assert mixed.n_items == int(wrong.sum())  # the first layer's model's
    assert "WHERE and GROUP BY read wide's predictions (the first layer's model's)" in mixed.notes


@pytest.mark.parametrize("layers", ["1, 2", "0, 1, 2"])  # a pair's table, a matrix
def test_a_group_the_sample_holds_none_of_is_shown_with_its_matching_items(layers):
    """A sample that draws none of a group's items keeps the group, saying how many match
    (the profile's count), in the pair's table and in the matrix: before, it was left out, or
    read 'no matching items' beside an exact value with a baseline."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3)).eval()
    y = torch.tensor([0] * 57 + [1, 2, 2])
    db = diagql.connect(model, (torch.randn(60, 10), y), cache_dir=False, progress=False)
    result = db.query(f"SIMILARITY {layers} GROUP BY class USING SAMPLE random(30)")
    sampled = np.bincount(y.numpy()[db.sample("random(30)")], minlength=3)
    assert sampled[2] == 0 and set(result.groups) == {0, 1, 2}
    assert result.groups[2].n_items == 0 and result.groups[2].provenance.matching == 2
    assert "none of its 2 matching items sampled" in " ".join(str(result).split())


def test_a_grouped_heat_maps_panels_name_their_classes():
    """The panels read 'class = 0' where the table reads '0 cat'."""
    pytest.importorskip("matplotlib")
    from diagql.results.plots import draw

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    X, y = torch.randn(90, 4), torch.arange(90) % 3
    db = diagql.connect(model, (X, y), classes=["cat", "a&b", "dog"], cache_dir=False,
                        progress=False)
    titles = [ax.get_title() for ax in draw(db.query("SIMILARITY 0, 1 GROUP BY class")).axes]
    assert {"class = 0 cat", "class = 1 a&b", "class = 2 dog"} <= set(titles)


def test_an_exact_similaritys_rows_are_freed_with_its_answer(monkeypatch):
    """Its reducer and feeds held each other, and their cycle kept the rows (4.3 GB of a wide
    layer's) until Python's collector ran, past the answer (sweep SX12)."""
    import gc
    import weakref

    made = []
    original = cka.RowState.__init__

    def noted(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(cka.RowState, "__init__", noted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 400), nn.ReLU(), nn.Linear(400, 3)).eval()  # rows
    X, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    db.profile  # noqa: B018 - made before the collector is paused
    gc.disable()
    try:
        answer = db.query("SIMILARITY 0, 2 WHERE class = 1")
        assert made and all(ref() is None for ref in made), "rows kept past the answer"
    finally:
        gc.enable()
    assert 0 <= answer.value <= 1
