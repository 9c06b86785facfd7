"""Data in the forms each ecosystem hands it: dicts of named inputs, collators that pad per
batch, (mapping, y) pairs, tokenizer outputs, a named label key, and clear refusals.

The truth runs the tiny BERT (tests/text_models.py) on each sequence alone, unpadded, in plain
torch. Only the logits (``classifier``) and the pooled output (``bert.pooler``) are queried:
both have one row per item whatever the padding.
"""
from __future__ import annotations

import json
import re
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import diagql
from diagql.errors import BindError, DiagQLError
from diagql.model.forward import to_device
from tests import cli_in_process
from tests import text_models as tm

ATOL = 1e-5
BATCH = 16  # several batches of 60 items, the last one short


pytestmark = pytest.mark.usefixtures("one_thread")


class Truth:
    """Logits, pooled outputs, predictions and confidence of each item, run alone and unpadded."""

    def __init__(self, model, sequences, labels):
        logits, pooled = [], []
        with torch.no_grad():
            for s in sequences:
                ids = s[None]
                mask = torch.ones_like(ids)
                logits.append(model(input_ids=ids, attention_mask=mask).logits[0])
                pooled.append(model.bert(input_ids=ids, attention_mask=mask).pooler_output[0])
        self.logits = torch.stack(logits).to(torch.float64).numpy()
        self.pooled = torch.stack(pooled).to(torch.float64).numpy()
        self.labels = labels.numpy()
        self.predictions = self.logits.argmax(axis=1)
        probs = torch.softmax(torch.from_numpy(self.logits), dim=1).numpy()
        self.confidence = probs.max(axis=1)
        self.correct = self.predictions == self.labels


@pytest.fixture(scope="module")
def bert():
    return tm.tiny_bert()


@pytest.fixture(scope="module")
def tokens():
    return tm.token_data()


@pytest.fixture(scope="module")
def truth(bert, tokens):
    truth = Truth(bert, *tokens)
    # WHERE correct / incorrect below need both, and class 1 both in and out of them.
    assert 0.7 < truth.correct.mean() < 1.0
    assert 0 < ((truth.labels == 1) & truth.correct).sum() < (truth.labels == 1).sum()
    return truth


def topk(values: np.ndarray, k: int) -> np.ndarray:
    """Descending, ties to the lower index."""
    return np.argsort(-values, kind="stable")[:k]


def check_answers(db, truth: Truth, labelled: bool = True) -> None:
    """Profile, AVG over the logits (all items, a predicate, a sample) and TOPK over the
    pooled output, each against the truth."""
    profile = db.profile
    assert np.array_equal(profile.predictions, truth.predictions)
    assert np.allclose(profile.confidence, truth.confidence, atol=ATOL)
    assert profile.has_labels == labelled
    if labelled:
        assert np.array_equal(profile.labels, truth.labels)

    result = db.query("AVG NEURONS IN classifier")
    assert result.n_items == len(truth.logits)
    assert np.allclose(result.values, truth.logits.mean(axis=0), atol=ATOL)

    result = db.query("TOPK 3 NEURONS IN bert.pooler")
    expected = topk(truth.pooled.mean(axis=0), 3)
    assert np.array_equal(result.neurons, expected)
    assert np.allclose(result.values, truth.pooled.mean(axis=0)[expected], atol=ATOL)

    # Items far apart in the data: batches that are not runs of items.
    sample = db.sample("random(0.4)")
    db.execute("SET estimator = plain")  # the answer compared here is the sample mean
    result = db.query("AVG NEURONS IN classifier USING SAMPLE random(0.4)")
    db.execute("SET estimator = assisted")
    assert result.n_items == len(sample) < len(truth.logits)
    assert np.allclose(result.values, truth.logits[sample].mean(axis=0), atol=ATOL)

    if labelled:
        result = db.query("AVG NEURONS IN classifier WHERE incorrect")
        assert result.n_items == int((~truth.correct).sum())
        assert np.allclose(result.values, truth.logits[~truth.correct].mean(axis=0), atol=ATOL)
        result = db.query("AVG NEURONS IN classifier WHERE class = 1 AND correct")
        chosen = (truth.labels == 1) & truth.correct
        assert result.n_items == int(chosen.sum())
        assert np.allclose(result.values, truth.logits[chosen].mean(axis=0), atol=ATOL)


# --- (a)-(e): the forms of labelled text data ----------------------------------------------------

def _padded_dicts(s, y):
    return tm.DictDataset(s, y, length=12)


def _loader(s, y):
    # Its shuffling and batch size are the user's training settings: DiagQL uses neither.
    return DataLoader(tm.DictDataset(s, y), batch_size=5, shuffle=True, collate_fn=tm.pad_collate)


def _pair_of_tensors(s, y):
    return tm.pad(s, 12), y


def _pair_of_arrays(s, y):
    return {k: v.numpy() for k, v in tm.pad(s, 12).items()}, y.numpy()


def _items_of_mapping_and_y(s, y):
    return tm.PairDataset(s, y)


def _columns_with_label(s, y):
    return {**tm.pad(s), "label": y}


def _batch_encoding(s, y):
    from transformers import BatchEncoding

    return BatchEncoding({**tm.pad(s), "labels": y})


def _batch_encoding_and_y(s, y):
    from transformers import BatchEncoding

    return BatchEncoding(tm.pad(s)), y


class _BatchEncodingItems(Dataset):
    """Items that are BatchEncodings, as a tokenizer called per item returns them."""

    def __init__(self, s, y):
        self.items = tm.DictDataset(s, y, length=12)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from transformers import BatchEncoding

        return BatchEncoding(self.items[i])


def _list_of_padded_dicts(s, y):
    return [_padded_dicts(s, y)[i] for i in range(len(s))]


class _IndexedRows:
    """Indexed by position with a length, but no torch Dataset: how a Hugging Face
    ``datasets.Dataset`` (with ``set_format("torch")``) hands out its rows."""

    def __init__(self, s, y):
        self.rows = tm.DictDataset(s, y, length=12)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


FORMS = {"dataset-of-padded-dicts": _padded_dicts, "list-of-padded-dicts": _list_of_padded_dicts,
         "indexed-rows-not-a-dataset": _IndexedRows, "loader-with-padding-collate": _loader,
         "pair-mapping-of-tensors-y": _pair_of_tensors, "pair-mapping-of-arrays-y": _pair_of_arrays,
         "dataset-of-mapping-y": _items_of_mapping_and_y, "columns-label-key": _columns_with_label,
         "batch-encoding": _batch_encoding, "batch-encoding-y": _batch_encoding_and_y,
         "dataset-of-batch-encodings": _BatchEncodingItems}


@pytest.mark.parametrize("form", FORMS)
def test_labelled_text_data_in_each_form(form, bert, tokens, truth):
    db = diagql.connect(bert, FORMS[form](*tokens), batch_size=BATCH)
    check_answers(db, truth)


def test_the_loaders_collate_pads_each_of_diagqls_batches_in_index_order(bert, tokens, truth):
    sequences, labels = tokens
    calls = []

    def collate(items):
        batch = tm.pad_collate(items)
        calls.append((len(items), batch["input_ids"].shape[1]))
        return batch

    loader = DataLoader(tm.DictDataset(sequences, labels), batch_size=7, shuffle=True,
                        collate_fn=collate)
    db = diagql.connect(bert, loader, batch_size=BATCH, cache_dir=False)
    check_answers(db, truth)
    calls.clear()
    # One pass over every item (bert.pooler and the logits are read from the profile).
    db.query("AVG NEURONS IN bert.embeddings")
    lengths = np.array([len(s) for s in sequences])
    expected = [(len(lengths[i:i + BATCH]), int(lengths[i:i + BATCH].max()))
                for i in range(0, len(lengths), BATCH)]
    assert calls == expected


# --- (f): the label key named -------------------------------------------------------------------

def test_label_key_names_the_labels(bert, tokens, truth):
    sequences, labels = tokens
    data = tm.DictDataset(sequences, labels, length=12, label_key="sentiment")
    check_answers(diagql.connect(bert, data, label_key="sentiment", batch_size=BATCH), truth)
    columns = {**tm.pad(sequences), "sentiment": labels}
    check_answers(diagql.connect(bert, columns, label_key="sentiment", batch_size=BATCH), truth)


def test_a_mapping_without_a_label_key_is_data_without_labels(bert, tokens, truth):
    sequences, labels = tokens
    data = tm.DictDataset(sequences, labels, length=12, label_key=None)
    db = diagql.connect(bert, data, batch_size=BATCH)
    check_answers(db, truth, labelled=False)
    assert db.source.missing_labels == (
        "cannot find the labels among the batch keys ['attention_mask', 'input_ids']: name the "
        "key with label_key=... (CLI: --label-key)")
    with pytest.raises(BindError, match="WHERE incorrect needs the true labels"):
        db.query("AVG NEURONS IN classifier WHERE incorrect")


def test_cli_label_key(truth):
    done = cli_in_process.diagql(
        "--model", "tests.text_models:bert", "--data", "tests.text_models:sentiment_data",
        "--label-key", "sentiment", "--format", "json",
        "-e", "AVG NEURONS IN classifier WHERE incorrect; AVG NEURONS IN classifier")
    assert done.returncode == 0, done.stderr
    incorrect, every = map(json.loads, done.stdout.strip().splitlines())
    assert np.allclose(incorrect["values"], truth.logits[~truth.correct].mean(axis=0), atol=ATOL)
    assert np.allclose(every["values"], truth.logits.mean(axis=0), atol=ATOL)


def test_cli_refuses_a_label_key_the_data_lacks_in_one_line(capsys):
    from diagql.shell.cli import main

    assert main(["--model", "tests.text_models:bert", "--data", "tests.text_models:dict_data",
                 "--label-key", "mood", "--no-cache", "-e", "AVG NEURONS IN classifier"]) == 1
    err = capsys.readouterr().err
    assert ("label_key 'mood' is not among the batch keys ['attention_mask', 'input_ids', "
            "'labels']; name the one that holds the labels") in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as info:
        main(["--demo", "--label-key", "labels", "-e", "SHOW LAYERS"])
    assert info.value.code == 2
    assert "--label-key needs --data" in capsys.readouterr().err


# --- to_device: nested inputs, and the dtype of floating tensors only -------------------------

def test_to_device_casts_floating_tensors_only_through_nesting():
    from transformers import BatchEncoding

    Pair = namedtuple("Pair", "a b")
    x = BatchEncoding({"input_ids": torch.arange(6).reshape(2, 3),
                       "attention_mask": torch.ones(2, 3, dtype=torch.int64),
                       "nested": (torch.zeros(2), [torch.ones(2, dtype=torch.int32)]),
                       "pair": Pair(torch.zeros(2, dtype=torch.float16),
                                    torch.ones(2, dtype=torch.bool))})
    moved = to_device(x, torch.device("cpu"), torch.float64)
    assert type(moved) is dict and list(moved) == list(x)
    assert moved["input_ids"].dtype == moved["attention_mask"].dtype == torch.int64
    assert torch.equal(moved["input_ids"], x["input_ids"])
    assert moved["nested"][0].dtype == torch.float64 and moved["nested"][1][0].dtype == torch.int32
    assert isinstance(moved["pair"], Pair)
    assert (moved["pair"].a.dtype, moved["pair"].b.dtype) == (torch.float64, torch.bool)


def test_a_double_precision_model_gets_integer_token_ids(bert, tokens):
    sequences, labels = tokens
    model = tm.tiny_bert().to(torch.float64)
    truth = Truth(model, sequences, labels)
    db = diagql.connect(model, tm.DictDataset(sequences, labels, length=12), batch_size=BATCH)
    assert np.array_equal(db.profile.predictions, truth.predictions)
    assert np.allclose(db.query("AVG NEURONS IN classifier").values, truth.logits.mean(axis=0),
                       atol=1e-10)


# --- mappings and tuples for plain torch models ------------------------------------------------

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


class TakesABatch(nn.Module):
    """forward(batch) reads a dict itself."""

    def __init__(self):
        super().__init__()
        self.inner = TwoInputs()

    def forward(self, batch):
        return self.inner(batch["x"], batch["z"])


def _two_inputs_data(n=30):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g), torch.arange(n) % 3


class _Items(Dataset):
    def __init__(self, make):
        self.make, self.n = make, 30

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(i)


def test_plain_models_take_mappings_tuples_and_one_named_input():
    X, Z, y = _two_inputs_data()
    model = TwoInputs()
    with torch.no_grad():
        predictions = model(X, Z).argmax(dim=1).numpy()
        a = model.a(X).double().numpy()
    cases = [
        (model, "a", _Items(lambda i: {"x": X[i], "z": Z[i], "target": y[i]})),  # model(**inputs)
        (model, "a", _Items(lambda i: ((X[i], Z[i]), y[i]))),  # model(*x)
        (model, "a", ({"x": X, "z": Z}, y)),
        (TakesABatch(), "inner.a", _Items(lambda i: (({"x": X[i], "z": Z[i]},), y[i]))),
    ]
    for net, layer, data in cases:
        db = diagql.connect(net, data, batch_size=7)
        assert np.array_equal(db.profile.labels, y.numpy())
        assert np.array_equal(db.profile.predictions, predictions)
        assert np.allclose(db.query(f"AVG NEURONS IN {layer}").values, a.mean(axis=0), atol=ATOL)
    # One entry under a name forward does not take is its one input ({"image": ..., "label": ...}).
    one = nn.Linear(4, 3)
    db = diagql.connect(one, _Items(lambda i: {"image": X[i], "label": y[i]}), batch_size=7)
    with torch.no_grad():
        assert np.array_equal(db.profile.predictions, one(X).argmax(dim=1).numpy())
    assert np.array_equal(db.profile.labels, y.numpy())


# --- (g): refusals --------------------------------------------------------------------------------

def _refusal(model, data, **options) -> str:
    with pytest.raises(DiagQLError) as info:
        db = diagql.connect(model, data, cache_dir=False, **options)
        db.query(f"AVG NEURONS IN {'a' if isinstance(model, TwoInputs) else 'classifier'}")
    return info.value.message


def test_refusals_say_what_came_and_what_works(bert, tokens):
    sequences, labels = tokens
    X, Z, y = _two_inputs_data()
    net = TwoInputs()
    padded = tm.pad(sequences)
    assert _refusal(bert, tm.DictDataset(sequences, labels, length=12), label_key="mood") == (
        "label_key 'mood' is not among the batch keys ['attention_mask', 'input_ids', 'labels']; "
        "name the one that holds the labels")
    assert _refusal(bert, padded, label_key="mood") == (
        "label_key 'mood' is not among the data's keys ['attention_mask', 'input_ids']; name the "
        "one that holds the labels")
    assert _refusal(net, (X, y), label_key="y") == (
        "label_key 'y' names a key of mapping data, but the data is a pair (X, y) with X a "
        "Tensor; leave label_key out")
    assert _refusal(net, TensorDataset(X, y), label_key="y") == (
        "label_key 'y' names a key of mapping data, but the data is (x, y) items with x a "
        "Tensor; leave label_key out")
    assert _refusal(net, (X, y), label_key=3) == "label_key must be the name of a key, not 3"
    assert _refusal(net, _Items(lambda i: {"x": X[i], "w": Z[i], "y": y[i]})) == (
        "the model's forward(x, z) has no argument named 'w'; the entries of a mapping batch "
        "(all but the labels) are passed as keyword arguments: rename or drop those keys (a "
        "collate_fn can), name the key with label_key=... (CLI: --label-key) if they are the "
        "labels, or hand the mapping whole as ((mapping,), y)")
    # A feature named y taken as the labels by convention, the labels left under 'target'.
    refusal = _refusal(net, _Items(lambda i: {"x": X[i], "z": Z[i], "y": 2 - y[i],
                                              "target": y[i]}))
    assert refusal.startswith(
        "the model's forward(x, z) has no argument named 'target' ('target' reads as labels, "
        "but another key was taken as them: if 'target' holds the labels, say "
        "label_key='target');")
    # Named by label_key, not by convention: the message says neither (it had said the
    # convention took them).
    refusal = _refusal(net, _Items(lambda i: {"x": X[i], "z": Z[i], "y": 2 - y[i],
                                              "labels": y[i]}), label_key="y")
    assert "'labels' reads as labels, but another key was taken as them: if 'labels' " \
           "holds the labels, say label_key='labels')" in refusal
    assert _refusal(net, ((X, Z), y)) == (
        "X is a tuple of 2 tensors ((30, 4), (30, 2)); for a model with several inputs, pass a "
        "Dataset whose items are ((x1, x2, ...), y), or a dict of named inputs with the labels "
        "(a mapping, y)")
    # One tensor an item (a list comprehension's): its one shape, and torch.stack, not 30.
    assert _refusal(net, ([X[i] for i in range(30)], y)).startswith(
        "X is a list of 30 tensors (each (4,)): if each is one item's input, torch.stack(X) makes "
        "them the one tensor DiagQL takes; for a model with several inputs")
    unpadded = [{"input_ids": s, "labels": int(c)} for s, c in zip(sequences, labels)]
    assert _refusal(bert, unpadded).endswith(
        "; items of different lengths need a padding collate_fn: pass DataLoader(data, "
        "collate_fn=...), e.g. transformers' DataCollatorWithPadding(tokenizer)")
    # Images of different sizes: no tokenizer pads them, and batch_size=1 does not help.
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(2, 2)).eval()
    images = [(torch.rand(3, 8 + i % 3, 8), i % 2) for i in range(12)]
    assert _refusal(conv, images).endswith(
        "; items of different shapes (images of different sizes?) cannot be batched, at any "
        "batch size (DiagQL's probe reads 2 and 3 at once): resize them to one size in the "
        "data's transform, or pass DataLoader(data, collate_fn=...) that pads them")
    assert _refusal(net, TensorDataset(X, Z, y)) == (
        "the data's items have 3 parts; DiagQL needs (x, y): put several inputs in a tuple, "
        "((x1, x2), y), and leave out what is neither (an index, metadata) with a collate_fn "
        "or a Dataset that returns (x, y)")
    assert _refusal(bert, {"labels": labels}) == (
        "the data's keys ['labels'] hold only the labels; the model's inputs must be under "
        "other keys")
    assert _refusal(bert, {**padded, "attention_mask": padded["attention_mask"][1:]}) == (
        "the inputs under 'attention_mask' have 59 items but those under 'input_ids' have 60")
    assert _refusal(bert, (padded, labels[1:])) == (
        "the inputs have 60 items but there are 59 labels")
    ragged = _refusal(bert, {"input_ids": [s.tolist() for s in sequences], "labels": labels})
    assert ragged.startswith("the inputs under 'input_ids' cannot be turned into a tensor (")
    assert ragged.endswith("); sequences of different lengths must be padded, or passed as a "
                           "Dataset with a padding collate_fn")
    assert _refusal(bert, "some text") == (
        "data must be a torch Dataset of (x, y) or of dicts (or any sequence of such items: a "
        "list, a Hugging Face datasets.Dataset), a DataLoader, a pair (X, y) of tensors or "
        "arrays, or a mapping of named inputs (with its labels under a key, or as (mapping, y)), "
        "not str")
    dropping = DataLoader(tm.DictDataset(sequences, labels), collate_fn=lambda items:
                          tm.pad_collate(items[:-1] if len(items) > 1 else items))
    # Whichever batch comes first (a probe of the layers may read a few items).
    got = re.fullmatch(r"a batch of (\d+) items came back from the collate_fn with (\d+) inputs "
                       r"and (\d+) labels; DiagQL needs one input and label per item \(a "
                       r"collate that joins the items' rows, .*",
                       _refusal(bert, dropping, batch_size=BATCH))
    assert got and int(got[1]) - 1 == int(got[2]) == int(got[3])
    failing = DataLoader(tm.DictDataset(sequences, labels), collate_fn=lambda items: 1 / 0)
    assert _refusal(bert, failing) == (
        "reading the data raised ZeroDivisionError: division by zero (in the Dataset's "
        "__getitem__ or the DataLoader's collate_fn)")
    token_labels = tm.DictDataset(sequences, labels, length=12)
    token_labels.labels = torch.zeros(len(sequences), 12, dtype=torch.int64)
    assert re.fullmatch(r"labels must be one class index per item \(or one-hot rows\), got 12 "
                        r"values per item \(labels of shape \(12,\) per item\) that are not "
                        r"one-hot: .*", _refusal(bert, token_labels))


def test_a_label_given_as_a_one_element_list_is_that_label():
    # The default collate makes [3] per item a list holding one tensor of the batch's labels,
    # which had been read as one item's one-hot row ("2 inputs and 1 labels").
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(50, 8, generator=g), torch.randint(0, 3, (50,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    for items in ([(X[i], [int(y[i])]) for i in range(50)],  # (x, [label]) and {..., [label]}
                  [{"input": X[i], "labels": [int(y[i])]} for i in range(50)]):
        db = diagql.connect(model, items, cache_dir=False, progress=False)
        np.testing.assert_array_equal(db.profile.labels, y.numpy())
        with torch.no_grad():
            np.testing.assert_array_equal(db.profile.predictions, model(X).argmax(1).numpy())


def test_whole_number_labels_held_as_objects_are_those_labels():
    """A pandas object column of ints (numpy dtype object) was refused as "labels must be class
    indices (whole numbers), not 2, 0, 1", whole numbers all; strings, floats and booleans
    held so are still refused."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(50, 8, generator=g), torch.randint(0, 3, (50,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    held = np.array(y.tolist(), dtype=object)
    db = diagql.connect(model, (X, held), cache_dir=False, progress=False)
    np.testing.assert_array_equal(db.profile.labels, y.numpy())
    for odd in (np.array(["a"] * 50, dtype=object), np.array([True] * 50, dtype=object)):
        with pytest.raises(DiagQLError, match="labels must be class indices"):
            diagql.connect(model, (X, odd), cache_dir=False, progress=False).profile
