"""A Ray Dataset as the data of a Ray connection (docs/SCALING.md): converted once into blocks
of NumPy columns in the cluster's object store, item i being the dataset's i-th row; the
driver keeps the length and the first rows (the catalog's probe), and each worker reads only
the blocks that overlap its shard, batching the rows as ItemSource batches a mapping of
columns (so a worker's batches are the local engine's)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from diagql.errors import DiagQLError, ItemsElsewhere
from diagql.model.data import ItemSource

HEAD = 3  # rows the driver keeps: the catalog probes batches of 1, 2 and 3 items


def is_ray_dataset(data) -> bool:
    """Whether ``data`` is a ``ray.data.Dataset`` (told without importing ray)."""
    return any(cls.__module__.startswith("ray.data") and cls.__name__ == "Dataset"
               for cls in type(data).__mro__)


class DatasetBlocks:
    """The dataset's rows as blocks of NumPy columns in the object store, and where each
    block starts."""

    def __init__(self, dataset):
        import logging

        import ray

        # Ray Data logs each execution at INFO; DiagQL's own progress is all a user sees.
        logger = logging.getLogger("ray.data")
        level = logger.level
        logger.setLevel(max(level, logging.WARNING))
        try:
            # Read once; to_numpy_refs converts the blocks one to one, in order, and the
            # materialised blocks' metadata already counts their rows.
            dataset = dataset.materialize()
            counts = [meta.num_rows for bundle in dataset.iter_internal_ref_bundles()
                      for meta in bundle.metadata]
            self.refs = dataset.to_numpy_refs()
        except Exception as exc:  # noqa: BLE001 - the user's dataset failed while reading
            raise DiagQLError(f"reading the Ray Dataset failed: {type(exc).__name__}: "
                              f"{exc}") from None
        finally:
            logger.setLevel(level)
        if len(counts) != len(self.refs) or None in counts:
            # Counted where each block lives. A lambda travels by value, so the task's
            # process imports nothing of DiagQL (torch takes seconds).
            rows = ray.remote(num_cpus=0)(lambda block: len(
                next(iter(block.values())) if isinstance(block, dict) else block))
            counts = ray.get([rows.remote(ref) for ref in self.refs])
        # Each block's conversion is a task of a CPU: done now, while no worker of this
        # connection holds one, not left queued behind the workers that will read it.
        ray.wait(self.refs, num_returns=len(self.refs), fetch_local=False)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        # The first HEAD rows, from as many blocks as hold them (a first block may hold
        # fewer). Copies: the object store's arrays are read-only, which torch warns about.
        parts, held = [], 0
        for ref in self.refs:
            block = _columns(ray.get(ref))
            rows = len(next(iter(block.values()))) if block else 0
            if rows:
                parts.append({k: np.array(v[:HEAD - held]) for k, v in block.items()})
                held += min(rows, HEAD - held)
            if held >= HEAD:
                break
        self.first = {k: _joined(k, [part[k] for part in parts]) for k in parts[0]} \
            if parts else None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def head(self) -> DatasetHead:
        return DatasetHead(self.first, len(self))

    def overlapping(self, lo: int, hi: int) -> list[tuple[int, object]]:
        """(start, block ref) of every block that holds some of the items lo..hi-1."""
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        last = int(np.searchsorted(self.starts, hi, side="left"))
        return [(int(self.starts[b]), self.refs[b]) for b in range(first, last)]


def _joined(key: str, parts: list[np.ndarray]) -> np.ndarray:
    """A column's first rows from several blocks, which must agree in shape past the rows:
    rows of other lengths (unpadded sequences) are refused, as within one block."""
    try:
        return np.concatenate(parts)
    except ValueError:
        shapes = sorted({part.shape[1:] for part in parts}, key=str)
        raise DiagQLError(f"the Ray Dataset's column {key!r} holds rows of different shapes "
                          f"({', '.join(map(str, shapes[:3]))}): sequences of different "
                          f"lengths must be padded to one length (ds.map_batches with a "
                          f"padding function)") from None


def _columns(block) -> dict:
    """A block as a dict of columns (a dataset of one column comes back as a bare array)."""
    return block if isinstance(block, dict) else {"data": block}


class DatasetHead:
    """What the driver holds of a Ray Dataset: its length and its first rows, as a sequence of
    dict items (one a row) for the connection's ItemSource."""

    def __init__(self, columns: dict | None, n: int):
        self.columns, self.n = columns, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        held = 0 if self.columns is None else len(next(iter(self.columns.values())))
        if not 0 <= i < held:  # the driver runs no pass over items
            raise ItemsElsewhere(f"item {i} of a Ray Dataset is read on the Ray workers, not "
                                 f"on the driver")
        return {key: value[i] for key, value in self.columns.items()}


class ShardSource:
    """A worker's items of a Ray Dataset: the rows of the blocks that overlap its shard, read
    in order, the wanted ones batched as ItemSource batches a mapping of columns."""

    def __init__(self, blocks: list[tuple[int, object]], label_key: str | None):
        self.blocks, self.label_key = blocks, label_key

    def batches(self, items: np.ndarray, batch_size: int) -> Iterator:
        import ray

        pending: list[tuple[np.ndarray, dict]] = []  # (item indices, columns) not yet batched
        held = 0
        for start, ref in self.blocks:
            columns = _columns(ray.get(ref))
            size = len(next(iter(columns.values())))
            lo, hi = np.searchsorted(items, [start, start + size])
            if hi > lo:
                rows = items[lo:hi] - start
                pending.append((items[lo:hi], {k: v[rows] for k, v in columns.items()}))
                held += hi - lo
            while held >= batch_size:
                yield self._batch(pending, batch_size)
                held -= batch_size
        if held:
            yield self._batch(pending, held)

    def _batch(self, pending: list, n: int):
        """The first ``n`` pending rows as one batch, taken off ``pending``."""
        idx, parts, taken = [], [], 0
        while taken < n:
            items, columns = pending[0]
            use = min(n - taken, len(items))
            idx.append(items[:use])
            parts.append({k: v[:use] for k, v in columns.items()})
            if use == len(items):
                pending.pop(0)
            else:
                pending[0] = (items[use:], {k: v[use:] for k, v in columns.items()})
            taken += use
        columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        _, x, y = next(ItemSource(columns, label_key=self.label_key).batches(np.arange(n), n))
        return np.concatenate(idx), x, y
