"""The inputs index of a layer's view (DeepEverest's idea, Bhatt et al. 2023): per neuron the
K items of highest and of lowest activation, exactly, and every item's activation coded in
256 equal-width bins of that neuron, so that a later TOPK k INPUTS on any neuron, any k and
any WHERE is answered exactly while reading only the items its bins cannot order
(docs/ARCHITECTURE.md, "Top inputs").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diagql.engine.top_items import TopItems, neuron_major
from diagql.engine.nonfinite import NonFinite

K = 100  # items kept exactly per neuron and end: a query they answer reads no item at all
# The float16 activations of every item held while an index is built (codes are made from
# them once the pass has given each neuron's range); a layer beyond it gets the lists alone.
BUILD_BUDGET = 512 * 1024 ** 2
BINS = 256  # codes are uint8
# A view wider than this gets no index: keeping K items per neuron and end costs a pass
# several times a plain one (262,144 neurons: 25 s beside 2.6 s at 200 items; 240 s and 5 GB
# at 2,000), while a pass over the matching items reads the one neuron asked of.
MAX_NEURONS = 65_536
# What building costs per activation (neuron × item): the two ends' top-k selections, their
# final sort and the codes, measured at 0.2-0.45 µs on two cores (50,257 neurons: 4.5 s at 200
# items, 10.5 s at 1,000), beside 1.5 ms per item for the pass of a small GPT-2 that has them.
BUILD_SECONDS_PER_ACTIVATION = 2e-7
# An index estimated to cost less than this is built by the first exact query whatever
# the pass costs (docs/ARCHITECTURE.md, "Top inputs": when an index is built).
CHEAP_BUILD_SECONDS = 1.0
_HALF_MAX = 65504.0  # float16's largest finite value
# Rows ranked together (up to 64 MB of them): far fewer top-k selections than one per batch.
CHUNK, CHUNK_BYTES = 8192, 64 * 1024 ** 2


def build_seconds(neurons: int, n_items: int) -> float:
    """About what building the index of a view of ``neurons`` over ``n_items`` costs."""
    return neurons * n_items * BUILD_SECONDS_PER_ACTIVATION


class IndexBuilder:
    """A forward-pass consumer over every item that builds the view's InputsIndex."""

    def __init__(self, view, n_items: int, k: int | None = None,
                 budget: int | None = None):
        self.view = view
        self.n_items = n_items
        self.items = self.wanted = np.arange(n_items, dtype=np.int64)
        self.base = 0  # the first of ``items``, which are consecutive (a shard's part: a run)
        n = view.neurons
        k = min(K if k is None else k, n_items)
        self.top, self.bottom = TopItems(n, k, True), TopItems(n, k, False)
        self.coded = n_items * n * 2 <= (BUILD_BUDGET if budget is None else budget)
        self.half = torch.empty((n_items, n), dtype=torch.float16) if self.coded else None
        self.bad = NonFinite()
        self._pending: list[tuple[torch.Tensor, np.ndarray]] = []
        self._chunk = max(1, min(CHUNK, CHUNK_BYTES // (4 * n)))

    def part(self, items: np.ndarray) -> IndexBuilder:
        """An empty builder of ``items`` (a run of consecutive items), for a shard of the
        pass (engine/shards.py). Its float16 rows are made where it is fed and travel back
        with its lists: codes need every item's range, so the driver makes them."""
        part = object.__new__(IndexBuilder)
        part.__dict__.update(self.__dict__)
        n = self.view.neurons
        part.items = part.wanted = items
        part.base = int(items[0]) if len(items) else 0
        part.top, part.bottom = TopItems(n, self.top.k, True), TopItems(n, self.top.k, False)
        part.half, part.bad, part._pending = None, NonFinite(), []
        return part

    def merge(self, part: IndexBuilder) -> IndexBuilder:
        """Take in a fed part's lists (ties still to the lower index: TopItems.merge) and
        float16 rows, as if this builder had seen its items."""
        part._rank()
        self.top.merge(part.top)
        self.bottom.merge(part.bottom)
        if part.half is not None:
            self.half[part.base:part.base + len(part.half)] = part.half
        self.bad.merge(part.bad)
        return self

    def __getstate__(self) -> dict:
        # A shard's part ranks the rows it still holds before it travels back: its lists
        # go to the driver, not its float32 rows.
        self._rank()
        return self.__dict__

    def take(self, rows: torch.Tensor, idx: np.ndarray) -> None:
        values = self.view.finish(rows.detach())
        if self.coded:
            if self.half is None:  # a part's, made where it is fed
                self.half = torch.empty((len(self.items), values.shape[1]), dtype=torch.float16)
            # Rounding to float16 and clamping are monotone: codes made from these values
            # order items as their activations do, which is all the lookup relies on.
            self.half[torch.from_numpy(idx - self.base)] = \
                values.clamp(-_HALF_MAX, _HALF_MAX).to("cpu", torch.float16)
        # A copy: a later in-place op of the model may overwrite the output. float64 stays
        # float64 (a float64 model's, a channel's mean): rounded to float32 the lists ranked
        # near-ties unlike the exact pass, and a query answered from them changed its order.
        wide = values.dtype == torch.float64
        self._pending.append((values.to("cpu", torch.float64 if wide else torch.float32,
                                        copy=True), idx))
        if sum(len(i) for _, i in self._pending) * (2 if wide else 1) >= self._chunk:
            self._rank()

    def _rank(self) -> None:
        if not self._pending:
            return
        values = torch.cat([v for v, _ in self._pending])
        idx = np.concatenate([i for _, i in self._pending])
        self._pending = []
        if not bool(torch.isfinite(values).all()):
            self.bad.add(idx, ~torch.isfinite(values).all(dim=1).cpu().numpy())
            return
        scores = neuron_major(values)
        self.top.take_scores(scores, idx)
        self.bottom.take_scores(-scores, idx)  # a copy: the top may keep ``scores``

    def finished(self) -> "InputsIndex | None":
        """The index, or None for a layer with NaN or inf for some item: each query on it then
        ranks its own neuron's allowed items (TOPK 3 INPUTS FOR log[2] WHERE class != 0 had
        been refused for log[0]'s NaN in class 0's items)."""
        self._rank()
        return None if self.bad.count else self.finish()

    def finish(self) -> "InputsIndex":
        self._rank()
        self.bad.check(f"layer {self.view.layer.name!r} has NaN or infinite activations for",
                       self.n_items, "DiagQL does not rank items by them")
        top_items, top_values = self.top.finalize()
        bottom_items, bottom_values = self.bottom.finalize()
        codes = None if self.half is None else _codes(self.half)
        self.half = None
        return InputsIndex(top_items, top_values, bottom_items, bottom_values, codes,
                           self.n_items)


def _codes(half: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """(neurons, items) uint8: each item's bin among 256 equal ones over the neuron's range.
    Any monotone map would do; equal widths leave a heavy tail's top bins nearly empty, so
    the items a top-k query must read are few."""
    n = half.shape[1]
    codes = np.empty((n, half.shape[0]), dtype=np.uint8)
    for start in range(0, n, chunk):
        block = half[:, start:start + chunk].to(torch.float32)
        low, high = block.min(dim=0).values, block.max(dim=0).values
        width = (high - low) / BINS
        width = torch.where(width > 0, width, torch.ones_like(width))
        binned = ((block - low) / width).floor_().clamp_(0, BINS - 1)
        codes[start:start + chunk] = binned.to(torch.uint8).T.numpy()
    return codes


@dataclass(frozen=True)
class Lookup:
    """What the index says about one query: the allowed items it knows exactly (with their
    activations) and the items whose activations must be read to be sure of the top k."""

    known: np.ndarray
    values: np.ndarray
    read: np.ndarray  # sorted item indices to send through the model


@dataclass(frozen=True, eq=False)
class InputsIndex:
    top_items: np.ndarray  # (neurons, K) int64, best first, ties to the lower index
    top_values: np.ndarray  # (neurons, K) float64
    bottom_items: np.ndarray
    bottom_values: np.ndarray
    codes: np.ndarray | None  # (neurons, items) uint8, or None for a layer past the budget
    n_items: int

    @property
    def k(self) -> int:
        return self.top_items.shape[1]

    def lookup(self, neuron: int, k: int, allowed: np.ndarray, largest: bool) -> Lookup | None:
        """The exact top-k (bottom-k) of ``neuron`` among the ``allowed`` items (a bool mask
        over all items) is among ``known`` and ``read``; None when only a pass over every
        allowed item can tell (a layer indexed without codes)."""
        items = (self.top_items if largest else self.bottom_items)[neuron]
        values = (self.top_values if largest else self.bottom_values)[neuron]
        listed = allowed[items]
        known, known_values = items[listed], values[listed]
        empty = np.empty(0, dtype=np.int64)
        if len(known) >= k or len(items) == self.n_items:
            return Lookup(known[:k], known_values[:k], empty)
        if self.codes is None:
            return None
        # Items in a higher bin have a higher activation; those of the k-th best allowed
        # item's bin and above hold the top k, and the lists know some of them exactly.
        codes = self.codes[neuron]
        pool = np.flatnonzero(allowed)
        if len(pool) > k:
            mine = codes[pool] if largest else (BINS - 1) - codes[pool]
            threshold = np.partition(mine, len(mine) - k)[len(mine) - k]
            pool = pool[mine >= threshold]
        return Lookup(known, known_values, np.setdiff1d(pool, known))

    # --- the disk cache's encoding --------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"top_items": self.top_items, "top_values": self.top_values,
                  "bottom_items": self.bottom_items, "bottom_values": self.bottom_values,
                  "n_items": np.array(self.n_items)}
        if self.codes is not None:
            arrays["codes"] = self.codes
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict, n_neurons: int, n_items: int) -> "InputsIndex":
        lists = [arrays[name] for name in ("top_items", "top_values", "bottom_items",
                                           "bottom_values")]
        codes = arrays.get("codes")
        shape = lists[0].shape
        if (int(arrays["n_items"]) != n_items or len(shape) != 2 or shape[0] != n_neurons
                or any(a.shape != shape for a in lists)
                or lists[0].dtype != np.int64 or lists[2].dtype != np.int64
                or any(a.dtype != np.float64 for a in lists[1::2])
                or (shape[1] and (min(lists[0].min(), lists[2].min()) < 0
                                  or max(lists[0].max(), lists[2].max()) >= n_items))
                or (codes is not None and (codes.dtype != np.uint8
                                           or codes.shape != (n_neurons, n_items)))):
            raise ValueError("its lists or codes do not match the layer and the data")
        return cls(*lists, codes, n_items)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.to_arrays().values())
