"""A pass cut into shards (docs/ARCHITECTURE.md, "Engines"): the pass's sorted items in runs
of whole batches, in a fixed order; each shard feeds empty parts of the pass's consumers on a
worker, and the parts are merged back into the consumers in shard order, never in the order
the shards happen to finish, so the answer does not depend on the cluster's timing.

A consumer of a pass (the executor's Reducer and Collector, EVALUATE's group reducer,
SIMILARITY's feeds, TOPK k INPUTS's reader and the inputs index's builder, and any new one)
provides:

- ``view``: the View it reads (its layer is hooked), and ``wanted``: its sorted item indices;
- ``take(rows, idx)``: reduce the view's rows of items ``idx`` (sorted, all among ``wanted``);
- ``part(items)``: an empty consumer of the same kind fed only ``items``, a run of ``wanted``
  (possibly empty); it is pickled to a worker and back, so it carries only what reducing
  those items needs (slices of the consumer's per-item arrays, never the whole data's);
- ``merge(part)``: take in a fed part's state, as if this consumer had seen its items.
"""
from __future__ import annotations

import itertools

import numpy as np

from diagql.engine.executor import feed
from diagql.model.data import spans


def shard_items(items: np.ndarray, batch_size: int, n_shards: int) -> list[np.ndarray]:
    """``items`` cut into at most ``n_shards`` runs of whole batches, in index order. Whole
    batches, so that every batch a worker makes is one the local pass makes too: the same
    inputs give the same activations, bit for bit, whatever the batch's shape does to the
    model's kernels (the local pass's batches: ``data.spans``, whose last holds one more item
    where it would hold one alone, which a shard's own batching keeps)."""
    cuts = spans(len(items), batch_size)
    n_shards = max(1, min(n_shards, len(cuts)))
    bounds = np.linspace(0, len(cuts), n_shards + 1).round().astype(np.int64)
    ends = [0] + [end for _, end in cuts]
    return [items[ends[a]:ends[b]] for a, b in itertools.pairwise(bounds) if b > a]


def parts_for(consumers: list, items: np.ndarray) -> list:
    """Each consumer's empty part over the shard ``items`` (those of its own among them)."""
    lo, hi = int(items[0]), int(items[-1]) + 1
    parts = []
    for consumer in consumers:
        a, b = np.searchsorted(consumer.wanted, [lo, hi])
        parts.append(consumer.part(consumer.wanted[a:b]))
    return parts


def feed_shard(models: dict, source, items: np.ndarray, *, device, advance, passes: list,
               batch_size: int) -> list:
    """A worker's task: one pass over the shard's ``items`` through the models of ``passes``
    ((the model's key in ``models``, its dtype, its consumers' parts) each), feeding the
    parts; each model's parts back."""
    feed([(models[key], device, dtype, [p for p in parts if len(p.wanted)])
          for key, dtype, parts in passes if any(len(p.wanted) for p in parts)],
         source, items, batch_size=batch_size, advance=advance)
    return [parts for _, _, parts in passes]


def merge_parts(consumers: list, shard_parts: list[list]) -> None:
    """Merge every shard's parts into the consumers, in shard order."""
    for parts in shard_parts:
        for consumer, part in zip(consumers, parts):
            consumer.merge(part)
