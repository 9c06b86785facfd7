"""Items whose activations hold NaN or inf, counted by a pass's consumers over the whole pass
and its shards, and reported once: how many, and the first (docs/ARCHITECTURE.md, "Plan and
execute")."""
from __future__ import annotations

import numpy as np

from diagql.errors import ExecutionError


# What DiagQL does not do with such items, by the query's aggregate (None: any other use).
REFUSED = {"avg": "average over them", "topk": "rank neurons over them",
           "argmax": "count their most active neuron", None: "aggregate over them"}


class NonFiniteActivations(ExecutionError):
    """A layer's activations hold NaN or inf for some items the query takes in: refused for
    that layer (one checkpoint's, ACROSS CHECKPOINTS: its cells blank, the others answer)."""


class NonFinite:
    """How many items held NaN or inf, and the lowest index among them. Mergeable, so a shard's
    count joins the driver's whatever order the shards come back in."""

    __slots__ = ("count", "first")

    def __init__(self):
        self.count, self.first = 0, -1

    def add(self, idx: np.ndarray, bad: np.ndarray) -> None:
        """Count the items ``idx[bad]`` (``bad``: a boolean mask over ``idx``)."""
        found = idx[bad]
        if len(found):
            self._join(len(found), int(found.min()))

    def merge(self, other: NonFinite) -> None:
        if other.count:
            self._join(other.count, other.first)

    def _join(self, count: int, first: int) -> None:
        self.first = first if self.count == 0 else min(self.first, first)
        self.count += count

    def check(self, what: str, total: int, consequence: str) -> None:
        """Raise ``"{what} N of {total} items (the first is item F); {consequence}"`` if any."""
        if self.count:
            raise NonFiniteActivations(f"{what} {self.count:,} of {total:,} items (the first "
                                       f"is item {self.first}); {consequence}")


def refuse(bad: NonFinite | None, layer: str, total: int, aggregate: str | None,
           sampled: bool = False) -> None:
    """Refuse a query on ``layer`` over ``total`` items, ``bad`` of which hold NaN or inf; a
    sample's (``sampled``) too, which would answer as if they were not there."""
    if bad is not None:
        but = ", nor estimate from a sample what takes them in" if sampled else ""
        bad.check(f"layer {layer!r} has NaN or infinite activations for", total,
                  f"DiagQL does not {REFUSED.get(aggregate, REFUSED[None])}{but}")
