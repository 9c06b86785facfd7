"""Class names: given with connect(classes=) or --classes, found on the data (a torchvision-style
`classes` list, a Hugging Face ClassLabel feature) or the model (config.id2label), and
`WHERE class = 'cat'` answering as `WHERE class = 3` does, checked against plain torch."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.errors import BindError, DiagQLError, DiagQLWarning, ParseError
from tests import models

NAMES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def world():
    X, y, model, hidden = models.tabular(90)
    with torch.no_grad():
        predicted = model(X).argmax(1).numpy()
    return X, y, model, hidden, predicted


def test_names_given_answer_as_their_indices(world):
    X, y, model, hidden, predicted = world
    db = diagql.connect(model, (X, y), classes=NAMES, cache_dir=False, progress=False)
    labels = y.numpy()
    cases = {"class = 'cat'": labels == 2,
             "class != 'ant' AND predicted = 'bee'": (labels != 0) & (predicted == 1),
             "class IN ('ant', 'cat')": np.isin(labels, [0, 2]),
             "predicted NOT IN ('bee') OR class = 1": ~(predicted == 1) | (labels == 1)}
    for where, mask in cases.items():
        result = db.query(f"AVG NEURONS IN 1 WHERE {where}")
        np.testing.assert_allclose(result.values, hidden[mask].mean(axis=0), rtol=1e-6)
    # A script's queries share a pass, their names resolved too.
    first, second = db.execute("AVG NEURONS IN 1 WHERE class = 'ant'; "
                               "AVG NEURONS IN 1 WHERE class = 'bee'")
    np.testing.assert_allclose(second.values, hidden[labels == 1].mean(axis=0), rtol=1e-6)
    top = db.query("TOPK 2 INPUTS FOR 1[0] WHERE class = 'bee'")
    mine = np.flatnonzero(labels == 1)
    assert top.items.tolist() == mine[np.argsort(-hidden[mine, 0], kind="stable")[:2]].tolist()
    assert db.query("EXPLAIN AVG NEURONS IN 1 WHERE class = 'cat'").kind == "explain"


def test_grouped_answers_and_the_profile_show_the_names(world):
    X, y, model, _, _ = world
    db = diagql.connect(model, (X, y), classes={0: "ant", 1: "bee", 2: "cat"},
                        cache_dir=False, progress=False)
    text = str(db.query("AVG NEURONS IN 1 GROUP BY class"))
    assert "0 ant" in text and "2 cat" in text
    text = str(db.query("SIMILARITY 0, 2 GROUP BY predicted"))
    assert any(f"{i} {name}" in text for i, name in enumerate(NAMES))
    inputs = db.query("TOPK 3 INPUTS FOR 1[0] WHERE class = 'bee'")
    assert str(inputs).count("1 bee") >= 3  # each row's label, as a name too
    profile = db.query("SHOW PROFILE")
    assert profile.columns[:2] == ["class", "name"]
    # Records (CSV, pandas) carry the name beside the index, as the table shows both (SW9).
    grouped = db.query("AVG NEURONS IN 1 GROUP BY predicted").records()
    assert {(r["predicted"], r["predicted_name"]) for r in grouped} <= set(enumerate(NAMES))
    rows = inputs.records()
    assert [r["label_name"] for r in rows] == ["bee"] * 3
    assert all(r["predicted_name"] == NAMES[r["predicted"]] for r in rows)
    assert [row[1] for row in profile.rows] == NAMES


def test_plans_and_messages_write_the_classes_by_their_names(world):
    X, y, model, _, predicted = world
    db = diagql.connect(model, (X, y), classes=NAMES, cache_dir=False, progress=False)
    where = "class != 'ant' AND predicted IN ('bee', 'cat') AND class < 2"
    expected = int(((y.numpy() != 0) & (predicted >= 1) & (y.numpy() < 2)).sum())
    for statement in (f"AVG NEURONS IN 1 WHERE {where}", f"SIMILARITY 0, 1 WHERE {where}",
                      f"TOPK 2 INPUTS FOR 1[0] WHERE {where}"):
        rows = dict(db.query(f"EXPLAIN {statement}").rows)
        # The text it shows parses to the same tree (class < 2 orders indices: no name).
        assert rows["filter"].startswith(f"WHERE {where} on the profile → {expected:,}")
    numbered = diagql.connect(model, (X, y), classes=["1", "0", "2"], cache_dir=False,
                              progress=False)  # names like numbers: the indices, unmistaken
    assert dict(numbered.query("EXPLAIN AVG NEURONS IN 1 WHERE class = 0").rows)[
        "filter"].startswith("WHERE class = 0 on the profile")
    never = "class = 'bee' AND predicted = 'bee' AND class = 'cat'"
    for statement in (f"AVG NEURONS IN 1 WHERE {never}", f"TOPK 2 INPUTS FOR 1[0] WHERE {never}",
                      # The baseline's plan said it by the indices ("class = 3").
                      f"TOPK 2 NEURONS IN 1 WHERE {never} USING SAMPLE random(0.5) WITH BASELINE"):
        with pytest.raises(DiagQLError, match=f"no items match WHERE {never} "):
            db.query(statement)


def test_across_checkpoints_names_its_class_groups(world, tmp_path):
    X, y, model, _, _ = world
    torch.save(model.state_dict(), tmp_path / "e1.pt")
    db = diagql.connect(model, (X, y), classes=NAMES, checkpoints={"e1": str(tmp_path / "e1.pt")},
                        cache_dir=False, progress=False)
    wide = db.query("AVG NEURONS IN 2 GROUP BY class ACROSS CHECKPOINTS")
    assert wide.columns[1:3] == ["0 ant 2[0]", "0 ant 2[1]"]
    assert list(wide.series)[0] == "0 ant 2[0]"
    long = db.query("TOPK 5 NEURONS IN 1 GROUP BY class ACROSS CHECKPOINTS")  # 15 rows
    assert long.columns[:2] == ["class", "rank"]
    assert [row[:2] for row in long.rows[4:6]] == [("0 ant", 5), ("1 bee", 1)]


def test_mistakes_with_names_are_located_and_suggested(world):
    X, y, model, _, _ = world
    db = diagql.connect(model, (X, y), classes=NAMES, cache_dir=False, progress=False)
    with pytest.raises(BindError) as caught:
        db.query("AVG NEURONS IN 1 WHERE class = 'bea'")
    assert caught.value.message == "unknown class 'bea'; did you mean 'bee'?"
    assert caught.value.column == 24 and caught.value.hint == "classes are ant, bee, cat"
    with pytest.raises(BindError, match="a class name compares with =, != or IN, not <"):
        db.query("AVG NEURONS IN 1 WHERE class < 'bee'")
    with pytest.raises(ParseError, match="confidence compares with one"):
        db.query("AVG NEURONS IN 1 WHERE confidence > 'bee'")
    bare = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with pytest.raises(BindError, match="the classes have no names here"):
        bare.query("AVG NEURONS IN 1 WHERE class = 'bee'")
    np.testing.assert_array_equal(  # an array of names (LabelEncoder().classes_) is taken
        diagql.connect(model, (X, y), classes=np.array(NAMES), cache_dir=False,
                       progress=False).class_names, NAMES)
    for wrong in ("ant,bee", ["ant", "ant", "cat"], {1: "bee"}, []):
        with pytest.raises(DiagQLError, match="classes="):
            diagql.connect(model, (X, y), classes=wrong, cache_dir=False, progress=False)


class _Named(torch.utils.data.Dataset):
    """A torchvision-style dataset: its class names in ``classes``."""

    classes = NAMES

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


class _Configured(nn.Module):
    """A model carrying a Hugging Face-style config with id2label."""

    def __init__(self, inner, id2label):
        super().__init__()
        self.inner, self.config = inner, SimpleNamespace(id2label=id2label)

    def forward(self, x):
        return self.inner(x)


def test_names_are_found_on_the_data_and_on_the_model(world):
    X, y, model, hidden, _ = world
    mask = y.numpy() == 1
    loader_of_subset = torch.utils.data.DataLoader(
        torch.utils.data.Subset(_Named(X, y), list(range(len(y)))), batch_size=8)
    for data, net, layer in (
            (_Named(X, y), model, "1"),
            (torch.utils.data.DataLoader(_Named(X, y), batch_size=8), model, "1"),
            (loader_of_subset, model, "1"),
            ((X, y), _Configured(model, {0: "ant", 1: "bee", 2: "cat"}), "inner.1")):
        db = diagql.connect(net, data, cache_dir=False, progress=False)
        assert db.class_names == NAMES
        result = db.query(f"AVG NEURONS IN {layer} WHERE class = 'bee'")
        np.testing.assert_allclose(result.values, hidden[mask].mean(axis=0), rtol=1e-6)
    # The default names of a config (LABEL_0, ...) name nothing; nor keys that are not
    # class indices (connect had raised on them).
    plain = _Configured(model, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    assert diagql.connect(plain, (X, y), cache_dir=False, progress=False).class_names is None
    odd = _Configured(model, {"a": "ant", "b": "bee"})
    assert diagql.connect(odd, (X, y), cache_dir=False, progress=False).class_names is None


@pytest.mark.parametrize("names", [["zero", "one", "three"], [str(i) for i in range(12)]],
                         ids=["one short", "two over"])
def test_names_given_for_another_number_of_classes_are_refused(names):
    """With a name left out, 'three' would be class 2: every answer that names a class
    would silently be another class's."""
    torch.manual_seed(0)
    X, y = torch.randn(80, 6), torch.randint(0, 4, (80,))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    db = diagql.connect(model, (X, y), progress=False, cache_dir=False, classes=names)
    with pytest.raises(DiagQLError, match=f"{len(names)} class names were given, but the model "
                                          "scores 4 classes: give one name per class"):
        db.query("AVG NEURONS IN 1 WHERE class = 'three'")
    with pytest.raises(DiagQLError, match="class names were given"):
        db.query("AVG NEURONS IN 1 GROUP BY class")  # its groups would be misnamed


def test_names_found_for_another_number_of_classes_are_dropped_with_a_warning():
    torch.manual_seed(0)
    X, y = torch.randn(80, 6), torch.randint(0, 4, (80,))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    data = torch.utils.data.TensorDataset(X, y)
    data.classes = ["cat", "dog"]  # a torchvision-style attribute that is out of date
    db = diagql.connect(model, data, progress=False, cache_dir=False)
    with pytest.warns(DiagQLWarning, match="the 2 class names .* do not fit the model's 4"):
        answer = db.query("AVG NEURONS IN 1 WHERE class = 1")
    assert answer.n_items == int((y == 1).sum()) and db.class_names is None
    with pytest.raises(DiagQLError, match="no names"):
        db.query("AVG NEURONS IN 1 WHERE class = 'dog'")


ODD = ["a [/]", ":smile:", "[red]x[/red]"]  # rich markup and an emoji code, as written


def test_names_that_look_like_markup_are_shown_as_written(world):
    """A class named 'a [/]' had crashed every table (rich read it as markup), and ':smile:'
    was printed as an emoji, in the command line's CSV too."""
    X, y, model, _, _ = world
    db = diagql.connect(model, (X, y), classes=ODD, cache_dir=False, progress=False)
    for statement in ("AVG NEURONS IN 1 GROUP BY class", "SHOW PROFILE",
                      "TOPK 3 INPUTS FOR 1[0]"):
        result = db.query(statement)
        text, html = str(result), result._repr_html_()
        for name in ODD:
            assert name in text, (statement, name)
        assert "a [/]" in html and ":smile:" in html


def test_the_command_lines_csv_writes_names_as_written(tmp_path):
    from tests import cli_in_process

    (tmp_path / "odd.py").write_text(
        "from tests import models\n"
        "def model():\n    return models.tabular(90)[2]\n"
        "def data():\n    X, y, _, _ = models.tabular(90)\n    return X, y\n")
    done = cli_in_process.diagql("--model", "odd:model", "--data", "odd:data", "--classes",
                                 ",".join(ODD), "--format", "csv", "-e", "SHOW PROFILE",
                                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ODD:
        assert name in done.stdout
