"""The paper's metrics (results/metrics.py) against independent computations, and a Result that
renders from its own parts, with no engine plan behind it."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy.spatial.distance import cosine, jensenshannon

from diagql.results import metrics
from diagql.results.metrics import COSINE, JS, PRECISION
from diagql.results.render import renderable, to_text
from diagql.results.result import AGGREGATES, Estimate, Provenance, Result

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_cosine_rows_match_scipy(rng):
    a = rng.normal(size=(40, 17))
    b = rng.normal(size=(40, 17))
    b[:5] = -a[:5] * 3.0  # opposite directions: distance 2
    b[5:10] = a[5:10] * 0.5  # the same direction: distance 0
    expected = [cosine(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(metrics.cosine_distances(a, b), expected, atol=1e-12)
    np.testing.assert_allclose(metrics.cosine_distances(a[:5], b[:5]), 2.0, atol=1e-12)


def test_js_rows_match_scipy_in_base_2(rng):
    counts = rng.integers(0, 6, size=(50, 12)).astype(np.float64)
    exact = rng.integers(0, 40, size=(50, 12)).astype(np.float64)
    counts[:, 0] += 1  # no empty histogram here; those are the edge cases below
    exact[:, 0] += 1
    counts[:10, 3:] = 0  # mass where the other histogram has none
    expected = [jensenshannon(p, q, base=2) for p, q in zip(counts, exact)]
    got = metrics.js_distances(counts, exact)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # Counts or shares: each row is normalised, so the scale does not matter.
    np.testing.assert_allclose(metrics.js_distances(counts / counts.sum(1, keepdims=True),
                                                    exact * 7), expected, atol=1e-12)
    disjoint = metrics.js_distances(np.array([[1.0, 0.0]]), np.array([[0.0, 3.0]]))
    assert disjoint[0] == pytest.approx(1.0)  # the largest distance in base 2


def test_precision_rows_match_set_intersection(rng):
    n, k = 30, 5
    approx = np.array([rng.permutation(n)[:k] for _ in range(60)])
    exact = np.array([rng.permutation(n)[:k] for _ in range(60)])
    exact[:10] = approx[:10][:, ::-1]  # the same set in another order: 1
    expected = [len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(approx, exact)]
    np.testing.assert_allclose(metrics.precisions(approx, exact), expected)
    assert metrics.precisions(approx[:10], exact[:10]).tolist() == [1.0] * 10


def test_zero_vectors_and_empty_histograms_follow_the_stated_rule():
    """scipy answers NaN for a zero vector; the metrics say: two zeros agree, a zero against a
    non-zero is as far as can be for a sample (1)."""
    zero, x = np.zeros(4), np.array([1.0, 2.0, 0.0, 1.0])
    assert metrics.cosine_distances(np.stack([zero, zero, x]),
                                    np.stack([zero, x, zero])).tolist() == [0.0, 1.0, 1.0]
    assert metrics.js_distances(np.stack([zero, zero, x]),
                                np.stack([zero, x, zero])).tolist() == [0.0, 1.0, 1.0]


def test_an_empty_answer_scores_the_worst_and_one_row_is_the_scalar_form(rng):
    exact_top, exact = np.array([3, 1, 4]), rng.random(6)
    for approx in (None, np.array([], dtype=np.int64)):
        assert PRECISION.score(approx, exact_top) == 0.0
        assert COSINE.score(approx, exact) == 1.0
        assert JS.score(approx, exact) == 1.0
    assert PRECISION.score(np.array([4, 9, 3]), exact_top) == pytest.approx(2 / 3)
    assert PRECISION.score(np.array([4, 9]), np.array([], dtype=np.int64)) == 1.0  # k = 0
    a, b = rng.random(6), rng.random(6)
    assert COSINE.score(a, b) == pytest.approx(cosine(a, b), abs=1e-12)
    assert JS.score(a, b) == pytest.approx(jensenshannon(a, b, base=2), abs=1e-12)


def test_one_table_names_each_metric_and_judges_each_aggregate_once():
    assert [m.paper for m in metrics.METRICS] == ["S1", "S2", "S3"]
    assert sorted(metrics.OF_AGGREGATE) == sorted(AGGREGATES)
    assert [m.arrow for m in metrics.METRICS] == ["↑", "↓", "↓"]
    assert [m.estimate_key for m in metrics.METRICS] == [
        "expected_precision", "expected_cosine_distance", "expected_js_distance"]


def _sampled_avg(**extra) -> Result:
    """An AVG answer built by hand: only its own parts, no plan."""
    values = np.array([0.5, 2.0, 1.0])
    estimate = Estimate("sampling variance", True, 0.9, 7, 40, ci_low=values - 0.25,
                        ci_high=values + 0.25, metric=COSINE, expected=0.0123)
    return Result(kind="avg", statement="AVG NEURONS IN fc WHERE class = 1 USING SAMPLE r(7)",
                  layer="fc", unit="neurons", neurons=np.arange(3), labels=["a", "b", "c"],
                  values=values, n_items=7, estimate=estimate,
                  provenance=Provenance(100, "r(7)", 7, **extra))


def test_a_result_renders_from_its_provenance_and_estimate_alone():
    result = _sampled_avg()
    assert result.plan is None and result.approximate and result.source == "r(7)"
    text = to_text(result)
    assert "sample r(7): 7 of 100 items" in text
    assert "±90%" in text and "±0.2500" in text  # the estimate's own level and half-width
    assert "expected cosine distance 0.012" in text
    assert text.splitlines()[0] == result.statement
    exact = Result(kind="avg", provenance=Provenance(100))
    assert not exact.approximate and exact.source == "full"
    assert result.to_dict()["estimate"]["expected_cosine_distance"] == 0.0123


def test_widened_intervals_say_so_in_the_estimate_line_and_the_json():
    values = np.array([0.5, 2.0, 1.0])
    estimate = Estimate("sampling variance", True, 0.95, 7, 40, ci_low=values - 0.25,
                        ci_high=values + 0.25, metric=COSINE, expected=0.0123,
                        estimator="assisted", widened=2.25)
    result = Result(kind="avg", statement="AVG NEURONS IN fc USING SAMPLE r(7)", layer="fc",
                    unit="neurons", neurons=np.arange(3), labels=["a", "b", "c"], values=values,
                    n_items=7, estimate=estimate, provenance=Provenance(100, "r(7)", 7))
    text = " ".join(to_text(result).split())
    assert "intervals widened 2.2x: checked on values the profile knows for every item" in text
    assert result.to_dict()["estimate"]["widened"] == 2.25
    assert "widened" not in _sampled_avg().to_dict()["estimate"]


def test_renderable_can_leave_out_the_statement():
    result = _sampled_avg()
    console_text = to_text(result)
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(renderable(result, echo=False))
    without = console.file.getvalue().rstrip("\n")
    assert without.splitlines() == console_text.splitlines()[1:]


def test_grouped_records_name_the_group_from_the_provenance():
    parts = {key: _sampled_avg(group_by="class") for key in (1, 2)}
    result = Result(kind="avg", provenance=Provenance(100, "r(7)", 7, group_by="class"),
                    groups=parts, n_items=14)
    records = result.records()
    assert [r["class"] for r in records] == [1, 1, 1, 2, 2, 2]


def test_settings_take_formats_and_max_rows_from_results_without_numpy_or_rich():
    """The REPL's prompt and `diagql --help` come before numpy loads: the settings they import
    must load neither numpy nor rich."""
    code = ("import sys\nfrom diagql.session import settings\nfrom diagql.results import formats\n"
            "assert settings.FORMATS is formats.FORMATS\n"
            "assert settings.Settings().max_rows == formats.MAX_ROWS\n"
            "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
            "assert 'rich' not in sys.modules, 'rich was imported'\n"
            "from diagql.results import render\n"
            "assert render.MAX_ROWS == formats.MAX_ROWS\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_a_wide_layer_cut_to_max_rows_shows_its_largest_values_first():
    """Cut to its first 20 neurons by index, a 1,024-neuron ARGMAX showed mostly silent
    neurons: the largest are shown, largest first, each with its own interval."""
    rng = np.random.default_rng(0)
    values = rng.random(60)
    estimate = Estimate("sampling variance", True, 0.95, 7, 40, ci_low=values - 0.001 *
                        np.arange(60), ci_high=values + 0.001 * np.arange(60), metric=COSINE,
                        expected=0.01)
    result = Result(kind="avg", statement="AVG NEURONS IN fc USING SAMPLE r(7)", layer="fc",
                    unit="neurons", neurons=np.arange(60), labels=[f"n{i}" for i in range(60)],
                    values=values, n_items=7, estimate=estimate,
                    provenance=Provenance(100, "r(7)", 7))
    lines = to_text(result, width=120, max_rows=5).splitlines()
    rows = [line.split() for line in lines if line.strip().startswith("│ n")]
    best = np.argsort(-values)[:5]
    assert [row[1] for row in rows] == [f"n{i}" for i in best]
    assert [row[5] for row in rows] == [f"±{0.001 * i:.4f}" for i in best]
    assert "… 55 more (the 5 largest shown, largest first)" in "\n".join(lines)
    few = to_text(result, width=120, max_rows=100)  # not cut: in neuron order
    assert [line.split()[1] for line in few.splitlines() if line.strip().startswith("│ n")] == \
        [f"n{i}" for i in range(60)]


def test_an_argmax_cut_to_max_rows_leaves_out_the_neurons_that_win_for_no_item():
    """Three winners among 60 neurons were shown beside 17 rows of 0.0000."""
    values = np.zeros(60)
    values[[7, 30, 41]] = [0.5, 0.3, 0.2]
    result = Result(kind="argmax", statement="ARGMAX NEURONS IN fc", layer="fc",
                    unit="neurons", neurons=np.arange(60), labels=[f"n{i}" for i in range(60)],
                    values=values, n_items=10, provenance=Provenance(100))
    lines = to_text(result, width=120, max_rows=20).splitlines()
    assert [line.split()[1] for line in lines if line.strip().startswith("│ n")] == \
        ["n7", "n30", "n41"]
    assert "… 57 more (neurons that win for no item: the others)" in "\n".join(lines)
    # A sample's, beside its exact answer: a neuron that won for no sampled item but for some
    # matching items is shown (such hidden rows had won 37% of them: sweep SS7), largest
    # exact share first among the sample's zeros.
    exact_values = np.zeros(60)
    exact_values[[7, 30, 41, 12, 50]] = [0.4, 0.2, 0.1, 0.1, 0.2]
    exact = Result(kind="argmax", statement="", layer="fc", unit="neurons",
                   neurons=np.arange(60), labels=[f"n{i}" for i in range(60)],
                   values=exact_values, n_items=100, provenance=Provenance(100))
    sampled = Result(kind="argmax", statement="ARGMAX NEURONS IN fc USING SAMPLE r(10)",
                     layer="fc", unit="neurons", neurons=np.arange(60),
                     labels=[f"n{i}" for i in range(60)], values=values, n_items=10,
                     provenance=Provenance(100, "r(10)", 10), baseline=exact)
    lines = to_text(sampled, width=120, max_rows=20).splitlines()
    assert [line.split()[1] for line in lines if line.strip().startswith("│ n")] == \
        ["n7", "n30", "n41", "n50", "n12"]
    assert "… 55 more (neurons that win for no sampled item: the others)" in "\n".join(lines)


def test_on_a_narrow_terminal_the_bars_give_way_before_the_numbers():
    """At 40 columns a TOPK table had cut its means to '0.…' while its bars kept 12 columns."""
    values = np.array([0.6055, 0.5972])
    estimate = Estimate("sampling variance", True, 0.95, 7, 40, ci_low=values - 0.01,
                        ci_high=values + 0.01, p_in_topk=np.ones(2), metric=PRECISION,
                        expected=1.0)
    result = Result(kind="topk", statement="TOPK 2 NEURONS IN fc2 USING SAMPLE r(7)",
                    layer="fc2", unit="neurons", neurons=np.array([7, 38]),
                    labels=["fc2[7]", "fc2[38]"], values=values, n_items=7, estimate=estimate,
                    provenance=Provenance(100, "r(7)", 7, order="mean"))
    text = to_text(result, width=40)
    assert "0.6055" in text and "0.5972" in text and "fc2[38]" in text and "1.00" in text


def test_on_a_narrow_terminal_group_keys_and_numbers_stay_whole_and_long_labels_fold():
    """At 60 columns a GROUP BY's key column had shrunk to nothing and its means read '0.79…',
    while the no-wrap label column kept its '… 188 more' row's width; at 40 a TOPK WITH
    BASELINE had no room for the means at all."""
    labels = [f"encoder.blocks.0.conv[{i // 25},{i // 5 % 5},{i % 5}]" for i in range(50)]
    values = np.linspace(1.4186, 0.2, 50)

    def part(key_values):
        return Result(kind="avg", statement="", layer="encoder.blocks.0.conv", unit="neurons",
                      neurons=np.arange(50), labels=labels, values=key_values, n_items=9,
                      provenance=Provenance(100))

    grouped = Result(kind="avg", statement="AVG NEURONS IN encoder.blocks.0.conv GROUP BY "
                     "correct", layer="encoder.blocks.0.conv", unit="neurons", n_items=18,
                     groups={False: part(values), True: part(values[::-1])},
                     provenance=Provenance(100, group_by="correct"))
    text = to_text(grouped, width=60, max_rows=4)
    assert "False" in text and "True" in text and "1.4186" in text
    assert "188" not in text and "46 more" in text
    exact = Result(kind="topk", statement="", layer="fc2", unit="neurons",
                   neurons=np.array([3, 7]), values=np.array([0.9364, 0.2940]),
                   labels=["fc2[3]", "fc2[7]"], n_items=40, provenance=Provenance(100))
    sampled = Result(kind="topk", statement="TOPK 2 NEURONS IN fc2 USING SAMPLE r(7) WITH "
                     "BASELINE", layer="fc2", unit="neurons", neurons=np.array([7, 5]),
                     labels=["encoder.blocks.0.conv[2,0,2]", "encoder.blocks.0.conv[2,5,3]"],
                     values=np.array([1.2368, 0.8971]), n_items=7, baseline=exact,
                     provenance=Provenance(100, "r(7)", 7, order="mean"))
    text = to_text(sampled, width=40)
    assert all(number in text for number in ("1.2368", "0.8971", "0.2940 ✓"))
    assert all(len(line) <= 40 for line in text.splitlines())
