"""Uniform access to the user's data in the forms each ecosystem hands it: a Dataset, a
DataLoader, a pair (X, y), and mappings of named inputs (tokenizer and collator outputs)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import (DataLoader, Dataset, IterableDataset, Subset, TensorDataset,
                              default_collate, default_convert)

from diagql.errors import DiagQLError
from diagql.model.data_forms import collate_items, inputs_alone, is_factory, \
    is_sequence_of_items, one_row_per_item, read_batches, read_only, refuse_foreign, \
    refuse_reordering, split_next, unlabelled_items
from diagql.model.labels import LABEL_KEYS, as_labels, refuse_batches
from diagql.model.loader_items import loader_items
from diagql.progress import Progress

Batch = tuple[np.ndarray, object, "np.ndarray | None"]  # (item indices, model input, labels)

FORMS = ("a torch Dataset of (x, y) or of dicts (or any sequence of such items: a list, a "
         "Hugging Face datasets.Dataset), a DataLoader, a pair (X, y) of tensors or arrays, or a "
         "mapping of named inputs (with its labels under a key, or as (mapping, y))")
NAME_LABEL_KEY = "name the key with label_key=... (CLI: --label-key)"


def spans(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of each batch of ``n`` items, ``batch_size`` at most but the last's one
    more where it would hold one item alone after others: a forward ending in ``.squeeze()``
    makes a batch of one item's output (3,) where (1, 3) was meant (257 items failed in
    batches of 256). Not in batches of 1, which hold one item each by choice (padding no
    item: the last two had been run together, the one padded to the other's length)."""
    cuts = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if batch_size > 1 and len(cuts) > 1 and cuts[-1][1] - cuts[-1][0] == 1:
        cuts[-2:] = [(cuts[-2][0], n)]
    return cuts


def loader_batch_size(data) -> int | None:
    """A DataLoader's batch size where its collate_fn is the user's own, which may pad or
    normalise per batch (the connection's default then: session/connection.py); else None."""
    if isinstance(data, DataLoader) and data.collate_fn not in (default_collate, default_convert):
        return data.batch_size
    return None


class ItemSource:
    """Items addressed by their index in the data set, served in batches in index order.

    A batch's model input is a tensor, a tuple (spread over forward's positional arguments)
    or a dict (passed as keyword arguments, its label key removed); see connect().
    """

    def __init__(self, data, label_key: str | None = None):
        if label_key is not None and not (isinstance(label_key, str) and label_key):
            raise DiagQLError(f"label_key must be the name of a key, not {label_key!r}")
        self.label_key = label_key
        # Why mapping data has no labels, once seen: a refusal can say what to name.
        self.missing_labels: str | None = None
        self._pair = None
        self._columns: dict[str, torch.Tensor] | None = None
        self._column_labels: np.ndarray | None = None
        self._dataset = None
        self._collate, self._order_checked = None, False  # checked: refuse_reordering
        self._workers, self._worker_options = 0, {}
        self._labelled: bool | None = None  # whether the first item has a label, once read
        # A loader's sampler's items, sorted (model/loader_items.py); None: every item.
        self.indices: np.ndarray | None = None
        self._label_classes: list | None = None  # [label_classes()], once read
        # (a loader, a Dataset or items, None): those items, their labels not read (per-token
        # labels a token classifier's items carry had been refused, and so was this way out).
        self._no_labels = unlabelled_items(data)
        if self._no_labels:
            self._refuse_label_key("(items, None), whose None says it has no labels")
            data = data[0]
        refuse_foreign(data)
        if isinstance(data, torch.nn.Module):  # a Sequential has a length and items: modules
            raise DiagQLError(f"data must be the items, not a model ({type(data).__name__})"
                              f"{_form_hint(data)}")
        if isinstance(data if not isinstance(data, DataLoader) else data.dataset,
                      IterableDataset):
            raise DiagQLError("an IterableDataset has no item indices; pass a map-style "
                              "Dataset or a pair (X, y)")
        if isinstance(data, DataLoader):
            self.indices, self._dataset, self._workers, self._worker_options, self._collate = \
                _loader_parts(data)
        elif isinstance(data, Dataset) or is_sequence_of_items(data):
            self._dataset = data
        elif isinstance(data, Mapping):
            self._set_columns(data, None)
        elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Mapping):
            self._set_columns(data[0], data[1])
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            self._refuse_label_key(f"a pair (X, y) with X a {type(data[0]).__name__}")
            # (X, None) is data without labels: queries that need none still work.
            X = _as_tensor(data[0], "X")
            _check_rows(X, data[1])
            self._pair = (X, None if data[1] is None else as_labels(data[1]))
            if self._pair[1] is not None and len(self._pair[0]) != len(self._pair[1]):
                raise DiagQLError(f"X has {len(self._pair[0])} items but y has "
                                  f"{len(self._pair[1])} labels")
        else:
            raise DiagQLError(f"data must be {FORMS}, not {_describe(data)}{_form_hint(data)}")
        # Items are read by index, so the count must be known and not zero: an empty data set
        # would reach the catalog probe as batches of no items (a ValueError of range or
        # DataLoader), a Dataset without __len__ as a TypeError.
        try:
            n = len(self)
        except TypeError:
            raise DiagQLError(f"the data ({_describe(data)}) has no length; DiagQL reads items "
                              f"by index, so a Dataset must define __len__") from None
        if n == 0:
            raise DiagQLError(f"the data ({_describe(data)}) has no items")

    def __len__(self) -> int:
        if self._pair is not None:
            return len(self._pair[0])
        if self._columns is not None:
            return len(next(iter(self._columns.values())))
        return len(self._dataset)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the items are read from where the data holds them (a pair, columns, a
        TensorDataset, also under Subsets): what session/changes.py stamps."""
        held = [*(self._pair or ()), *(self._columns or {}).values(), self._column_labels]
        dataset = self._dataset
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        held += list(getattr(dataset, "tensors", ())) if isinstance(dataset, TensorDataset) else []
        return [t for t in held if isinstance(t, torch.Tensor)]

    def columns(self) -> tuple[dict, object] | None:
        """A mapping's columns as read (the model's keyword inputs by name, one row per item)
        and its labels (None without), or None for data in another form: what the data's
        fingerprint covers for this form (storage/fingerprint.py), the label key chosen."""
        if self._columns is None:
            return None
        return self._columns, self._column_labels

    @property
    def collates(self) -> bool:
        """Whether a user's collate_fn makes the batches (it may pad to a batch's longest)."""
        return self._collate is not None

    def labelled(self) -> bool:
        """Whether the data has labels, as cheaply as can be told: a pair's or a mapping's are
        at hand, other data's first item says (the profile pass checks every item), so that
        the binder refuses a query that needs labels before it looks at class values."""
        if self._pair is not None or self._columns is not None:
            return (self._pair[1] if self._pair is not None else self._column_labels) \
                is not None
        if self._labelled is None:
            self._labelled = next(self.batches(np.arange(1), 1))[2] is not None
        return self._labelled

    def label_classes(self, progress=None, batch_size: int = 256) -> int | None:
        """The number of classes the labels need (the largest + 1), None when some item has
        none. A pair's or a mapping's labels are at hand; other data is read whole (its
        inputs too, shown by ``progress``, a diagql.progress.Progress), once, which only an
        output the default cannot otherwise read asks for (model/scores.py, ``choose``)."""
        if self._pair is not None or self._columns is not None:
            y = self._pair[1] if self._pair is not None else self._column_labels
            return None if y is None else int(y.max(initial=-1)) + 1
        if self._label_classes is None:
            largest = -1
            with (progress or Progress(False)).task("reading the labels", len(self)) as advance:
                for idx, _, y in self.batches(np.arange(len(self)), batch_size):
                    if y is None:
                        largest = None
                        break
                    largest = max(largest, int(y.max(initial=-1)))
                    advance(len(idx))
            self._label_classes = [None if largest is None else largest + 1]
        return self._label_classes[0]

    def batches(self, indices: np.ndarray, batch_size: int) -> Iterator[Batch]:
        indices = np.asarray(indices, dtype=np.int64)  # in batches of ``spans``
        cuts = spans(len(indices), batch_size)
        if self._pair is not None or self._columns is not None:
            for start, end in cuts:
                idx = indices[start:end]
                if self._pair is not None:
                    X, y = self._pair
                    yield idx, _take(X, idx), None if y is None else y[idx]
                else:
                    y = self._column_labels
                    yield (idx, {k: _take(v, idx) for k, v in self._columns.items()},
                           None if y is None else y[idx])
            return
        # The loader's collate_fn makes each of our batches from its items, in index order:
        # a padding collate pads to the longest item of our batch, not of the user's.
        if self._collate is not None and not self._order_checked:
            refuse_reordering(self._collate, self._dataset, len(self))
            self._order_checked = True
        # Over the user's own dataset (a loader's sampler's items by their dataset indices),
        # which a worker_init_fn finds as get_worker_info().dataset (to open a file in it).
        dataset, at = (self._dataset.dataset, self.indices[indices]) \
            if self.indices is not None else (self._dataset, indices)
        workers, options = _workers_for(len(indices), self._workers, self._worker_options)
        loader = DataLoader(dataset, batch_sampler=[at[start:end].tolist() for start, end in cuts],
                            num_workers=workers, collate_fn=self._collate or collate_items,
                            **options)
        batches = read_batches(loader, len(dataset))
        for start, end in cuts:  # the loader makes one batch of each
            idx = indices[start:end]
            # An item without a label is named by its index in the user's dataset.
            x, y = split_next(batches, self._split, at[start:end])
            n = _batch_len(x)
            if n != len(idx) and one_row_per_item(x, len(idx)):
                n = len(idx)  # tokens concatenated beside offsets (EmbeddingBag's form)
            if n != len(idx) or (y is not None and len(y) != n):
                got = f"{n} inputs" + ("" if y is None else f" and {len(y)} labels")
                raise DiagQLError(_not_one_per_item(len(idx), got))
            yield idx, x, y

    # --- the forms of a batch ------------------------------------------------------------------

    def _set_columns(self, mapping: Mapping, y) -> None:
        """A mapping of arrays, one row per item: its label key (if any) holds the labels
        unless ``y`` gives them; the other keys are the model's keyword inputs."""
        columns = _columns_of(mapping)
        labels = self._pop_labels(columns, "the data's keys", given=y is not None)
        if y is not None:
            labels = y  # given explicitly: a label column in the mapping is left out of the inputs
        sizes = _same_sizes(columns)
        first = next(iter(sizes))
        if labels is not None:
            labels = as_labels(labels)
            if len(labels) != sizes[first]:
                raise DiagQLError(f"the inputs have {sizes[first]} items but there are "
                                  f"{len(labels)} labels")
        self._columns, self._column_labels = columns, labels

    def _pop_labels(self, inputs: dict, where: str, given: bool = False):
        """Take the label entry out of a mapping's ``inputs`` (None when it has none: then
        ``missing_labels`` says what to name, unless the labels are ``given`` beside it);
        refuse a mapping that holds nothing else."""
        keys = _keys(inputs)
        key = self._label_key_of(inputs, where)
        labels = inputs.pop(key) if key is not None else None
        if key is None and not given:
            self.missing_labels = f"cannot find the labels among {where} {keys}: {NAME_LABEL_KEY}"
        if not inputs:
            raise DiagQLError(f"{where} {keys} hold only the labels; the model's inputs must "
                              f"be under other keys")
        return labels

    def _split(self, batch):
        """A collated batch is (x, y), [x, y], a mapping (its label key holds y) or a bare x;
        of (items, None), x alone, a mapping's label entry left out."""
        if self._no_labels:
            return inputs_alone(batch), None
        if isinstance(batch, Mapping):
            inputs = dict(batch)
            y = self._pop_labels(inputs, "the batch keys")
            return inputs, None if y is None else as_labels(y)
        if isinstance(batch, (tuple, list)):
            if len(batch) > 2:
                raise DiagQLError(f"the data's items have {len(batch)} parts; {_TWO_PARTS}")
            x, y = batch[0], (batch[1] if len(batch) == 2 else None)
            if isinstance(x, Mapping):
                inputs = dict(x)
                key = self._label_key_of(inputs, "the input keys", required=y is None)
                if key is not None:
                    labels = inputs.pop(key)
                    y = labels if y is None else y  # y given beside the mapping wins
                elif y is None:
                    self.missing_labels = f"cannot find the labels among the input keys " \
                                          f"{_keys(x)}: {NAME_LABEL_KEY}"
                return inputs, None if y is None else as_labels(y)
            self._refuse_label_key(f"(x, y) items with x a {type(x).__name__}")
            refuse_batches(x, y)
            return x, None if y is None else as_labels(y)
        self._refuse_label_key(f"items of bare inputs, a {type(batch).__name__} each")
        return batch, None

    def _label_key_of(self, mapping: Mapping, what: str, required: bool = True) -> str | None:
        """The named label key (which must be there when the labels come from the mapping),
        else the first conventional one present, else None: data without labels."""
        if self.label_key is not None:
            if self.label_key in mapping:
                return self.label_key
            if required:
                raise DiagQLError(f"label_key {self.label_key!r} is not among {what} "
                                  f"{_keys(mapping)}; name the one that holds the labels")
            return None
        return next((k for k in LABEL_KEYS if k in mapping), None)

    def _refuse_label_key(self, data: str) -> None:
        if self.label_key is not None:
            raise DiagQLError(f"label_key {self.label_key!r} names a key of mapping data, but "
                              f"the data is {data}; leave label_key out")


_TWO_PARTS = ("DiagQL needs (x, y): put several inputs in a tuple, ((x1, x2), y), and leave "
              "out what is neither (an index, metadata) with a collate_fn or a Dataset that "
              "returns (x, y)")


FEW_IN_PROCESS = 64  # items a read takes in this process whatever the loader's workers


def _workers_for(n: int, workers: int, options: dict) -> tuple[int, dict]:
    """A read of ``n`` items: the loader's workers and their options, or none for a few items
    (the probe's reads of one to 64 items, dozens of them): each read starts its workers anew,
    3 s a worker where processes spawn (macOS, Windows), and SHOW LAYERS had taken 139 s over
    a loader of 2 workers. Not where a worker_init_fn prepares what the items are read with
    (a file opened per worker)."""
    if n <= FEW_IN_PROCESS and options.get("worker_init_fn") is None:
        return 0, {}
    return workers, options


def _loader_parts(data: DataLoader) -> tuple:
    """What ItemSource keeps of a DataLoader: its sampler's items (None: every one), their
    dataset, its workers, what they need to read (an HDF5 file opened per worker) and its
    collate_fn (None: DiagQL's, for torch's default, as it also takes a Hugging Face dataset's
    lists of numbers, and for batch_size=None's default_convert: ours batches the items)."""
    indices = loader_items(data)
    dataset = data.dataset if indices is None else Subset(data.dataset, indices.tolist())
    options = {"worker_init_fn": data.worker_init_fn,
               "multiprocessing_context": data.multiprocessing_context} \
        if data.num_workers else {}
    collate = None if data.collate_fn in (default_convert, default_collate) else data.collate_fn
    return indices, dataset, data.num_workers, options, collate


def dataset_indices(source: ItemSource, items: np.ndarray) -> np.ndarray:
    """The data set's own indices of ``items`` (positions among the items a source reads):
    through a loader's sampler's items (a validation split's), else the same."""
    items = np.asarray(items, dtype=np.int64)
    return items.copy() if source.indices is None else source.indices[items]


def _take(X: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """The rows ``idx`` of the user's X, always a copy: a model that scales its input in
    place (``x /= 255``) had rescaled the user's own tensor through a run's view on every
    pass, and each pass answered about other inputs. The copy costs nothing measurable
    beside the forward (benchmarks/README.md, "2026-12-05")."""
    if len(idx) and bool(np.all(np.diff(idx) == 1)):  # a run of items (a full pass)
        return X[int(idx[0]):int(idx[-1]) + 1].clone()
    return X[torch.from_numpy(idx)]


def _keys(mapping: Mapping) -> list:
    return sorted(mapping, key=str)


def _form_hint(data) -> str:
    """What to pass instead of data in no form DiagQL takes, where there is a likely way."""
    if isinstance(data, torch.Tensor) or type(data).__name__ == "ndarray":
        # Inputs alone: the one form users try first for data without labels.
        return "; for inputs without labels, pass (X, None)"
    if isinstance(data, torch.nn.Module):  # the arguments swapped, or the model twice
        return "; it is a model: connect(model, data) takes the model first, then the data"
    if is_factory(data):  # a Dataset class too, as Ray's workers take one
        return ("; a function that makes the data is taken by engine='ray' alone, whose "
                "workers each call it: here, pass what it returns, data=make()")
    if isinstance(data, Iterator):  # a generator, a map object: read once
        return ("; an iterator is read once, and DiagQL reads items by index, again and again: "
                "pass list(...) of its items, or a Dataset")
    return ""


def _columns_of(mapping: Mapping) -> dict[str, torch.Tensor]:
    """A mapping's columns as tensors, each one row per item (text refused: the tokenizer's
    outputs are the inputs)."""
    if not mapping:
        raise DiagQLError("the data is an empty mapping; it needs the model's inputs under "
                          "their names, one row per item")
    columns = {}
    for key, value in mapping.items():
        if _is_text(value):
            raise DiagQLError(f"the data's column {key!r} holds text, not numbers; a "
                              f"mapping's columns are the model's keyword inputs: leave it "
                              f"out (the tokenizer's outputs are the inputs)")
        columns[key] = _as_tensor(value, f"the inputs under {key!r}")
        if columns[key].ndim == 0:
            raise DiagQLError(f"the inputs under {key!r} are a single value, not one row "
                              f"per item")
    return columns


def _same_sizes(columns: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each column's rows, refused unless they are as many in every one."""
    sizes = {k: len(v) for k, v in columns.items()}
    first = next(iter(sizes))
    for k, size in sizes.items():
        if size != sizes[first]:
            raise DiagQLError(f"the inputs under {k!r} have {size} items but those under "
                              f"{first!r} have {sizes[first]}")
    return sizes


def _describe(data) -> str:
    if isinstance(data, (tuple, list)):
        return f"a {type(data).__name__} of {len(data)}"
    return type(data).__name__


def _not_one_per_item(items: int, got: str) -> str:
    return (f"a batch of {items} items came back from the collate_fn with {got}; DiagQL needs "
            f"one input and label per item (a collate that joins the items' rows, as graph "
            f"batching does its nodes beside a batch index, may give each item's offset among "
            f"them, one per item, as EmbeddingBag takes them)")


def _batch_len(x) -> int:
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            raise DiagQLError("a batch's input is a single value, not one row per item")
        return x.shape[0]
    if isinstance(x, (tuple, list)) and x:
        return _batch_len(x[0])
    if isinstance(x, Mapping):
        # The first tensor gives the size: a collate may also pass lists of strings through.
        tensors = [v for v in x.values() if isinstance(v, torch.Tensor)]
        if tensors:
            return _batch_len(tensors[0])
        raise DiagQLError(f"none of the batch's inputs {_keys(x)} is a tensor; a collate_fn "
                          f"must turn them into tensors")
    raise DiagQLError(f"cannot batch model inputs of type {type(x).__name__}")


def _check_rows(X: torch.Tensor, y) -> None:
    """Refuse labels of another length than X's items before reading them: y of shape (1, n)
    or (classes, n), labels laid out the other way, had been refused as labels per token or
    multi-hot labels (sweep SX10)."""
    shape = getattr(y, "shape", None)
    if shape is None or len(shape) < 2 or shape[0] == len(X):
        return
    turned = " (its second axis has X's length: transpose it)" if shape[1] == len(X) else ""
    raise DiagQLError(f"X has {len(X)} items but y has {shape[0]} rows, of shape "
                      f"{tuple(shape)}{turned}")


def _as_tensor(X, name: str) -> torch.Tensor:
    if isinstance(X, torch.Tensor):
        return X
    if isinstance(X, (tuple, list)) and len(X) > 1 and all(
            isinstance(part, torch.Tensor) and part.ndim > 0 for part in X):
        kinds = list(dict.fromkeys(tuple(part.shape) for part in X))
        shapes = ", ".join(str(shape) for shape in kinds[:4]) + (", ..." if len(kinds) > 4 else "")
        shapes = f"each {shapes}" if len(kinds) == 1 else shapes  # not one shape for two (SW1)
        stacked = f": if each is one item's input, torch.stack({name}) makes them the one " \
            f"tensor DiagQL takes;" if len(kinds) == 1 and len(X) > 4 else ";"
        raise DiagQLError(f"{name} is a {type(X).__name__} of {len(X)} tensors ({shapes})"
                          f"{stacked} for a model with several inputs, pass a Dataset whose "
                          f"items are ((x1, x2, ...), y), or a dict of named inputs with the "
                          f"labels (a mapping, y)")
    try:
        with read_only():  # a memory-mapped array is read where it lies, never written
            array = np.asarray(X)
            if any(stride < 0 for stride in array.strides):  # a flip (BGR to RGB): a copy
                array = np.ascontiguousarray(array)
            return torch.as_tensor(array)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DiagQLError(f"{name} cannot be turned into a tensor ({exc}); sequences of "
                          f"different lengths must be padded, or passed as a Dataset with a "
                          f"padding collate_fn") from None


def _is_text(value) -> bool:
    """A column of strings (a dataset's raw "text" beside its token ids)."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "US" or (value.dtype.kind == "O" and len(value) > 0
                                              and isinstance(value.flat[0], str))
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], str)


def listed_items(source: ItemSource) -> list | tuple | None:
    """The items, where the data is a Python list (or tuple) of them, a loader's included:
    what session/changes.py stamps item by item, since they hold no tensor in common."""
    return source._dataset if isinstance(source._dataset, (list, tuple)) else None
