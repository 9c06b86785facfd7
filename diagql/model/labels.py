"""Labels as DiagQL reads them: one whole class index per item, from integers, floats
holding integers, a 0-d tensor per item, rows of one, or one-hot rows; multi-hot, soft,
per-token and string labels are refused saying why, and an item without a label (NaN, None,
pandas' NA) by its index (docs/ARCHITECTURE.md, "Data model")."""
from __future__ import annotations

import numpy as np
import torch

from diagql.errors import DiagQLError

# The keys a mapping item's label is looked for under, in this order, unless connect's
# ``label_key`` names one (Hugging Face uses "labels" and "label"; plain PyTorch code "y"
# and "target(s)").
LABEL_KEYS = ("labels", "label", "y", "target", "targets")
# What a model that is no classifier (a regression) is told to do with its targets, and what
# follows: its outputs still read as class scores (one output as a binary classifier's logit),
# which the profile cannot tell from a regression's (SS9: a regression given so was profiled,
# unsaid, as predicting class 1 where its output is > 0).
AS_UNLABELLED = ("give the data without them, (X, None), to query its layers; its outputs are "
                 "then read as class scores (one output as a binary classifier's logit, class "
                 "1 where > 0), so leave predicted, confidence and correct out of WHERE, and "
                 "sample with random, not by a margin that is then the output's distance from "
                 "0 (maxmargin, AUTO's default)")


class MissingLabel(DiagQLError):
    """An item has no label (NaN, None, pandas' NA). ``position`` is its place among the
    labels read together (a batch's, for a Dataset: ItemSource.batches names the item
    instead); None where it is not known (raised in a DataLoader worker)."""

    def __init__(self, message: str, position: int | None = None, what: str = ""):
        super().__init__(message)
        self.position, self.what = position, what

    def of_item(self, item: int) -> "MissingLabel":
        """The same refusal, naming the item by its index in the data."""
        return MissingLabel(missing_label_message(item, self.what), what=self.what)


def missing_label(position: int, what: str, count: str = "") -> MissingLabel:
    return MissingLabel(missing_label_message(position, what, count), position, what)


def missing_label_message(item: int, what: str, count: str = "") -> str:
    return (f"item {item} has no label ({what}{count}): DiagQL needs a label for every item or "
            f"for none. Leave out the items without one, or give the data without labels: "
            f"(X, None), a Dataset whose items are (x, None) every one or the inputs alone, or "
            f"-1 as every item's label")


def _missing(value) -> bool:
    """None, a float NaN, pandas' NA: a label not given."""
    return value is None or (isinstance(value, float) and value != value) \
        or type(value).__name__ == "NAType"


def _what(value) -> str:
    return "None" if value is None else "NaN" if isinstance(value, float) else "NA"


def refuse_batches(x, y) -> None:
    """Items that are whole batches (``list(loader)`` given as the data): each item's inputs
    lead with as many rows as it has labels. Said before the labels are refused as per-token
    ones, which they look like."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        return
    if y.ndim == 2 and y.shape[1] > 1 and x.ndim >= 3 and tuple(x.shape[:2]) == tuple(y.shape):
        raise DiagQLError(f"each item of the data has {y.shape[1]} labels beside inputs of shape "
                          f"{tuple(x.shape[1:])}: if the data is a list of batches "
                          f"(list(loader)), pass the DataLoader or its dataset instead; DiagQL "
                          f"reads one item, with one label, at a time")


def _refuse_several_targets(y) -> None:
    """A multi-task target per item, (y, box) or {"labels": y, "boxes": b} as detection and
    multi-head training loops take them, collated: numpy's "inhomogeneous shape" had escaped
    as a traceback, and a mapping was called "a single value"."""
    from collections.abc import Mapping

    if isinstance(y, Mapping):
        keys = ", ".join(repr(k) for k in list(y)[:4])
        raise DiagQLError(f"each item's target is a mapping ({keys}): DiagQL needs one class "
                          f"index per item; give items (x, target[<the class key>]), e.g. a "
                          f"Dataset that returns them, or the data without labels, (X, None)")
    if isinstance(y, (list, tuple)) and len(y) > 1 and \
            all(isinstance(part, torch.Tensor) for part in y) and \
            len({tuple(part.shape) for part in y}) > 1:
        shapes = ", ".join(str(tuple(part.shape[1:])) for part in y[:4])
        raise DiagQLError(f"each item's target has {len(y)} parts of shapes {shapes} (a "
                          f"multi-task target): DiagQL needs one class index per item; give "
                          f"items (x, y) with y the class alone, e.g. a Dataset that returns "
                          f"them, or the data without labels, (X, None)")


def as_labels(y) -> np.ndarray:
    if isinstance(y, (list, tuple)) and len(y) == 1 and isinstance(y[0], torch.Tensor) \
            and y[0].ndim == 1:
        # Items whose label is a one-element list or tuple ([3]), in any form of batch: the
        # default collate makes them a list holding one tensor of the batch's labels, which
        # read as given had passed for one item's row of labels.
        y = y[0]
    _refuse_several_targets(y)
    if isinstance(y, torch.Tensor):
        if y.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds each exactly
            y = y.float()
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 0:
        raise DiagQLError("the labels are a single value, not one class index per item")
    if y.ndim != 1:
        shape = y.shape
        y = y.reshape(len(y), -1)
        if y.shape[1] != 1 and one_hot(y):
            # Each row names one class unmistakably: its index is the label.
            return y.argmax(axis=1).astype(np.int64)
        if y.shape[1] != 1:
            per_item = shape[1:]
            whole = y.dtype.kind in "iub" or bool(np.all(y == np.round(y)))
            if whole and (len(per_item) > 1 or y.min(initial=0) < 0 or y.max(initial=0) > 1):
                # Class indices at every position (-100: Hugging Face's ignored ones), or a
                # map of them (a segmentation's mask, 0/1 included: no one-hot has 2 axes).
                # A list of an item's classes (multi-label) reads as a row of indices too
                # (sweep SS9 had been told of tokens).
                where = ("one per pixel, as for segmentation" if len(per_item) > 1 else
                         "one per token, as for token classification, or a multi-label "
                         "item's classes")
                several = "" if len(per_item) > 1 else \
                    ("; for multi-label items, diagnose one label at a time as a binary "
                     "classifier, 0/1 labels with scores=lambda out: out[:, k]")
                raise DiagQLError(f"labels must be one class index per item, got class indices "
                                  f"of shape {per_item} per item ({where}): DiagQL compares one "
                                  f"predicted class with one true class per item; give each "
                                  f"item one label (and, where the model scores every "
                                  f"position, name one vector per item with scores=), or the "
                                  f"data without labels, (X, None), or (dataset, None) whose "
                                  f"items' labels are then left unread{several}")
            if not whole and (y.min(initial=0) < 0 or y.max(initial=0) > 1):
                # No probabilities nor flags: a multi-output regression's targets (sweep SY12
                # had been told to diagnose them as binary labels, refused again then).
                raise DiagQLError(f"labels must be whole class indices, got {y.shape[1]} "
                                  f"continuous values per item (shape {per_item}), as a "
                                  f"multi-output regression's targets: they name no class; "
                                  f"{AS_UNLABELLED}")
            raise DiagQLError(f"labels must be one class index per item (or one-hot rows), got "
                              f"{y.shape[1]} values per item (labels of shape {per_item} per "
                              f"item) that are not one-hot: DiagQL compares one predicted class "
                              f"with one true class, so multi-hot or soft labels have no such "
                              f"class; diagnose one label at a time as a binary classifier, "
                              f"(X, Y[:, k]) with scores=lambda out: out[:, k] (its logit), or "
                              f"give the data without labels, (X, None)")
        y = y[:, 0]
    if y.dtype.kind == "f":
        if np.isnan(y).any():  # missing labels (pandas' Int64 gives its NA so), not a regression
            missing = np.isnan(y)
            raise missing_label(int(np.argmax(missing)), "NaN",
                                f"; {int(missing.sum()):,} of {len(y):,} items have none")
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            odd = y[~np.isfinite(y) | (y != np.round(y))][0]
            raise DiagQLError(f"labels must be whole class indices, found {float(odd)!r}: DiagQL "
                              f"diagnoses classifiers, and a regression model's continuous "
                              f"targets name no class; {AS_UNLABELLED}")
    elif y.dtype.kind == "O" and len(y) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in y.tolist()):
        return y.astype(np.int64)  # whole numbers held as objects (a pandas object column)
    elif y.dtype.kind in "USO":
        missing = [_missing(v) for v in y.tolist()] if y.dtype.kind == "O" else [False]
        if any(missing):
            first = missing.index(True)
            raise missing_label(first, _what(y[first]),
                                f"; {sum(missing):,} of {len(y):,} items have none")
        seen = ", ".join(repr(v) for v in list(dict.fromkeys(y.tolist()))[:3])
        raise DiagQLError(f"labels must be class indices (whole numbers), not {seen}, ...: "
                          f"number the classes 0..C-1 in the order of the model's outputs "
                          f"(classes= then names them for WHERE class = 'cat'; it does not "
                          f"translate the labels)")
    elif y.dtype.kind not in "iub":
        raise DiagQLError(f"labels must be class indices, got dtype {y.dtype}")
    return y.astype(np.int64)


def one_hot(y: np.ndarray) -> bool:
    """Whether every row of (items, classes) labels is 0 but for a single 1."""
    if y.dtype.kind not in "iubf":
        return False
    return bool(np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all())


def check_labels(labels: np.ndarray, n_classes: int) -> None:
    """Every label must be one of the model's classes, or class predicates and samplers would
    silently count items that the model can never get right."""
    outside = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(outside):
        first = int(outside[0])
        values = np.unique(labels)
        shown = ", ".join(str(int(v)) for v in values[:4]) + (", …" if len(values) > 4 else "")
        if len(values) <= n_classes:  # the classes in another numbering: {-1, 1}, 1..C
            what = (f"the labels take {len(values)} values ({shown}): if they are the "
                    f"model's classes numbered otherwise, renumber them 0..{n_classes - 1} "
                    f"(the class of each score's position), e.g. ((y + 1) // 2 for -1 and 1, "
                    f"y - 1 for 1..{n_classes})")
        elif len(outside) == len(labels) or len(values) > 2 * n_classes:
            what = (f"the labels take {len(values):,} values ({shown}) where the model scores "
                    f"{n_classes} classes: for a model that is no classifier (a regression, "
                    f"whose targets WHERE class and incorrect cannot read), {AS_UNLABELLED}")
        else:
            what = "leave those items out, or give the data without its labels"
        if int(labels[first]) == -100:  # the ignore index of torch's losses, Hugging Face's
            what = (f"-100 is the ignore index of PyTorch's losses and Hugging Face's labels, "
                    f"not a class: {what}")
        raise DiagQLError(f"label {int(labels[first])} of item {first} is outside the model's "
                          f"classes 0..{n_classes - 1} (the model scores {n_classes} classes); "
                          f"{len(outside):,} of {len(labels):,} items have such labels: {what}")
