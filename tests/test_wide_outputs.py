"""A model of 50,000 classes, as a language model's vocabulary (docs/ARCHITECTURE.md,
"Session" and "Top inputs"): SHOW PROFILE from the confusion matrix's non-empty cells, never
its dense 50,000² form; confidences that read (every one is under 0.001); and a first TOPK
INPUTS on the 50,000-wide output that reads the one neuron rather than building an index
that costs far more than the pass. The truth is plain numpy: the model is one linear map of
one-hot items, so its logits are a column of its weight."""
from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.engine import inputs_index
from diagql.model import views
from diagql.results.render import to_text

CLASSES, TYPES, ITEMS = 50_000, 40, 400
MISTAKEN = [3, 7, 12_345, 49_999]  # the true classes of most items, mostly predicted wrong


@pytest.fixture(scope="module")
def wide():
    """(model, X, y, W): item i is one-hot of its type; type t is predicted as class
    ``picks[t]`` with logit 2 against |logit| < 0.06 for every other class."""
    rng = np.random.default_rng(0)
    picks = rng.choice(CLASSES, TYPES, replace=False)
    types = rng.integers(0, TYPES, ITEMS)
    W = rng.uniform(-0.06, 0.06, (CLASSES, TYPES)).astype(np.float32)
    W[picks, np.arange(TYPES)] = 2.0
    X = np.eye(TYPES, dtype=np.float32)[types]
    predicted = picks[types]
    y = np.where(rng.random(ITEMS) < 0.3, predicted, rng.choice(MISTAKEN, ITEMS))
    model = nn.Sequential(nn.Linear(TYPES, CLASSES, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(W))
    return model, X, y, W


def _connect(wide):
    model, X, y, _ = wide
    return diagql.connect(model, (torch.from_numpy(X), torch.from_numpy(y)), cache_dir=False,
                          progress=False)


def _truth(wide):
    """Each item's prediction and confidence, from the logits X Wᵀ in float64."""
    _, X, _, W = wide
    logits = X.astype(np.float64) @ W.T.astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    return logits.argmax(1), probabilities.max(1)


def test_show_profile_of_50000_classes_lists_each_classs_mistakes_from_its_cells(wide):
    """SHOW PROFILE had built the dense 50,257² int64 matrix (20 GB) and walked its rows
    (24 s); it lists the classes with items, worst first, with their commonest mistakes."""
    _, _, y, _ = wide
    predicted, _ = _truth(wide)
    conn = _connect(wide)
    conn.query("SHOW MODELS")  # the profile, before the memory is measured
    tracemalloc.start()
    try:
        shown = conn.query("SHOW PROFILE")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 ** 2  # the dense matrix: 20 GB
    classes = np.unique(y)
    accuracy = {c: float(np.mean(predicted[y == c] == c)) for c in classes}
    assert [row[0] for row in shown.rows] == sorted(classes.tolist(),
                                                    key=lambda c: (accuracy[c], c))
    for c, items, rate, instead in shown.rows:
        mine = y == c
        assert items == int(mine.sum()) and rate == pytest.approx(accuracy[c])
        wrong = np.bincount(predicted[mine & (predicted != c)], minlength=CLASSES)
        order = np.lexsort((np.arange(CLASSES), -wrong))[:3]
        assert instead == ", ".join(f"{p} ({wrong[p]:,})" for p in order if wrong[p])
    assert any(", " in row[3] for row in shown.rows)  # several mistakes to order
    unlisted = CLASSES - len(classes)
    only_predicted = len(np.setdiff1d(predicted, y))
    assert f"{unlisted:,} of the 50,000 classes have no items and are left out " \
           f"({only_predicted:,} of them predicted for some item)" in shown.notes
    true, guessed, counts = conn.profile.confusion_cells()
    cells = np.unique(y * CLASSES + predicted, return_counts=True)
    np.testing.assert_array_equal(true * CLASSES + guessed, cells[0])
    np.testing.assert_array_equal(counts, cells[1])


def test_a_50000_class_models_confidences_read(wide):
    """Every confidence of a 50,000-class model is under 0.001: the TOPK INPUTS table had
    printed 0.000 for each."""
    _, _, y, W = wide
    predicted, confidence = _truth(wide)
    assert confidence.max() < 1e-3
    conn = _connect(wide)
    neuron = int(np.flatnonzero(W[:, 0])[0])
    result = conn.query(f"TOPK 5 INPUTS FOR 0[{neuron}]")
    shown = [line.split() for line in to_text(result).splitlines()
             if re.match(r"^\W*\d+\W+\d+\W", line)]
    assert len(shown) == 5
    for cells, item in zip(shown, result.items):
        number = [cell for cell in cells if re.fullmatch(r"\d\.\d\de-\d\d", cell)]
        assert len(number) == 1
        np.testing.assert_allclose(float(number[0]), confidence[item], rtol=5e-3)


def _ranking(values: np.ndarray, k: int) -> np.ndarray:
    """The k items of highest value, ties to the lower index."""
    return np.lexsort((np.arange(len(values)), -values))[:k]


def test_a_first_topk_inputs_on_a_50000_wide_output_reads_its_one_neuron(wide):
    """The first TOPK 3 INPUTS FOR lm_head[5] on a 50,257-token output had built the
    layer's inputs index: 13 s beside a 0.3 s pass. An index that costs far more than a pass
    over every item is not built by the first query; the answer is exact all the same."""
    _, X, _, W = wide
    neuron = 123
    values = X.astype(np.float64) @ W[neuron].astype(np.float64)
    conn = _connect(wide)
    conn.query("SHOW MODELS")  # the profile, before the memory is measured
    plan = dict(conn.query(f"EXPLAIN TOPK 3 INPUTS FOR 0[{neuron}]").rows)
    assert plan["read"].startswith(f"{ITEMS} items through the model, hooking 0 (the inputs "
                                   f"index of 0 is not built yet")
    tracemalloc.start()
    try:
        result = conn.query(f"TOPK 3 INPUTS FOR 0[{neuron}]")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 ** 2  # the index's lists alone: 160 MB
    np.testing.assert_array_equal(result.items, _ranking(values, 3))
    np.testing.assert_allclose(result.values, np.sort(values)[::-1][:3], rtol=1e-6)
    assert result.ranked.how == f"{ITEMS} items read through the model"
    assert any(note.startswith("the inputs index of 0 is not built yet") for note in result.notes)
    later = conn.query(f"BOTTOMK 4 INPUTS FOR 0[{neuron + 1}]")
    lowest = X.astype(np.float64) @ -W[neuron + 1].astype(np.float64)
    np.testing.assert_array_equal(later.items, _ranking(lowest, 4))
    assert later.ranked.how == f"{ITEMS} items read through the model"


class _Tokens(nn.Module):
    """Embeddings, then a wide per-token linear map ("wide", a sequence layer), then a head
    on the first token's."""

    def __init__(self, width: int):
        super().__init__()
        self.embed, self.wide = nn.Embedding(50, 8), nn.Linear(8, width)
        self.head = nn.Linear(width, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(self.wide(self.embed(input_ids))[:, 0])


def test_a_sequence_neurons_top_inputs_reduce_its_tokens_alone(monkeypatch):
    """TOPK INPUTS of one hidden unit of a sequence layer had taken every unit's mean over
    the real tokens, then kept one: of a 50,257-token output, 1.5 s for 200 items of 8 tokens,
    five times the model's pass. The hook reduces the one unit's tokens alone; the answer is
    its mean over the real tokens (plain numpy) all the same."""
    torch.manual_seed(0)
    width, n, length = 2048, 64, 6
    model = _Tokens(width).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, length), generator=g)
    real = torch.arange(length)[None] < torch.randint(1, length + 1, (n, 1), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    conn = diagql.connect(model, ({"input_ids": ids, "attention_mask": real.long()}, y),
                          cache_dir=False, progress=False)
    with torch.no_grad():
        rows = model.wide(model.embed(ids)).double().numpy()
    mask = real.numpy()[:, :, None]
    means = (rows * mask).sum(1) / mask.sum(1)
    conn.query("SHOW MODELS")
    monkeypatch.setattr(inputs_index, "MAX_NEURONS", 100)  # no index: the query's pass alone
    reduced = []
    mean = views._mean
    monkeypatch.setattr(views, "_mean", lambda values, *rest: reduced.append(values.shape[-1])
                        or mean(values, *rest))
    for unit, k in [(5, 4), (2047, 7)]:
        result = conn.query(f"TOPK {k} INPUTS FOR wide[{unit}] WHERE class = 1")
        allowed = np.flatnonzero(y.numpy() == 1)
        order = allowed[np.lexsort((allowed, -means[allowed, unit]))][:k]
        np.testing.assert_array_equal(result.items, order)
        np.testing.assert_allclose(result.values, means[order, unit], rtol=1e-6)
    assert reduced and set(reduced) == {1}  # never the 2,048 units'


def test_a_long_name_in_a_table_of_prose_stays_on_one_line():
    """A table with a cell over 60 characters folds at the pipe's width, as prose does; a
    67-character class name in SHOW MODELS had then been split mid-word (review PP1)."""
    class AVeryLongClassNameForAModelThatSomeoneWroteInTheirResearchCodeBase(nn.Sequential):
        pass

    torch.manual_seed(0)
    models = {"a": nn.Sequential(nn.Linear(4, 3)),
              "b": AVeryLongClassNameForAModelThatSomeoneWroteInTheirResearchCodeBase(
                  nn.Linear(4, 3))}
    db = diagql.connect(models, (torch.randn(10, 4), torch.arange(10) % 3), cache_dir=False,
                        progress=False)
    text = str(db.query("SHOW MODELS"))
    assert any("AVeryLongClassNameForAModelThatSomeoneWroteInTheirResearchCodeBase" in line
               for line in text.splitlines())


def test_explain_on_a_long_layer_name_still_folds_its_steps():
    """A word over 24 characters had made any table one of numbers, 200 columns wide: EXPLAIN
    on a Hugging Face layer (bert.encoder.layer.0.output.dense) among them (review QQ1)."""
    model = nn.Sequential()
    model.add_module("encoder_block_with_long_name", nn.Sequential(nn.Linear(4, 6), nn.ReLU()))
    model.add_module("head", nn.Linear(6, 3))
    db = diagql.connect(model, (torch.randn(40, 4), torch.arange(40) % 3), cache_dir=False,
                        progress=False)
    text = str(db.query("EXPLAIN AVG NEURONS IN encoder_block_with_long_name.0 "
                        "USING SAMPLE maxmargin(0.2)"))
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "encoder_block_with_long_name" in text
    # a word longer than a 100-column table's prose column leaves: as wide as it needs, not
    # the 200 of a table of numbers (review RR1)
    deep = nn.Sequential()
    name = "block_" + "n" * 80
    deep.add_module(name, nn.Sequential(nn.Linear(4, 6), nn.ReLU()))
    deep.add_module("head", nn.Linear(6, 3))
    db = diagql.connect(deep, (torch.randn(40, 4), torch.arange(40) % 3), cache_dir=False,
                        progress=False)
    lines = str(db.query(f"EXPLAIN AVG NEURONS IN {name}.0 USING SAMPLE maxmargin(0.2)"))\
        .splitlines()
    assert 100 < max(len(line) for line in lines) < 120
    assert any(f"{name}.0" in line for line in lines)
