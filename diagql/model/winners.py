"""Every layer's winner per item (docs/ARCHITECTURE.md, "Data model"): the neuron at which an
item's row of the layer's default view is largest, kept by the profile pass for every layer it
can read, so that an ARGMAX of a layer's neurons is counted from the profile instead of run or
estimated. The pass computes every layer's output anyway; an argmax per row is one more read of
it, and an item costs 1 or 2 bytes per layer."""
from __future__ import annotations

import math

import numpy as np
import torch

from diagql.model.views import SEQUENCE, ModuleCall, View


def views(catalog) -> list[View]:
    """The default views of the catalog's layers whose winners the profile pass keeps: those
    that run once per pass, read per item (a sequence layer through its default reduction)."""
    found = []
    for layer in getattr(catalog, "layers", ()):
        if layer.shape is None or layer.shared or layer.calls != 1 or layer.neurons < 1 \
                or (layer.varies and layer.layout != SEQUENCE):
            continue
        found.append(View(layer))
    return found


def winner_dtype(width: int) -> np.dtype:
    """The narrowest unsigned type that holds a winner of ``width`` neurons (1 byte up to 256)."""
    return np.min_scalar_type(max(width - 1, 0))


class WinnerKeeper:
    """The profile pass's part: each view's winner of every item, batch by batch. A layer that
    did not run, was read otherwise than the probe saw, or gave a NaN or inf row is dropped (an
    ARGMAX on it runs the model, which reports such items)."""

    def __init__(self, views: list[View], n: int):
        self.views = {view.layer.name: view for view in views}
        self.winners = {name: np.empty(n, winner_dtype(view.width))
                        for name, view in self.views.items()}
        self.batch: dict[str, torch.Tensor] = {}
        # This batch's winners by the values they came from: a Sequential's output is its last
        # child's, a Flatten's its input's data, so most layers of a block share one argmax.
        self.seen: dict[tuple, torch.Tensor] = {}
        self.position = 0

    def callbacks(self) -> dict:
        return {name: self._keep(name) for name in self.views}

    def _keep(self, name: str):
        def keep(call: ModuleCall) -> None:
            view = self.views.get(name)
            if view is None:
                return
            try:  # now: a later in-place op (ReLU(inplace=True)) may overwrite the output
                rows = view.finish(view.rows(call)).detach()
                if rows.ndim != 2 or rows.shape[1] != view.width:
                    raise ValueError("not a row per item")
                # A NaN or inf value makes a float64 sum NaN or inf (a third of isfinite's cost).
                total = float(rows.sum(dtype=torch.float64))
                if not math.isfinite(total):
                    raise ValueError("a NaN or inf value")
                # The same memory, shape and strides as a layer's before, still holding the same
                # sum: the same values, so the same winners. (An in-place op since, such as
                # ReLU(inplace=True) after a BatchNorm, changes the sum; inference mode keeps
                # no version counter to tell.)
                key = (rows.data_ptr(), tuple(rows.shape), rows.stride(), rows.dtype, total)
                if key not in self.seen:
                    # First of ties, in the model's dtype: as an ARGMAX's pass counts it
                    # (engine/aggregates.py).
                    self.seen[key] = rows.argmax(dim=1).cpu()
                self.batch[name] = self.seen[key]
            except Exception:  # noqa: BLE001 - read otherwise than the probe saw: no winners
                self.drop(name)
        return keep

    def drop(self, name: str) -> None:
        for table in (self.views, self.winners, self.batch):
            table.pop(name, None)

    def after_batch(self, size: int) -> None:
        """Take the batch's winners of every view (a view that did not run is dropped)."""
        start = self.position
        self.position += size
        self.seen.clear()
        for name in list(self.views):
            winners = self.batch.pop(name, None)
            if winners is None or len(winners) != size:
                self.drop(name)
                continue
            self.winners[name][start:start + size] = winners.numpy()

    def result(self) -> dict[str, np.ndarray]:
        """Every kept view's winners, by view key (``View.key``)."""
        return {self.views[name].key: winners for name, winners in self.winners.items()}
