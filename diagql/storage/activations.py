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

On disk a view's rows are an entry in parts (``<key>-<part>``, one ``.npz`` each): a query
whose items are new appends a part with their rows only, instead of rewriting the layer; each
part is whole or absent, a damaged one is dropped (its rows are recomputed), and past
``MAX_PARTS`` the parts are merged into one (docs/ARCHITECTURE.md, "Storage"). A part holds
its rows as the pass kept them, in chunks (``rows-0``, ``rows-1``, ...; one per batch), and
memory holds them as such chunks too: no table of all of a query's rows is ever made.
"""
from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import xxhash

from diagql.storage.store import Cache

MEMORY_BUDGET = 512 * 1024 ** 2  # bytes of rows held in memory, all layers together
REDUCED_KEPT = 64  # aggregate states of recent sample queries, kept for reuse
# ... and at most this many bytes of them: a grouped assisted state holds groups x covariates x
# neurons float64 sums, 350 MB for 10 groups of a 262,144-neuron map, and 64 such had grown a
# session by gigabytes (a state larger alone is not kept).
REDUCED_BYTES = 256 * 1024 ** 2
MAX_PARTS = 8  # parts of a view's entry before they are merged into one


def row_dtype(torch_dtype) -> np.dtype:
    """What rows are kept in: float64 for float64 models, else float32 (exact for float32,
    float16 and bfloat16 outputs)."""
    return np.dtype(np.float64) if str(torch_dtype) == "torch.float64" else np.dtype(np.float32)


def held_bytes(value, seen: set | None = None, depth: int = 4) -> int:
    """The bytes of the arrays and tensors that kept aggregate states hold, each once: in
    mappings, sequences and objects' attributes, a few levels down; not a state's block
    ``prediction``, which its plan shares with the profile."""
    seen = set() if seen is None else seen
    if id(value) in seen or depth < 0:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return value.nbytes
    if hasattr(value, "element_size") and hasattr(value, "numel"):  # a tensor
        return value.element_size() * value.numel()
    if isinstance(value, dict):
        parts = value.values()
    elif isinstance(value, (list, tuple)):
        parts = value
    elif hasattr(value, "__dict__"):
        parts = [v for name, v in vars(value).items() if name != "prediction"]
    else:
        return 0
    return sum(held_bytes(part, seen, depth - 1) for part in parts)


def _reduction_key(plan) -> tuple:
    """What decides a sample query's aggregate states: the view (the layer and its tokens'
    reduction), the unit, the kind of state, the grouping and the exact items (their digest)."""
    query = plan.query
    kind = query.aggregate if query.aggregate != "topk" else (query.aggregate, query.order)
    if kind == ("topk", "mean"):
        kind = "avg"  # the same mean state
    digest = hashlib.sha1(np.ascontiguousarray(plan.items).tobytes()).hexdigest()
    # The assisted estimator's states also sum the covariates (the plain one's do not: False),
    # a mean's against the plan's pooled directions, which depend on the matching items'
    # population too (engine/regression.py: Pooled): those states serve only the same ones.
    covariates = getattr(plan, "covariates", None) is not None
    directions = getattr(plan, "directions", None)
    if covariates and directions is not None:
        covariates = hashlib.sha1(np.ascontiguousarray(directions).tobytes()).hexdigest()
    return plan.bound.view.key, query.unit, kind, query.group_by, digest, covariates


class _Rows:
    """A view's rows held in memory: disjoint parts (sorted items, their rows), and the keys
    of the disk parts they came from or went to."""

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray]], keys: list[str]):
        self.parts = parts
        self.keys = keys

    @property
    def nbytes(self) -> int:
        return sum(rows.nbytes for _, rows in self.parts)

    def count(self) -> int:
        return sum(len(items) for items, _ in self.parts)

    def holds(self, items: np.ndarray) -> np.ndarray:
        """Which of ``items`` (sorted) have their rows here."""
        found = np.zeros(len(items), dtype=bool)
        for indices, _ in self.parts:
            if len(indices):
                positions = np.minimum(np.searchsorted(indices, items), len(indices) - 1)
                found |= indices[positions] == items
        return found


class ActivationStore:
    def __init__(self, cache: Cache, key_of: Callable[[str], str | None], n_items: int,
                 dtype: np.dtype, budget: int = MEMORY_BUDGET):
        self.cache = cache
        self.key_of = key_of  # view key -> disk cache key (None: memory only)
        self.n_items = n_items
        self.dtype = np.dtype(dtype)
        self.budget = budget
        self._layers: OrderedDict[str, _Rows] = OrderedDict()
        # (states, their bytes) by reduction key: see reduced()
        self._reduced: OrderedDict[tuple, tuple[dict, int]] = OrderedDict()

    def held(self, view, items: np.ndarray) -> int:
        """How many of ``items`` have their rows here (in memory, or loaded from disk)."""
        return sum(len(held) for _, _, held in self.held_rows(view, items))

    def fits(self, view, items: np.ndarray) -> bool:
        """Whether the rows of ``items``, with what is held for the view, stay in budget."""
        return self.fits_together({view.key: (view, items)})

    def fits_together(self, kept: dict) -> bool:
        """Whether one pass may keep rows for several views (key -> (View, items)): their
        entries, each with its new rows added, must stay in budget together, or adding the
        last would push an earlier one out of memory."""
        total = 0
        for view, items in kept.values():
            entry = self._entry(view)
            rows = entry.count() + int((~entry.holds(items)).sum())
            total += rows * view.width * self.dtype.itemsize
        return total <= self.budget

    def held_rows(self, view, items: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(table, positions, held) per part that holds some of ``items`` (sorted):
        ``table[positions]`` are the rows of ``held``, those items whose rows are here."""
        found = []
        for indices, table in self._entry(view).parts:
            if len(indices) == 0:
                continue
            positions = np.minimum(np.searchsorted(indices, items), len(indices) - 1)
            mask = indices[positions] == items
            if mask.any():
                found.append((table, positions[mask], items[mask]))
        return found

    def reduced(self, plan) -> dict | None:
        """Aggregate states an earlier query reduced over exactly these items, or None."""
        key = _reduction_key(plan)
        if key not in self._reduced and key[-1] is False:
            # States with the covariates' sums serve a plan that needs none as well.
            key = next((held for held in reversed(self._reduced)
                        if held[:-1] == key[:-1] and held[-1] is not False), key)
        if key in self._reduced:
            self._reduced.move_to_end(key)
            return self._reduced[key][0]
        return None

    def remember(self, plan, states: dict) -> None:
        size = held_bytes(states)
        if size > REDUCED_BYTES:
            return
        self._reduced[_reduction_key(plan)] = (states, size)
        while len(self._reduced) > REDUCED_KEPT or \
                sum(kept for _, kept in self._reduced.values()) > REDUCED_BYTES:
            self._reduced.popitem(last=False)

    def add_chunks(self, view, chunks: list[tuple[np.ndarray, np.ndarray]],
                   seconds_per_item: float | None = None) -> None:
        """Keep new rows of the view, given as chunks (sorted items, their rows; a pass gives
        one per batch): in memory as they are, and on disk as one more part of its entry (only
        these rows are written). ``seconds_per_item``: what a pass cost per item, so that a
        part cheaper to recompute than to read back is not written (storage/store.py)."""
        entry = self._entry(view)
        chunks = [(items, rows) for items, rows in chunks if len(items)]
        if not chunks:
            return
        new = ~entry.holds(np.concatenate([items for items, _ in chunks]))
        if not new.all():
            cuts = np.cumsum([len(items) for items, _ in chunks])[:-1]
            chunks = [(items[keep], rows[keep]) for (items, rows), keep
                      in zip(chunks, np.split(new, cuts)) if keep.any()]
            if not chunks:
                return
        entry.parts.extend(chunks)
        self._put(view.key, entry)
        key = self.key_of(view.key)
        if key is None:
            return
        # One more file would pass MAX_PARTS: every chunk held goes into one file instead
        # (the next session reads one file, not many), which replaces the others once it has
        # landed. Memory keeps its chunks: nothing is copied here.
        merge = len(entry.keys) >= MAX_PARTS
        written = entry.parts if merge else chunks
        items = np.concatenate([items for items, _ in written])
        arrays = {"items": items, **{f"rows-{i}": rows for i, (_, rows) in enumerate(written)}}
        part = f"{key}-{xxhash.xxh3_64_hexdigest(items.tobytes())}"
        seconds = None if seconds_per_item is None else seconds_per_item * len(items)
        if self.cache.store("activations", part, arrays,
                            meta={"layer": view.layer.name, "view": view.text(),
                                  "items": len(items)}, seconds=seconds,
                            replaces=entry.keys if merge else []):
            entry.keys = [part] if merge else entry.keys + [part]

    def clear(self) -> None:
        self._layers.clear()
        self._reduced.clear()

    def _entry(self, view) -> _Rows:
        if view.key in self._layers:
            self._layers.move_to_end(view.key)
            return self._layers[view.key]
        parts, keys = [], []
        key = self.key_of(view.key)
        if key is not None:
            decode = functools.partial(self._decode, view.width)
            for part, chunks in self.cache.load_parts("activations", key, decode):
                keys.append(part)
                parts.extend(chunks)
        entry = _Rows(_disjoint(parts), keys)
        self._put(view.key, entry)
        return entry

    def _put(self, key: str, entry: _Rows) -> None:
        self._layers[key] = entry
        self._layers.move_to_end(key)
        # Least recently used layers leave memory first (they stay on disk).
        while len(self._layers) > 1 and sum(e.nbytes for e in self._layers.values()) > self.budget:
            self._layers.popitem(last=False)

    def _decode(self, width: int, arrays: dict[str, np.ndarray]
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """A part's chunks (items, rows): its items are those of its chunks in turn (an entry
        written before chunks has one table, ``rows``)."""
        indices = arrays["items"]
        if "rows" in arrays:
            tables = [arrays["rows"]]
        else:
            tables = [arrays[f"rows-{i}"] for i in range(len(arrays) - 1)]  # KeyError: a gap
        if indices.dtype != np.int64 or indices.ndim != 1 or len(tables) != len(arrays) - 1:
            raise ValueError("its rows do not match its items")
        chunks, start = [], 0
        for rows in tables:
            items = indices[start:start + len(rows)]
            start += len(rows)
            # Sorted, distinct, in-range item indices with one row of the layer's width each,
            # in the dtype rows are kept in.
            if (rows.ndim != 2 or rows.shape != (len(items), width) or rows.dtype != self.dtype
                    or (len(items) and (items[0] < 0 or items[-1] >= self.n_items
                                        or np.any(np.diff(items) <= 0)))):
                raise ValueError("its rows do not match its items")
            chunks.append((items, rows))
        if start != len(indices):
            raise ValueError("its rows do not match its items")
        return chunks


def _disjoint(parts: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Parts whose items no earlier part holds (two sessions may have appended the same items;
    their rows are equal), without copying a part that overlaps none."""
    # One flag per item index, not a union of the items so far: that was quadratic in the
    # parts (a layer kept in 782 batch-sized chunks took 14 s to read back, where the pass
    # that made them took 2.5 s).
    top = max((int(items.max()) + 1 for items, _ in parts if len(items)), default=0)
    seen = np.zeros(top, dtype=bool)
    kept = []
    for items, rows in parts:
        new = ~seen[items]
        if not new.all():
            items, rows = items[new], rows[new]
        if len(items):
            kept.append((items, rows))
            seen[items] = True
    return kept

