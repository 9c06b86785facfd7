"""Every layer's winner per item (docs/ARCHITECTURE.md, "Data model"): the neuron (for a conv
map, also the channel) at which an item's row of the layer is largest, kept by the profile pass
for every layer it can read, so that an ARGMAX is counted from the profile instead of run or
estimated. The pass computes every layer's output anyway; an argmax per row is one more read of
it, and an item costs 1 or 2 bytes per layer."""
from __future__ import annotations

import json
import math
import weakref

import numpy as np
import torch

from diagql.model.views import SEQUENCE, ModuleCall, View


# The winners of all views together stay under this many bytes (2,700 one-byte views at 50,000
# items; at 10 million, the first 13 to 26 in the catalog's order): a view left out only runs
# the model for its ARGMAX, as before.
BUDGET = 256 * 1024 ** 2


def views(catalog, n: int) -> list[View]:
    """The views whose winners a profile pass over ``n`` items keeps: for every catalog layer
    that runs once per pass, or each call of one that runs several times, read per item, its
    default view (a sequence layer through
    its default reduction) and, for a conv map, its CHANNELS view; in the catalog's order, up
    to BUDGET."""
    found, used = [], 0
    for layer in getattr(catalog, "layers", ()):
        # A module's one call per pass, or one call of a module that runs several times
        # (``block.relu#2``: a ResNet block's ReLU called twice), whose hooks feed the call's
        # own output; not a shared module's entry, which has no single output.
        if layer.shape is None or layer.shared or (layer.calls != 1 and not layer.call) or \
                layer.neurons < 1:
            continue
        for view in ([View(layer)] if not layer.varies or layer.layout == SEQUENCE else []) + \
                ([View(layer, channels=True)] if layer.channels is not None else []):
            used += n * winner_dtype(view.neurons).itemsize
            if used > BUDGET:
                return found
            found.append(view)
    return found


def key_of(view: View) -> str:
    """Whose winners a view's ARGMAX counts: its row key (``View.key``), marked for CHANNELS,
    whose winners are the channel means' (a fixed-shape layer's CHANNELS view reads the same
    rows as its NEURONS view, so the same row key)."""
    if not view.channels:
        return view.key
    return json.dumps([*json.loads(view.key)[:1], "CHANNELS"])


def row_argmax(rows: torch.Tensor) -> torch.Tensor:
    """Each row's winner (int64, on the CPU): the first of its largest values, as torch's
    ``argmax`` and numpy's both take them. A CPU tensor goes through numpy, whose argmax is
    vectorised: 0.08 ms for 256 x 4,704 float32 where torch's takes 1.05 ms (most of what
    keeping the winners cost the profile pass, and of an ARGMAX pass's own reduction)."""
    if rows.device.type == "cpu" and rows.dtype != torch.bfloat16:
        return torch.from_numpy(rows.numpy().argmax(axis=1).astype(np.int64, copy=False))
    return rows.argmax(dim=1).cpu()


def winner_dtype(width: int) -> np.dtype:
    """The narrowest unsigned type that holds a winner of ``width`` neurons or ``width``
    itself, which marks an item whose row holds NaN or inf (1 byte up to 255 neurons)."""
    return np.min_scalar_type(max(width, 0))


def _storage(rows: torch.Tensor):
    """The storage holding ``rows``, or None where a tensor has none to name (sparse, nested)."""
    try:
        return rows.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _per_item(view: View, rows: torch.Tensor) -> torch.Tensor:
    """The view's finished rows, one of ``view.neurons`` values per item, or ValueError (read
    otherwise than the probe saw: the keeper drops the view)."""
    values = view.finish(rows)
    if values.ndim != 2 or values.shape[1] != view.neurons:
        raise ValueError("not a row per item")
    return values


class WinnerKeeper:
    """The profile pass's part: each view's winner of every item, batch by batch. A view whose
    layer did not run, or was read otherwise than the probe saw, is dropped (an ARGMAX on it
    runs the model). An item whose row holds NaN or inf gets the winner ``view.neurons``: the
    profile knows it for every item, so that a sample that misses it is refused as a pass over
    it is (engine/planner.py, ``Plan.nonfinite``)."""

    def __init__(self, views: list[View], n: int):
        self.views = {key_of(view): view for view in views}
        self.winners = {key: np.empty(n, winner_dtype(view.neurons))
                        for key, view in self.views.items()}
        self.batch: dict[str, torch.Tensor] = {}
        # This batch's winners by the values they came from: a Sequential's output is its last
        # child's, a Flatten's its input's data, so most layers of a block share one argmax.
        self.seen: dict[tuple, tuple] = {}  # key -> (weak reference to the storage, winners)
        self.position = 0

    def callbacks(self) -> dict:
        by_layer: dict[str, list[str]] = {}
        for key, view in self.views.items():
            by_layer.setdefault(view.layer.name, []).append(key)
        return {name: self._keep(keys) for name, keys in by_layer.items()}

    def _keep(self, keys: list[str]):
        def keep(call: ModuleCall) -> None:
            for key in keys:
                view = self.views.get(key)
                if view is None:
                    continue
                try:  # now: a later in-place op (ReLU(inplace=True)) may overwrite it
                    self.batch[key] = self._winners(view, view.rows(call).detach())
                except Exception:  # noqa: BLE001 - read otherwise than the probe saw
                    self.drop(key)
        return keep

    def _winners(self, view: View, rows: torch.Tensor) -> torch.Tensor:
        # A NaN or inf value makes the sum NaN or inf (a third of isfinite's cost). Summed in
        # float32 at least, not float64 (twice as fast again): a sum that overflows to inf
        # though every value is finite is looked at row by row (``_marked``).
        total = float(rows.sum(dtype=torch.float32) if rows.element_size() < 4 else rows.sum())
        if not math.isfinite(total):
            return self._marked(view, rows)
        # The same memory, shape and strides as a view's before, still holding the same sum:
        # the same values, so the same winners. (An in-place op since, such as
        # ReLU(inplace=True) after a BatchNorm, changes the sum; inference mode keeps no
        # version counter to tell.) The same memory means the same storage, still alive: a
        # freed output's address is soon another layer's, and outputs of one sum are common
        # (a Softmax's rows sum to 1, a LayerNorm's to about 0), so an address alone gave one
        # layer another's winners.
        key = (rows.data_ptr(), tuple(rows.shape), rows.stride(), rows.dtype, total,
               view.channels)
        storage = _storage(rows)
        held = self.seen.get(key)
        if held is not None and storage is not None and held[0]() is storage:
            return held[1]
        values = _per_item(view, rows)
        # First of ties, in the dtype a query's pass reduces (the model's; CHANNELS' float64
        # means): as an ARGMAX's pass counts it (engine/aggregates.py).
        winners = row_argmax(values)
        if storage is not None:
            # A weak reference: the batch's outputs are not kept alive for it (torch keeps one
            # Python object per live storage, so the reference dies with the memory).
            try:
                self.seen[key] = (weakref.ref(storage), winners)
            except TypeError:  # a storage that takes no weak reference: never reused
                pass
        return winners

    @staticmethod
    def _marked(view: View, rows: torch.Tensor) -> torch.Tensor:
        """The winners of a batch some of whose values are NaN or inf (or whose sum overflowed):
        ``view.neurons`` for each item whose row holds one."""
        values = _per_item(view, rows)
        finite = torch.isfinite(values).all(dim=1).cpu()
        winners = row_argmax(torch.nan_to_num(values))
        winners[~finite] = view.neurons
        return winners

    def drop_layer(self, name: str) -> None:
        """Drop every view of the layer ``name`` (it ran more than once in a batch)."""
        for key in [key for key, view in self.views.items() if view.layer.name == name]:
            self.drop(key)

    def drop(self, key: str) -> None:
        for table in (self.views, self.winners, self.batch):
            table.pop(key, None)

    def after_batch(self, size: int) -> None:
        """Take the batch's winners of every view (a view whose layer did not run is dropped)."""
        start = self.position
        self.position += size
        self.seen.clear()
        for key in list(self.views):
            winners = self.batch.pop(key, None)
            if winners is None or len(winners) != size:
                self.drop(key)
                continue
            self.winners[key][start:start + size] = winners.numpy()

    def result(self) -> dict[str, np.ndarray]:
        """Every kept view's winners, by ``key_of`` the view."""
        return dict(self.winners)


def to_arrays(winners: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The profile entry's part (storage/store.py: arrays, no pickle): the keys, then each
    view's winners in their order."""
    arrays = {"winner_keys": np.array(list(winners), dtype=np.str_)}
    for i, rows in enumerate(winners.values()):
        arrays[f"winners_{i}"] = rows
    return arrays


def from_arrays(arrays, n_items: int) -> dict[str, np.ndarray]:
    """Decode ``to_arrays``, raising ValueError unless each view's winners are ``n_items``
    unsigned integers."""
    keys = [str(key) for key in np.asarray(arrays["winner_keys"]).reshape(-1).tolist()]
    out = {}
    for i, key in enumerate(keys):
        winners = arrays[f"winners_{i}"]
        if winners.shape != (n_items,) or winners.dtype.kind != "u":
            raise ValueError(f"its winners of {key} do not describe {n_items:,} items")
        out[key] = winners
    return out
