"""The activation cache: module outputs of sampled items, per layer, kept between queries.

A query on a sample needs the outputs of only a few percent of the items. They are kept here
(one flattened row per item, in memory and on disk), so that a second query over the same
layer and sample runs no forward pass at all, and a new session on the same model and data
starts warm. Rows are keyed by item, not by sample: samples that share items share rows.

Rows are kept per view (model/views.py): a layer and, for a sequence layer, how its tokens
reduce to one row (TOKENS MEAN and TOKEN 0 rows of one layer are different rows). The store
reads only a view's ``key``, ``width``, ``text()`` and ``layer.name``.

Only samples are kept: a full-data query streams through aggregate states instead, so that
its memory does not grow with the data set. A layer whose rows would pass the memory budget
is not kept either (the query then streams too).
"""
from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from diagql.storage.store import Cache

MEMORY_BUDGET = 512 * 1024 ** 2  # bytes of rows held in memory, all layers together
REDUCED_KEPT = 64  # aggregate states of recent sample queries, kept for reuse


def _reduction_key(plan) -> tuple:
    """What decides a sample query's aggregate states: the view (the layer and its tokens'
    reduction), the unit, the kind of state, the grouping and the exact items (their digest)."""
    query = plan.query
    kind = query.aggregate if query.aggregate != "topk" else (query.aggregate, query.order)
    if kind == ("topk", "mean"):
        kind = "avg"  # the same mean state
    digest = hashlib.sha1(np.ascontiguousarray(plan.items).tobytes()).hexdigest()
    return plan.bound.view.key, query.unit, kind, query.group_by, digest


class ActivationStore:
    def __init__(self, cache: Cache, key_of: Callable[[str], str | None], n_items: int,
                 dtype: np.dtype, budget: int = MEMORY_BUDGET):
        self.cache = cache
        self.key_of = key_of  # view key -> disk cache key (None: memory only)
        self.n_items = n_items
        self.dtype = np.dtype(dtype)
        self.budget = budget
        self._layers: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._reduced: OrderedDict[tuple, dict] = OrderedDict()  # see reduced()

    def held(self, view, items: np.ndarray) -> int:
        """How many of ``items`` have their rows here (in memory, or loaded from disk)."""
        return len(self.held_rows(view, items)[2])

    def fits(self, view, items: np.ndarray) -> bool:
        """Whether the rows of ``items``, with what is held for the view, stay in budget."""
        return self.fits_together({view.key: (view, items)})

    def fits_together(self, kept: dict) -> bool:
        """Whether one pass may keep rows for several views (key -> (View, items)): their
        entries, each with its new rows added, must stay in budget together, or adding the
        last would push an earlier one out of memory."""
        total = 0
        for view, items in kept.values():
            indices, _ = self._entry(view)
            total += len(np.union1d(indices, items)) * view.width * self.dtype.itemsize
        return total <= self.budget

    def held_rows(self, view, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(table, positions, held): ``table[positions]`` are the rows of ``held``, the items
        of ``items`` (sorted) whose rows are here."""
        indices, table = self._entry(view)
        if len(indices) == 0:
            return table, np.empty(0, dtype=np.int64), items[:0]
        positions = np.minimum(np.searchsorted(indices, items), len(indices) - 1)
        mask = indices[positions] == items
        return table, positions[mask], items[mask]

    def reduced(self, plan) -> dict | None:
        """Aggregate states an earlier query reduced over exactly these items, or None."""
        key = _reduction_key(plan)
        if key in self._reduced:
            self._reduced.move_to_end(key)
            return self._reduced[key]
        return None

    def remember(self, plan, states: dict) -> None:
        self._reduced[_reduction_key(plan)] = states
        while len(self._reduced) > REDUCED_KEPT:
            self._reduced.popitem(last=False)

    def add(self, view, items: np.ndarray, rows: np.ndarray) -> None:
        """Merge new rows into the view's entry, in memory and on disk."""
        indices, held = self._entry(view)
        if len(indices) == 0:
            merged, table = items, rows
        else:
            merged = np.union1d(indices, items)
            table = np.empty((len(merged), rows.shape[1]), dtype=self.dtype)
            table[np.searchsorted(merged, indices)] = held
            table[np.searchsorted(merged, items)] = rows
        self._put(view.key, merged, table)
        key = self.key_of(view.key)
        if key is not None:
            self.cache.store("activations", key, {"items": merged, "rows": table},
                             meta={"layer": view.layer.name, "view": view.text(),
                                   "items": len(merged)})

    def clear(self) -> None:
        self._layers.clear()
        self._reduced.clear()

    def _entry(self, view) -> tuple[np.ndarray, np.ndarray]:
        if view.key in self._layers:
            self._layers.move_to_end(view.key)
            return self._layers[view.key]
        entry = None
        key = self.key_of(view.key)
        if key is not None:
            entry = self.cache.load("activations", key,
                                    functools.partial(self._decode, view.width))
        if entry is None:
            entry = (np.empty(0, dtype=np.int64), np.empty((0, view.width), dtype=self.dtype))
        self._put(view.key, *entry)
        return entry

    def _put(self, key: str, indices: np.ndarray, rows: np.ndarray) -> None:
        self._layers[key] = (indices, rows)
        self._layers.move_to_end(key)
        # Least recently used layers leave memory first (they stay on disk).
        while len(self._layers) > 1 and sum(r.nbytes for _, r in self._layers.values()) > self.budget:
            self._layers.popitem(last=False)

    def _decode(self, width: int, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        indices, rows = arrays["items"], arrays["rows"]
        # Sorted, distinct, in-range item indices with one row of the layer's width each, in
        # the dtype rows are kept in.
        if (indices.dtype != np.int64 or indices.ndim != 1 or rows.ndim != 2
                or rows.shape != (len(indices), width) or rows.dtype != self.dtype
                or (len(indices) and (indices[0] < 0 or indices[-1] >= self.n_items
                                      or np.any(np.diff(indices) <= 0)))):
            raise ValueError("its rows do not match its items")
        return indices, rows
