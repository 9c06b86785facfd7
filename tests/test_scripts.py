"""Scripts as a user writes them: multi-line statements, comments, and a statement that fails in
the middle, whose error says which statement it is while the others keep their answers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import diagql
from diagql.errors import BindError, DiagQLError, ExecutionError

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = """\
SHOW SETTINGS;
AVG NEURONS IN encoder.1 WHERE class = 3;  -- a comment; with a ';' in it
-- a whole line of comment
AVG NEURONS IN encoder.1
  WHERE class = 3 AND class = 4;
TOPK 2 NEURONS IN head
  WHERE predicted = 1 USING SAMPLE random(0.1) GROUP BY correct;
TOPK 2 NEURONS IN head WHERE predicted = 1;
"""


@pytest.fixture(scope="module")
def truth(mlp, digits):
    """encoder.1 and head outputs of every item, by plain torch (float64)."""
    X, _ = digits
    with torch.no_grad():
        hidden = mlp.encoder[:2](X).double().numpy()
        head = mlp(X).double().numpy()
    return hidden, head


def test_a_bad_statement_in_the_middle(mlp, digits, truth):
    hidden, head = truth
    labels = digits[1].numpy()
    db = diagql.connect(mlp, digits, cache_dir=False, progress=False, batch_size=500)
    outcomes = list(db.run_script(SCRIPT))
    assert len(outcomes) == 5
    settings, avg, nothing, misplaced, topk = outcomes
    assert settings.kind == "table"
    np.testing.assert_allclose(avg.values, hidden[labels == 3].mean(axis=0), rtol=0, atol=1e-5)
    # What matched nothing is named at its place in the file: the WHERE on line 5.
    assert isinstance(nothing, ExecutionError)
    assert (nothing.line, nothing.column) == (5, 9)
    assert nothing.format("s.dql").startswith("s.dql:5:9: error: no items match WHERE class = 3 "
                                              "AND class = 4 (0 of 1,797 items)")
    assert nothing.format().endswith("\n      WHERE class = 3 AND class = 4;\n"
                                     "            " + "^" * len("class = 3 AND class = 4"))
    assert isinstance(misplaced, diagql.ParseError) and (misplaced.line, misplaced.column) == (7, 48)
    predicted = head.argmax(axis=1)
    means = head[predicted == 1].mean(axis=0)
    assert list(topk.neurons) == list(np.argsort(-means)[:2])
    np.testing.assert_allclose(topk.values, np.sort(means)[::-1][:2], rtol=0, atol=1e-5)


class _Refusing(torch.nn.Module):
    """A model whose forward refuses batches of more than 200 items (the probe's pass)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if len(x) > 200:
            raise RuntimeError("too many at once")
        return self.inner(x)


def test_an_error_without_a_place_points_at_its_statement(mlp, digits):
    """A forward that raised has no place of its own in the text; in a script it says which
    statement (it printed 'file: error: ...' with no line). A GROUP BY that needs labels is
    placed under its clause (sweep SX11)."""
    X, _ = digits
    db = diagql.connect(mlp, (X, None), cache_dir=False, progress=False, batch_size=500)
    script = "SHOW MODELS;\n\n  AVG NEURONS IN head GROUP BY class;\nAVG NEURONS IN head;"
    _, grouped, plain = db.run_script(script)
    assert isinstance(grouped, BindError) and "needs the true labels" in grouped.message
    assert (grouped.line, grouped.column) == (3, 23)
    assert grouped.format("s.dql").startswith("s.dql:3:23: error: GROUP BY class needs")
    assert grouped.format().split("\n")[2] == " " * 26 + "^" * len("GROUP BY class")
    with torch.no_grad():
        np.testing.assert_allclose(plain.values, mlp(X).double().numpy().mean(axis=0), atol=1e-5)
    refusing = diagql.connect(_Refusing(mlp), (X, None), cache_dir=False, progress=False,
                              batch_size=500)
    _, failed = refusing.run_script("SHOW MODELS;\n\n  AVG NEURONS IN inner.head;")
    assert isinstance(failed, DiagQLError) and "too many at once" in failed.message
    assert (failed.line, failed.column) == (3, 3) and failed.statement == \
        "AVG NEURONS IN inner.head"


@pytest.mark.parametrize("statement", ["TOPK 2 NEURONS IN head USING FULL WITH BASELINE",
                                       ("AVG NEURONS IN head WHERE class = 3 AND incorrect "
                                       "USING AUTO WITH BASELINE"),
                                       "SIMILARITY encoder.1, head WITH BASELINE"])
def test_with_baseline_on_an_exact_answer_says_there_is_none(mlp, digits, statement):
    """The clause was dropped without a word: the answer is exact, nothing to compare."""
    db = diagql.connect(mlp, digits, cache_dir=False, progress=False, batch_size=500)
    result = db.query(statement)
    assert not result.approximate and result.baseline is None
    assert result.notes == [("no baseline: this answer is exact already (WITH BASELINE compares "
                            "a sample's answer with the exact one)")]
    assert "no baseline: this answer is exact already" in str(result)
    explained = db.query("EXPLAIN " + statement)
    assert ["baseline", "none: the answer is exact already"] in [list(r) for r in explained.rows]
    sampled = db.query(statement.replace("USING FULL ", "").replace("USING AUTO ", "")
                       .replace("WITH", "USING SAMPLE random(0.5) WITH"))
    assert sampled.baseline is not None and not sampled.notes


def test_an_answer_from_the_profile_is_given_before_a_later_querys_pass(mlp, digits, truth,
                                                                         monkeypatch):
    """Consecutive queries share one pass, but one the profile answers (the logits) waits for
    none: a script interrupted in the next query's pass has printed it."""
    from diagql.engine.executor import Runner

    _, head = truth
    labels = digits[1].numpy()
    db = diagql.connect(mlp, digits, cache_dir=False, progress=False, batch_size=500)
    answer_many = Runner.answer_many

    def interrupted(self, plans):  # Ctrl-C in any pass through the model
        if not all(plan.from_profile for plan in plans):
            raise KeyboardInterrupt
        return answer_many(self, plans)

    monkeypatch.setattr(Runner, "answer_many", interrupted)
    outcomes = db.run_script("TOPK 2 NEURONS IN head WHERE class = 2;\n"
                             "AVG NEURONS IN encoder.1 WHERE class = 3;\n")
    first = next(outcomes)
    means = head[labels == 2].mean(axis=0)
    assert list(first.neurons) == list(np.argsort(-means)[:2])
    with pytest.raises(KeyboardInterrupt):
        next(outcomes)


def test_a_grouped_results_repr_counts_its_groups(mlp, digits):
    db = diagql.connect(mlp, digits, cache_dir=False, progress=False)
    grouped = db.query("TOPK 3 NEURONS IN head GROUP BY class")
    assert repr(grouped) == ("<Result topk neurons in head: 10 groups by class, 3 values each, "
                             "over 1797 items, full>")  # it had said "0 values"


# Whether the test's model fails: an environment variable, which no model stamp reads (a
# global or a value its forward closes over would be a change of the model, which derives
# the profile again, and the profile's pass would meet the broken item).
_ARMED = "DIAGQL_TEST_BROKEN_ITEM"


def test_a_shared_pass_that_fails_on_one_item_still_answers_the_other_statements(
        mlp, digits, truth, monkeypatch):
    """Statements of one model share one pass; when the model raises on one item, each is
    answered alone, so only the statement whose items hold it fails, at its own place (all of
    them had failed, with no place; README: 'each still gets its own answer, or its own
    error')."""
    X, y = digits
    hidden, _ = truth
    labels = y.numpy()
    bad = int(np.flatnonzero(labels == 4)[0])

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mlp

        def forward(self, x):
            if os.environ.get(_ARMED) and bool((x == X[bad]).flatten(1).all(dim=1).any()):
                raise ValueError("a broken item")
            return self.inner(x)

    db = diagql.connect(Failing(), digits, cache_dir=False, progress=False, batch_size=500)
    db.profile  # noqa: B018 - made before the model fails
    monkeypatch.setenv(_ARMED, "1")
    try:
            one, four, two = db.run_script("AVG NEURONS IN inner.encoder.1 WHERE class = 1;\n"
                                       "AVG NEURONS IN inner.encoder.1 WHERE class = 4;\n"
                                       "AVG NEURONS IN inner.encoder.1 WHERE class = 2;")
    finally:
        monkeypatch.delenv(_ARMED)
    assert not isinstance(one, Exception), one
    np.testing.assert_allclose(one.values, hidden[labels == 1].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(two.values, hidden[labels == 2].mean(axis=0), atol=1e-5)
    assert isinstance(four, ExecutionError) and four.line == 2
    assert "the model's forward raised ValueError on" in four.message


def test_a_set_result_is_labelled_by_its_statement_where_statements_are_echoed(mlp, digits):
    """A script's SET printed an unlabelled one-row table (sweep SS8); the REPL, where the
    statement was just typed, shows none."""
    import io

    from rich.console import Console

    from diagql.results.render import renderable, to_text

    db = diagql.connect(mlp, digits, cache_dir=False, progress=False)
    result = db.query("SET seed = 7")
    assert to_text(result).splitlines()[0] == "SET seed = 7"
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(renderable(result, echo=False))
    shown = console.file.getvalue()
    assert "seed" in shown and "SET seed" not in shown
