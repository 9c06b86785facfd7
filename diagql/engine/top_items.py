"""The k items of highest (or lowest) activation per neuron, a mergeable state: TOPK k
INPUTS' and the inputs index's (engine/top_inputs.py, engine/inputs_index.py), reduced batch
by batch as engine/aggregates.py's states are."""
from __future__ import annotations

import numpy as np
import torch


class TopItems:
    """Per neuron, the k items of highest activation (``largest=False``: lowest), ties to the
    lower item index: the state of TOPK k INPUTS and of the inputs index.

    Kept as (neurons, ≤k) scores (the activation, negated for the lowest, in float64) and
    item indices, in no order until ``finalize``: each batch costs top-k selections, never a
    sort. A merge of states fed with any split of the items gives the same lists as one
    state fed with them all."""

    def __init__(self, n_neurons: int, k: int, largest: bool = True):
        self.k = k
        self.largest = largest
        self.scores = torch.empty((n_neurons, 0), dtype=torch.float64)
        self.items = torch.empty((n_neurons, 0), dtype=torch.int64)
        self.count = 0
        self._last = -1  # the highest item index taken

    def update(self, values: torch.Tensor, idx: np.ndarray) -> bool:
        """Take the (items × neurons) activations of items ``idx`` (distinct, not seen before)."""
        if not bool(torch.isfinite(values).all()):
            return False
        self.take_scores(neuron_major(values, self.largest), idx)
        return True

    def take_scores(self, scores: torch.Tensor, idx: np.ndarray) -> None:
        """``update`` with the batch already checked and as ``neuron_major`` makes it (so
        that the two ends of one batch share one copy)."""
        if len(idx):
            numbers = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            items = numbers.expand(scores.shape[0], -1)
            later = int(np.min(idx)) > self._last
            self._last = max(self._last, int(np.max(idx)))
            if self.scores.shape[1] == self.k:
                # Full: only scores that reach a neuron's k-th kept one can enter (a tie only
                # when it comes from a lower item index). The m best of each neuron hold all
                # of them, m the most that any neuron has.
                floor = self.scores.min(dim=1, keepdim=True).values
                enter = scores > floor if later else scores >= floor
                reach = int(enter.sum(dim=1).max())
                if reach == 0:
                    self.count += len(idx)
                    return
                if reach < scores.shape[1]:
                    best = scores.topk(reach, dim=1).indices
                    scores, items = scores.gather(1, best), numbers[best]
            if self.scores.shape[1]:
                scores = torch.cat([self.scores, scores], 1)
                items = torch.cat([self.items, items], 1)
            self._keep(scores, items)
        self.count += len(idx)

    def merge(self, other: "TopItems") -> "TopItems":
        self._keep(torch.cat([self.scores, other.scores], 1),
                   torch.cat([self.items, other.items], 1))
        self.count += other.count
        self._last = max(self._last, other._last)
        return self

    def _keep(self, scores: torch.Tensor, items: torch.Tensor) -> None:
        """Each row's k best of (scores, items): every score above the k-th best, and of those
        equal to it, the lowest item indices."""
        n, width = scores.shape
        if width <= self.k:
            self.scores, self.items = scores, items
            return
        kth = scores.topk(self.k, dim=1).values[:, -1:]
        above = scores > kth
        need = self.k - above.sum(dim=1, keepdim=True)  # at least 1: the k-th itself
        tied = scores == kth
        key = torch.where(tied, items, torch.iinfo(torch.int64).max)
        most = int(need.max())
        lowest = key.topk(most, dim=1, largest=False).indices
        chosen = torch.zeros_like(tied).scatter_(1, lowest, torch.arange(most) < need)
        keep = above | (chosen & tied)
        self.scores, self.items = scores[keep].view(n, self.k), items[keep].view(n, self.k)

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(items, activations), each (neurons, ≤k), best first, ties by item index."""
        by_item = self.items.argsort(dim=1)
        scores, items = self.scores.gather(1, by_item), self.items.gather(1, by_item)
        best = scores.argsort(dim=1, descending=True, stable=True)
        scores, items = scores.gather(1, best), items.gather(1, best)
        values = scores if self.largest else -scores
        return items.numpy().copy(), values.numpy().copy()


def neuron_major(values: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """(items × neurons) activations as TopItems scores: one contiguous (neurons, items)
    float64 copy (selections along a strided axis are slow), negated for the lowest."""
    scores = torch.empty((values.shape[1], values.shape[0]), dtype=torch.float64)
    scores.copy_(values.detach().T)
    return scores if largest else scores.neg_()
