"""Which items of its dataset a DataLoader yields, read by DiagQL by index.

DiagQL reads a loader's dataset by index, in index order, in batches of its own; the
loader's order and batch size do not change an answer. Its sampler does: a validation
split is often ``DataLoader(full, sampler=SubsetRandomSampler(val))``, whose items are a
part of the dataset. So the items are the sampler's, whatever their order (docs/
ARCHITECTURE.md, "Data model"). A sampler that draws with replacement, or draws another set each
time it is read, has no fixed items to diagnose, and is refused.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from diagql.errors import DiagQLError, warn


def loader_items(loader) -> np.ndarray | None:
    """The sorted indices of the dataset items the loader yields; None when it yields every
    item (a sequential or shuffling sampler). Warns when ``drop_last`` drops items that
    DiagQL reads all the same."""
    n = len(loader.dataset)
    sampler, batches = loader.sampler, loader.batch_sampler
    if type(batches) is BatchSampler:  # torch's own, given or made: its sampler's items
        sampler = batches.sampler  # (drop_last below drops none of them here)
    own_batches = batches is not None and not (
        type(batches) is BatchSampler and batches.sampler is sampler)
    source = batches if own_batches else sampler
    what = f"batch_sampler ({type(source).__name__})" if own_batches else \
        f"sampler ({type(source).__name__})"
    if type(source) is SequentialSampler and len(source) == n:
        items = None
    elif type(source) is RandomSampler and not source.replacement and source.num_samples == n:
        items = None  # shuffle=True: every item once
    else:
        items = _fixed_items(source, own_batches, what, n)
    if not own_batches and batches is not None and getattr(batches, "drop_last", False):
        _warn_dropped(items, n, batches.batch_size)
    return items


def _fixed_items(source, batched: bool, what: str, n: int) -> np.ndarray | None:
    if getattr(source, "replacement", False):
        raise DiagQLError(f"the DataLoader's {what} draws items with replacement: it has no "
                          f"fixed items to diagnose; pass its dataset, or a "
                          f"torch.utils.data.Subset of the items you mean")
    first, second = _drawn(source, batched, what), _drawn(source, batched, what)
    if not np.array_equal(np.unique(first), np.unique(second)):
        raise DiagQLError(f"the DataLoader's {what} yields other items each time it is read: "
                          f"it has no fixed items to diagnose; pass its dataset, or a "
                          f"torch.utils.data.Subset of the items you mean")
    items = np.unique(first)
    if len(items) and (items[0] < 0 or items[-1] >= n):
        bad = items[0] if items[0] < 0 else items[-1]
        raise DiagQLError(f"the DataLoader's {what} yields index {bad}, outside its dataset of "
                          f"{n:,} items")
    return None if len(items) == n else items


def _drawn(source, batched: bool, what: str) -> np.ndarray:
    try:
        drawn = [i for batch in source for i in batch] if batched else list(source)
        return np.asarray(drawn, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DiagQLError(f"the DataLoader's {what} does not yield item indices: "
                          f"{exc}") from None


def _warn_dropped(items: np.ndarray | None, n: int, batch_size: int | None) -> None:
    count = n if items is None else len(items)
    dropped = count % batch_size if batch_size else 0
    if dropped:
        warn(f"the DataLoader drops its last {dropped:,} of {count:,} items "
             f"(drop_last=True); DiagQL reads all {count:,}")
