"""Hugging Face datasets as data (built in memory, no download): each format a user may
leave it in, answered as plain torch answers over the same rows, and the forms that cannot be
read as items refused with what to pass instead."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import diagql
from diagql.errors import DiagQLError, ExecutionError
from tests import models

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def rows():
    return models.tabular(60, seed=3)


def table(X, y):
    features = datasets.Features({"x": datasets.Sequence(datasets.Value("float32")),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"x": X.tolist(), "label": y.tolist()}, features=features)


@pytest.mark.parametrize("form", ["python", "to_list", "torch", "numpy", "shuffled-select",
                                  "loader"])
def test_a_dataset_in_any_item_format_answers_as_plain_torch(rows, form):
    """Its default (Python) format, and its to_list(), had been refused ("none of the batch's
    inputs is a tensor; a collate_fn must turn them into tensors"): an item's lists of numbers
    are tensors now before the default collate stacks them."""
    X, y, model, hidden = rows
    ds = table(X, y)
    order = np.arange(len(y))
    if form == "to_list":
        ds = ds.to_list()
    elif form == "loader":  # torch's default collate had refused the items' lists
        ds = torch.utils.data.DataLoader(ds, batch_size=16)
    elif form in ("torch", "numpy"):
        ds = ds.with_format(form)
    elif form == "shuffled-select":
        order = np.random.default_rng(0).permutation(len(y))[:40]
        ds = ds.select(order.tolist()).with_format("torch")
    db = diagql.connect(model, ds, cache_dir=False, progress=False)
    chosen = y.numpy()[order] == 1
    result = db.query("AVG NEURONS IN 1 WHERE class = 1")
    np.testing.assert_allclose(result.values, hidden[order][chosen].mean(axis=0), rtol=1e-5)


def test_a_classlabel_features_names_name_the_classes(rows):
    """`WHERE class = 'b'` had been a syntax error ("expected a number")."""
    X, y, model, hidden = rows
    db = diagql.connect(model, table(X, y).with_format("torch"), cache_dir=False,
                        progress=False)
    assert db.class_names == ["a", "b", "c"]
    result = db.query("AVG NEURONS IN 1 WHERE class = 'b'")
    np.testing.assert_allclose(result.values, hidden[y.numpy() == 1].mean(axis=0), rtol=1e-5)


def test_a_random_transform_is_warned_of_and_a_fixed_one_is_not(rows):
    X, y, model, _ = rows
    ds = table(X, y).with_format("torch")

    def noisy(batch):
        return {"x": [torch.as_tensor(v) + 0.1 * torch.randn(5) for v in batch["x"]],
                "label": batch["label"]}

    with pytest.warns(diagql.DiagQLWarning, match="different inputs on two reads"):
        diagql.connect(model, ds.with_transform(noisy), cache_dir=False,
                       progress=False).query("AVG NEURONS IN 1")


def test_forms_that_are_not_items_are_refused_naming_what_to_pass(rows):
    X, y, model, _ = rows
    ds = table(X, y)
    splits = ds.train_test_split(test_size=0.25, seed=0)
    with pytest.raises(DiagQLError, match=r"a DatasetDict of splits \['train', 'test'\]: pass "
                                          r"one split, e.g. data\['test'\]"):
        diagql.connect(model, splits, cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="in 'arrow' format gives tables, not items: call "
                                          r"data.with_format\('torch'\)"):
        diagql.connect(model, ds.with_format("arrow"), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="no item indices"):
        diagql.connect(model, ds.to_iterable_dataset(), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="the data is a pandas DataFrame: pass its inputs"):
        diagql.connect(model, ds.to_pandas(), cache_dir=False, progress=False)


def test_images_left_as_pil_images_are_told_to_take_a_transform(rows):
    from PIL import Image

    _, _, model, _ = rows
    pictures = [Image.fromarray(np.full((4, 4), i, dtype=np.uint8)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": pictures, "label": [0, 1, 2] * 2},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    with pytest.raises(ExecutionError, match="the items hold PIL images: give the data a "
                                             "transform that turns them into tensors"):
        diagql.connect(model, ds, cache_dir=False, progress=False).query("AVG NEURONS IN 1")
