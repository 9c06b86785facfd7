"""Data in forms other ecosystems hand over: refused up front with what to pass instead (a
Hugging Face DatasetDict or a dataset in Arrow format, a pandas DataFrame), items holding
Python lists of numbers (a Hugging Face dataset in its default format) turned into tensors
before the default collate stacks them, the EmbeddingBag form (tokens concatenated beside
offsets) read as one row per item, and reading failures reported with what to do
(docs/ARCHITECTURE.md, "Data model")."""
from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from diagql.errors import DiagQLError, ExecutionError
from diagql.model.labels import LABEL_KEYS, MissingLabel, missing_label


def _from(data, package: str, name: str) -> bool:
    return any(cls.__name__ == name and cls.__module__.split(".")[0] == package
               for cls in type(data).__mro__)


def refuse_foreign(data) -> None:
    """Raise a DiagQLError naming what to pass for data DiagQL cannot read as items."""
    if _from(data, "datasets", "DatasetDict") or _from(data, "datasets", "IterableDatasetDict"):
        splits = list(data)
        raise DiagQLError(f"the data is a DatasetDict of splits {splits}: pass one split, e.g. "
                          f"data[{(splits or ['test'])[-1]!r}]")
    if _from(data, "datasets", "IterableDataset"):
        raise DiagQLError("a streaming (iterable) Hugging Face dataset has no item indices: "
                          "load it as a datasets.Dataset (streaming=False)")
    if _from(data, "datasets", "Dataset") and (data.format or {}).get("type") in (
            "arrow", "polars"):
        raise DiagQLError(f"a datasets.Dataset in {data.format['type']!r} format gives tables, "
                          f"not items: call data.with_format('torch')")
    if _from(data, "pandas", "DataFrame"):
        raise DiagQLError("the data is a pandas DataFrame: pass its inputs and labels as arrays, "
                          "(df[features].to_numpy(), df['label'].to_numpy()), or columns a "
                          "model takes by name, ({name: df[name].to_numpy(), ...}, labels), or "
                          "datasets.Dataset.from_pandas(df).with_format('torch')")


def collate_items(items: list):
    """torch's default collate, after turning each item's Python lists of numbers into
    tensors (a Hugging Face dataset in its default format, or its ``to_list()``, gives an
    item's inputs so; the default collate would transpose them into one tensor per position).
    Items (x, None) every one are data without labels, (batch of x, None), as a model of
    several inputs gives them ((x, t), None: inputs alone would read t as the label); one
    whose y is None among labelled ones is refused saying so, where the collate's own error
    ("Could not infer dtype of NoneType") did not say what was missing."""
    unlabelled = [isinstance(item, (tuple, list)) and len(item) == 2 and item[1] is None
                  for item in items]
    if items and all(unlabelled):
        return default_collate([_converted(item[0]) for item in items]), None
    if any(unlabelled):
        raise missing_label(unlabelled.index(True), "None")
    _same_keys(items)
    return default_collate([_converted(item) for item in items])


def _same_keys(items: list) -> None:
    """Refuse mapping items of one batch whose keys differ: the default collate takes a
    batch's keys from its first item, so a first item without "label" had dropped every
    item's label unsaid, and a later one failed with a bare KeyError. An item without a
    label key the others hold is named as an item without a label."""
    if not items or not all(isinstance(item, Mapping) for item in items):
        return
    every = set().union(*(item.keys() for item in items))
    for position, item in enumerate(items):
        lacking = every - set(item)
        if not lacking:
            continue
        label = next((key for key in LABEL_KEYS if key in lacking), None)
        if label is not None:
            raise missing_label(position, f"no {label!r} key, which other items hold")
        raise DiagQLError(f"the data's items hold different keys: one lacks "
                          f"{sorted(lacking, key=str)}, which others hold; DiagQL needs the "
                          f"same inputs in every item")


def _converted(item):
    if isinstance(item, Mapping):
        return {key: _as_numbers(value) for key, value in item.items()}
    if isinstance(item, tuple):
        return tuple(_as_numbers(value) for value in item)
    return item


def _as_numbers(value):
    """A list of numbers (or of equal-length lists of them) as a tensor; anything else as it
    is (ragged lists stay lists: stacking them fails with the padding hint)."""
    if not isinstance(value, list) or not value:
        return value
    try:
        array = np.asarray(value)
    except ValueError:  # ragged
        return value
    if array.dtype.kind not in "biuf":
        return value
    return torch.from_numpy(array)


def reading_hint(exc: Exception) -> str:
    """What to do about a failure of the default collate, or "" when there is nothing to add."""
    text = str(exc)
    if "stack expects each tensor to be equal size" in text:
        # The default collate stacks items: sequences of different lengths need padding,
        # images of different sizes a resize. DiagQL batches them whatever the batch size:
        # its probe reads 2 and 3 items at once (model/probing.py).
        shape = re.search(r"got \[([\d, ]*)\]", text)
        if shape is not None and shape.group(1).count(",") >= 1:
            return ("; items of different shapes (images of different sizes?) cannot be "
                    "batched, at any batch size (DiagQL's probe reads 2 and 3 at once): "
                    "resize them to one size in the data's transform, or pass "
                    "DataLoader(data, collate_fn=...) that pads them")
        return ("; items of different lengths need a padding collate_fn: pass "
                "DataLoader(data, collate_fn=...), e.g. transformers' "
                "DataCollatorWithPadding(tokenizer)")
    if "NoneType" in text:  # the default collate's, of an item's part that is None
        return ("; an item holds None: if it is an item without its label, leave such items "
                "out, or give the data without labels (a Dataset whose items are the inputs "
                "alone)")
    if "found <class 'PIL." in text:
        return ("; the items hold PIL images: give the data a transform that turns them into "
                "tensors (a Hugging Face dataset's with_transform, or torchvision's ToTensor)")
    return ""


@contextlib.contextmanager
def read_only():
    """torch's warning that a read-only array (``np.load(mmap_mode='r')``, ``df.values``)
    wrapped as a tensor could be written through it, silenced: DiagQL only reads the data,
    and the warning asks nothing of the user (docs/ARCHITECTURE.md, "Data model")."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                                category=UserWarning)
        yield


def read_batches(loader, length: int | None = None) -> Iterator:
    """The loader's batches; a failure of the user's Dataset or collate_fn becomes an
    ExecutionError that names it (the original stays chained for --debug). The collate's
    conversion of read-only arrays is not warned of (``read_only``)."""
    batches = iter(loader)
    while True:
        try:
            with read_only():
                batch = next(batches)
        except StopIteration:
            return
        except DiagQLError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported
            message, worker = _own_message(exc)
            raise ExecutionError(f"reading the data raised {type(exc).__name__}: {message} (in "
                                 f"the Dataset's __getitem__ or the DataLoader's collate_fn"
                                 f"{worker}){reading_hint(exc)}{_length_hint(exc, length)}"
                                 ) from exc
        yield batch


def _length_hint(exc: Exception, length: int | None) -> str:
    """An IndexError reading a Dataset whose __len__ promised the index: its length is
    named, for a __len__ larger than what the Dataset holds."""
    if not isinstance(exc, IndexError) or length is None:
        return ""
    return (f"; the Dataset's __len__ says {length:,} items: if it holds fewer, its __len__ "
            f"is wrong")


def _own_message(exc: Exception) -> tuple[str, str]:
    """The exception's message, and where it was raised when that was a DataLoader worker:
    torch's re-raise then holds the worker's whole traceback (--debug shows it), whose last
    line is the error itself."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text, ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    prefix = f"{type(exc).__name__}: "
    last = lines[-1][len(prefix):] if lines[-1].startswith(prefix) else lines[-1]
    head = lines[0].rstrip(".")  # "Caught OSError in DataLoader worker process 0"
    worker = head[head.find("DataLoader worker"):] if "DataLoader worker" in head else \
        "a DataLoader worker"
    return last, f", in {worker}"


def split_next(batches: Iterator, split, idx: np.ndarray):
    """The next batch, split into (x, y); an item without a label, placed in its batch by
    the collate or the labels' reading, is named by its index in the data."""
    try:
        return split(next(batches))
    except MissingLabel as exc:
        if exc.position is None:  # raised in a DataLoader worker: its message says what
            raise
        raise exc.of_item(int(idx[exc.position])) from None


def one_row_per_item(x, items: int) -> bool:
    """Whether a tuple input whose first part is not one row per item (or a mapping whose
    first tensor is not: a time-first (T, B, D) sequence) has another that is, or that says
    which item each of its rows is of: the PyTorch text tutorial's EmbeddingBag
    form, (tokens of every item concatenated, each item's offset), and graph batching's,
    (every graph's nodes joined, its edges, each node's graph: ``batch_index``), whose
    models give one row per item all the same."""
    parts = list(x.values()) if isinstance(x, Mapping) else \
        list(x[1:]) if isinstance(x, (tuple, list)) else []
    return any(isinstance(part, torch.Tensor) and part.ndim >= 1 and part.shape[0] == items
               or batch_index(part, items) for part in parts)


def batch_index(part, items: int) -> bool:
    """Whether ``part`` gives each joined row its item's place in the batch (torch_geometric's
    ``batch`` vector): integers 0 to ``items`` - 1, each at least once, in any order (a
    collate may join the rows otherwise than by item)."""
    if not isinstance(part, torch.Tensor) or part.ndim != 1 or len(part) < items or \
            part.is_floating_point() or part.dtype == torch.bool or not len(part):
        return False
    if int(part.min()) != 0 or int(part.max()) != items - 1:
        return False
    return bool((torch.bincount(part, minlength=items) > 0).all())


ORDER_CHECK_ITEMS = 16  # the items a user's collate_fn is checked on


def refuse_reordering(collate, dataset, n: int) -> None:
    """Refuse a collate_fn that reorders a batch's items (checked on items spread over the
    data: its first ones may tie, data stored by length, which a stable sort keeps in order):
    row j of a batch is taken for the j-th item asked for, so every answer that names items
    (TOPK INPUTS, labels, samples) would name others."""
    try:
        spread = np.unique(np.linspace(0, n - 1, min(n, ORDER_CHECK_ITEMS)).round().astype(int))
        items = [dataset[int(i)] for i in spread]
        reordering = reorders(collate, items)
    except Exception:  # noqa: BLE001 - the pass's own reading says what failed, and where
        reordering = False
    if reordering:
        raise DiagQLError("the DataLoader's collate_fn returns a batch's items in another "
                          "order than it is given them (sorted by length?); DiagQL takes a "
                          "batch's row j for the j-th item: keep their order (pack with "
                          "enforce_sorted=False, or sort inside the model)")


def reorders(collate, items: list) -> bool:
    """Whether ``collate`` returns a batch's rows in another order than it was given its
    items (a collate that sorts by length for ``pack_padded_sequence(enforce_sorted=True)``):
    the items collated in reverse give some part of the batch (the labels) in reverse unless
    they are reordered; a part that is not one row per item (an EmbeddingBag's offsets) may
    not. A collate that gives different batches for the same items (random crops) is not
    judged."""
    if len(items) < 2:
        return False
    forward, again, backward = collate(items), collate(items), collate(items[::-1])
    judged = False
    for a, b, c in zip(tensors_in(forward), tensors_in(again), tensors_in(backward)):
        if a.ndim == 0 or a.shape[0] != len(items) or a.shape != c.shape:
            continue
        if a.shape != b.shape or not torch.equal(a, b):
            return False  # not the same batch twice
        if torch.equal(a.flip(0), a):
            continue  # alike both ways (every label the same): it cannot tell
        if torch.equal(a.flip(0), c):
            return False  # one row per item, in order (an EmbeddingBag's offsets are not)
        judged = True
    return judged


def tensors_in(batch) -> Iterator[torch.Tensor]:
    """The tensors of a batch, in its mappings, tuples and lists too, in order."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from tensors_in(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from tensors_in(value)


def is_sequence_of_items(data) -> bool:
    """A map-style collection that is not a torch Dataset: a list of items (other than a pair
    (X, y)), or an object indexed by position with a length, such as a Hugging Face
    ``datasets.Dataset`` (its items are dicts)."""
    if isinstance(data, list):
        # Two items, not a pair [X, y]: two mappings, or two (x, y) with one label each.
        return len(data) != 2 or all(isinstance(d, Mapping) for d in data) or \
            all(isinstance(d, tuple) and len(d) == 2 and _one_label(d[1]) for d in data)
    if isinstance(data, (tuple, str, bytes, Mapping, torch.Tensor, np.ndarray)):
        return False
    return hasattr(type(data), "__getitem__") and hasattr(type(data), "__len__")


def _one_label(value) -> bool:
    """One item's label as items carry it: a number, a name, a one-element tensor, array or
    list (the labels as_labels reads, one per item)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 0 or (value.ndim == 1 and value.shape[0] == 1)
    if isinstance(value, list):
        return len(value) == 1 and _one_label(value[0])
    return isinstance(value, (int, float, np.integer, np.floating, str))


def inputs_alone(batch):
    """A batch of (items, None): its inputs, a mapping's label entries left out; a tuple
    (x, y) or (x1, x2) is refused, being either (review SY13: its second part had been
    dropped)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 1:  # a TensorDataset(X)'s items
        batch = batch[0]
    elif isinstance(batch, (tuple, list)):
        raise DiagQLError(
            f"(items, None) reads items without labels: mappings (their "
            f"{'/'.join(LABEL_KEYS)} entries left out) or bare inputs, but these items have "
            f"{len(batch)} parts, a label or another input; give items of the inputs alone, "
            f"((x1, x2),) for several, or (x, y) items as they are")
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    return batch


def unlabelled_items(data) -> bool:
    """Whether ``data`` is (a loader, a Dataset or a list of mappings, None): those items with
    no labels read. A pair (X, None) of inputs stays a pair: a tensor, an array, a list of rows
    (a list of tuples of numbers, as a database cursor gives them, is X's rows too)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and data[1] is None):
        return False
    items = data[0]
    if isinstance(items, (DataLoader, Dataset)):
        return True
    return is_sequence_of_items(items) and len(items) > 0 and isinstance(items[0], Mapping)


def is_factory(value) -> bool:
    """A callable that makes the model or the data (not a module or a data set itself), as
    engine='ray' takes one; a class is one, a Dataset's too (its class has __getitem__: sweep
    SY9 had it refused)."""
    return isinstance(value, type) or (
        callable(value) and not isinstance(value, torch.nn.Module)
        and not hasattr(value, "__getitem__") and not hasattr(value, "__len__"))
