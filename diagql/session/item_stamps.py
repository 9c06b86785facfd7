"""The stamp of a list of items (docs/ARCHITECTURE.md, "Session"): each item's identity, its
tensors' identities and version counters, and its numbers, taken before each statement so that
an item replaced, or one's tensor written in place, is seen (session/changes.py)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.nn.parameter import is_lazy

LISTED_ITEMS = 100_000  # a list of items' items stamped one by one before each statement
SCALARS = (int, float, str, bool, type(None))


def version(t) -> int:
    """Its version counter; -1 for an inference tensor (made under torch.inference_mode),
    which keeps none (and cannot be written outside inference mode)."""
    if is_lazy(t) or t.is_inference():  # asked, not tried: an exception an item cost 1 s
        return -1  # in 100,000 (a lazy module's parameter answers neither)
    return t._version


def versions(tensors: list) -> tuple:
    """A column of items' tensors' version counters, read in one sweep (27 ms for 100,000,
    against 85 ms asking each ``version``'s questions); where one is an inference tensor,
    which keeps none and raises, each is asked (``version``)."""
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return tuple(map(version, tensors))


def items_stamp(items) -> tuple | None:
    """A list of items' stamp: each item's identity, its tensors' identities and version
    counters, and its numbers (a label), so that an item replaced, or one's tensor written in
    place (``x.mul_``), is seen, as a pair's tensors are; up to LISTED_ITEMS of them, spread
    over a longer list. Read a column at a time where the items are alike (20 ms for 50,000
    (x, label) items), else item by item. A numpy array or a Python list inside an
    item is stamped by identity (and a list by length): its values are not read, which at
    64 token ids an item cost 0.4 s a statement. None for data in another form."""
    if items is None:
        return None
    if len(items) > LISTED_ITEMS:
        items = [items[i] for i in np.linspace(0, len(items) - 1, LISTED_ITEMS).astype(int)]
    try:
        return tuple(_column_stamp(items, top=True))
    except (AttributeError, KeyError, IndexError, TypeError):
        # Items unlike the first (other keys, a tensor where the first has a number).
        return tuple((id(item), *_parts_stamp(item)) for item in items)


def _column_stamp(values: list, top: bool = False) -> list:
    """One part of every item (``values``): numbers as they are, tensors' identities and
    versions, a tuple's or mapping's parts column by column (the item's own list too)."""
    if all(type(value) in SCALARS for value in values):
        return [tuple(values)]
    first = values[0]
    kind = type(first)
    if not all(type(value) is kind for value in values):  # a list first, tensors after it
        raise TypeError("items unlike the first: stamped one by one")
    stamp = [tuple(map(id, values))]
    if isinstance(first, torch.Tensor):
        return [*stamp, versions(values)]
    if isinstance(first, list) and not top:
        return [*stamp, tuple(map(len, values))]
    keys = list(first) if isinstance(first, Mapping) else range(len(first)) \
        if isinstance(first, (tuple, list)) else ()
    for key in keys:
        stamp += _column_stamp([value[key] for value in values])
    return stamp


def _parts_stamp(item, top: bool = True) -> tuple:
    parts = item.values() if isinstance(item, Mapping) else \
        item if isinstance(item, tuple) or (top and isinstance(item, list)) else (item,)
    stamp = []
    for part in parts:
        if isinstance(part, torch.Tensor):
            stamp.append((id(part), version(part)))
        elif isinstance(part, (tuple, Mapping)):  # ((x1, x2), y): the inputs' tensors
            stamp.append(_parts_stamp(part, top=False))
        elif type(part) in SCALARS:
            stamp.append(part)
        else:  # a list of token ids, an array: by identity (and length)
            stamp.append((id(part), length(part)))
    return tuple(stamp)


def length(value) -> int | None:
    try:
        return len(value)
    except Exception:  # noqa: BLE001 - no length (a bare tensor's 0-d), or the user's raised
        return None
