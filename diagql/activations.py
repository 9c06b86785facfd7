"""The activation cache: module outputs of sampled items, per layer, kept between queries.

A query on a sample needs the outputs of only a few percent of the items. They are kept here
(one flattened row per item, in memory and on disk), so that a second query over the same
layer and sample runs no forward pass at all, and a new session on the same model and data
starts warm. Rows are keyed by item, not by sample: samples that share items share rows.

Only samples are kept: a full-data query streams through aggregate states instead, so that
its memory does not grow with the data set. A layer whose rows would pass the memory budget
is not kept either (the query then streams too).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable

import numpy as np

from .cache import Cache

MEMORY_BUDGET = 512 * 1024 ** 2  # bytes of rows held in memory, all layers together


class ActivationStore:
    def __init__(self, cache: Cache, key_of: Callable[[str], str | None],
                 width_of: Callable[[str], int], n_items: int, dtype: np.dtype,
                 budget: int = MEMORY_BUDGET):
        self.cache = cache
        self.key_of = key_of  # layer name -> disk cache key (None: memory only)
        self.width_of = width_of  # layer name -> neurons per item
        self.n_items = n_items
        self.dtype = np.dtype(dtype)
        self.budget = budget
        self._layers: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def held(self, layer: str, items: np.ndarray) -> int:
        """How many of ``items`` have their rows here (in memory, or loaded from disk)."""
        indices, _ = self._entry(layer)
        return int(np.isin(items, indices, assume_unique=True).sum())

    def fits(self, layer, items: np.ndarray) -> bool:
        """Whether the rows of ``items``, with what is held for the layer, stay in budget."""
        indices, _ = self._entry(layer.name)
        total = len(np.union1d(indices, items))
        return total * layer.neurons * self.dtype.itemsize <= self.budget

    def missing(self, layer: str, items: np.ndarray) -> np.ndarray:
        indices, _ = self._entry(layer)
        return np.setdiff1d(items, indices, assume_unique=True)

    def rows(self, layer, items: np.ndarray, runner, description: str) -> np.ndarray | None:
        """The rows of ``items`` (sorted), computing those not held in one forward pass;
        None when they would not fit the budget (the caller streams instead)."""
        missing = self.missing(layer.name, items)
        if len(missing):
            if not self.fits(layer, items):
                return None
            from .executor import Collector

            collector = Collector(layer.name, missing, layer.neurons, self.dtype)
            runner.run([collector], description)
            self.add(layer.name, missing, collector.rows)
        return self.lookup(layer.name, items)

    def lookup(self, layer: str, items: np.ndarray) -> np.ndarray:
        indices, rows = self._entry(layer)
        return rows[np.searchsorted(indices, items)]

    def add(self, layer: str, items: np.ndarray, rows: np.ndarray) -> None:
        """Merge new rows into the layer's entry, in memory and on disk."""
        indices, held = self._entry(layer)
        merged = np.union1d(indices, items)
        table = np.empty((len(merged), rows.shape[1]), dtype=self.dtype)
        table[np.searchsorted(merged, indices)] = held
        table[np.searchsorted(merged, items)] = rows
        self._put(layer, merged, table)
        key = self.key_of(layer)
        if key is not None:
            self.cache.store("activations", key, {"items": merged, "rows": table},
                             meta={"layer": layer, "items": len(merged)})

    def clear(self) -> None:
        self._layers.clear()

    def _entry(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        if layer in self._layers:
            self._layers.move_to_end(layer)
            return self._layers[layer]
        entry = None
        key = self.key_of(layer)
        if key is not None:
            entry = self.cache.load("activations", key, functools.partial(self._decode, layer))
        if entry is None:
            entry = (np.empty(0, dtype=np.int64),
                     np.empty((0, self.width_of(layer)), dtype=self.dtype))
        self._put(layer, *entry)
        return entry

    def _put(self, layer: str, indices: np.ndarray, rows: np.ndarray) -> None:
        self._layers[layer] = (indices, rows)
        self._layers.move_to_end(layer)
        # Least recently used layers leave memory first (they stay on disk).
        while len(self._layers) > 1 and sum(r.nbytes for _, r in self._layers.values()) > self.budget:
            self._layers.popitem(last=False)

    def _decode(self, layer: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        indices, rows = arrays["items"], arrays["rows"]
        # Sorted, distinct, in-range item indices with one row of the layer's width each, in
        # the dtype rows are kept in.
        if (indices.dtype != np.int64 or indices.ndim != 1 or rows.ndim != 2
                or rows.shape != (len(indices), self.width_of(layer)) or rows.dtype != self.dtype
                or (len(indices) and (indices[0] < 0 or indices[-1] >= self.n_items
                                      or np.any(np.diff(indices) <= 0)))):
            raise ValueError("its rows do not match its items")
        return indices, rows
