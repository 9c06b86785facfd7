"""Mergeable aggregate states, reduced batch by batch: update(values), merge(other), finalize().

``values`` is a tensor (items × neurons) in the model's dtype. Sums accumulate in float64 so
that a streamed mean agrees with a mean over the materialised activations to far better than
1e-5. ``update`` returns False, leaving the state as it was, when the batch holds NaN or inf.

A state made with ``groups=G`` holds G × neurons (GROUP BY): ``update(values, codes)`` reduces
every group of the batch at once (``index_add_`` and its kin, item ``i`` into row
``codes[i]``) instead of selecting each group's rows, and ``group(g)`` is row g as a state of
its own (docs/ARCHITECTURE.md, "Plan and execute"). ``covariates=p`` (a sample's
model-assisted estimate, engine/regression.py) also sums the items' p covariates against their
values, per group the same way; ``update`` then takes them as ``z``. With a block prediction
(engine/prediction.py) a mean state sums the values against the latent's columns only and the
squared residual of the prediction directly.
"""
from __future__ import annotations

import numpy as np
import torch

from diagql.engine.regression import CrossSums
from diagql.model.winners import row_argmax

_CHUNK_BYTES = 1 << 20  # float64 pieces of a batch that stay in a core's cache (CPU only)
# Wider than this, a CPU batch's float64 column sums are taken over upcast pieces even without
# squares: sum(dim=0, dtype=float64) runs 1.4-4.7x slower there (256 x 4,704: 3.9 ms against
# 1.1 ms; 64 x 150,528: 154 against 33 ms), the same sums bit for bit; narrower, it is faster.
_WIDE = 2048


def _pieces(values: torch.Tensor, codes: torch.Tensor | None, z: torch.Tensor | None = None):
    """(rows, their codes, their covariates) in pieces whose float64 copy is about 1 MB on the
    CPU: upcasting a whole batch writes and rereads twice its size through memory (measured
    1.7x slower)."""
    rows = len(values) if values.device.type != "cpu" else \
        max(1, _CHUNK_BYTES // (8 * max(values.shape[1], 1)))
    for start in range(0, len(values), rows):
        stop = start + rows
        yield (values[start:stop], None if codes is None else codes[start:stop],
               None if z is None else z[start:stop])


def _finite(values: torch.Tensor) -> bool:
    """Whether every value is finite: a float64 sum cannot overflow for float32 or narrower
    values and is NaN or inf exactly when one of them is (3x cheaper than isfinite(values))."""
    if values.dtype == torch.float64:
        return bool(torch.isfinite(values).all())
    return bool(torch.isfinite(values.sum(dtype=torch.float64)))


def _add_sums(total: torch.Tensor, squares: torch.Tensor | None, wide: torch.Tensor,
              codes: torch.Tensor | None) -> None:
    """Σy and Σy² of a float64 piece, into the batch's sums (per group with ``codes``)."""
    if codes is None:
        total += wide.sum(dim=0)
        if squares is not None:
            squares += (wide * wide).sum(dim=0)
    else:
        total.index_add_(0, codes, wide)
        if squares is not None:
            squares.index_add_(0, codes, wide * wide)


def _add_counts(count, codes: torch.Tensor | None, n: int):
    if codes is None:
        return count + n
    return count + torch.bincount(codes.cpu(), minlength=len(count))


def _counts_like(count, codes: torch.Tensor | None, n: int):
    """A batch's counts in the form of a state's ``count`` (an int, or one per group)."""
    return _add_counts(torch.zeros_like(count) if isinstance(count, torch.Tensor) else 0,
                       codes, n)


class MeanState:
    """Per-neuron mean: (sum, sum of squares, count); the squares give the standard error.

    ``spread=False`` (an exact answer, which needs no standard error) skips the squares."""

    def __init__(self, n_neurons: int, spread: bool = True, groups: int | None = None,
                 covariates: int = 0, prediction=None):
        shape = (n_neurons,) if groups is None else (groups, n_neurons)
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.sumsq = torch.zeros(shape, dtype=torch.float64) if spread else None
        self.count = 0 if groups is None else torch.zeros(groups, dtype=torch.int64)
        # A block prediction (engine/prediction.py) takes the covariates' last k columns z_b:
        # zᵀy is summed against the first p (the latent's) only, Σz and Σzzᵀ over all of them
        # (``block``), and Σr² of the residual r = y − ŷ directly (``residual_squares``); the
        # residual's other sums follow from these exactly (BlockPrediction.sums).
        self.prediction = prediction
        latent = covariates if prediction is None else prediction.p
        self.cross = CrossSums(latent, n_neurons, groups) if covariates else None
        # Σr² may be taken over some of the rows only (``fit`` in ``update``, the Reducer's
        # prediction.fit_rows): their Σr and count come with it.
        self.block = self.residual_squares = self.residual_sum = None
        self.residual_count = self.count
        if prediction is not None and covariates:
            self.block = CrossSums(covariates, 0, groups)
            self.residual_squares = torch.zeros(shape, dtype=torch.float64)
            self.residual_sum = torch.zeros(shape, dtype=torch.float64)

    def update(self, values: torch.Tensor, codes: torch.Tensor | None = None,
               z: torch.Tensor | None = None, fit: torch.Tensor | None = None) -> bool:
        """``fit``: which rows the block prediction's Σr² takes (None: all of them)."""
        total = torch.zeros(self.sum.shape, dtype=torch.float64, device=values.device)
        squares = None if self.sumsq is None else torch.zeros_like(total)
        # The covariates' sums take each float64 piece while it is in cache (one upcast of the
        # batch, not two: 3x cheaper on a 256 x 4,704 batch), into sums of the batch's own
        # that join the state only once the batch is known to be finite.
        block = residual = None
        if self.block is not None and z is not None:
            block = self.block.like()
            block.add_z(z, codes)
            residual = self._residual(values, z, codes, fit)
            z = z[:, :self.prediction.p].contiguous()
        cross = None if self.cross is None or z is None else self.cross.like()
        if cross is not None:
            cross.add_z(z, codes)
        if squares is None and codes is None and cross is None and (
                values.shape[1] <= _WIDE or values.device.type != "cpu"):
            total = values.sum(dim=0, dtype=torch.float64)  # upcasts as it goes: no copy
        else:
            for piece, piece_codes, piece_z in _pieces(values, codes, z):
                wide = piece.to(torch.float64)
                if cross is not None:
                    cross.add_products(piece_z, wide, piece_codes)
                _add_sums(total, squares, wide, piece_codes)
        # NaN or inf anywhere in the batch makes a sum NaN or inf: one check per neuron.
        if not bool(torch.isfinite(total).all()):
            return False
        self.sum += total.cpu()
        if squares is not None:
            self.sumsq += squares.cpu()
        if cross is not None:
            self.cross.merge(cross)
        if block is not None:
            self.block.merge(block)
            self.residual_squares += residual[0]
            if residual[1] is not None:
                self.residual_sum += residual[1]
            self.residual_count = self.residual_count + residual[2]
        self.count = _add_counts(self.count, codes, values.shape[0])
        return True

    def _residual(self, values, z, codes, fit) -> tuple:
        """The block prediction's (Σr², Σr or None, rows counted) of a batch, over the rows
        ``fit`` marks (all with None, when Σr follows from the other sums exactly)."""
        if fit is None:
            squares = self.prediction.residual_squares(values, z, codes, self.sum.shape)
            return squares, None, _counts_like(self.count, codes, len(values))
        codes = None if codes is None else codes[fit.to(codes.device)]
        values, z = values[fit.to(values.device)], z[fit]
        squares, total = self.prediction.residual_squares(values, z, codes, self.sum.shape,
                                                          with_sum=True)
        return squares, total, _counts_like(self.count, codes, len(values))

    def merge(self, other: MeanState) -> MeanState:
        self.sum += other.sum
        if self.sumsq is not None:
            self.sumsq += other.sumsq
        if self.cross is not None and other.cross is not None:
            self.cross.merge(other.cross)
        if self.block is not None and other.block is not None:
            self.block.merge(other.block)
            self.residual_squares += other.residual_squares
            self.residual_sum += other.residual_sum
            self.residual_count = self.residual_count + other.residual_count
        self.count = self.count + other.count
        return self

    def group(self, g: int) -> MeanState:
        part = MeanState.__new__(MeanState)
        part.sum, part.count = self.sum[g], int(self.count[g])
        part.sumsq = None if self.sumsq is None else self.sumsq[g]
        part.cross = None if self.cross is None else self.cross.group(g)
        part.prediction = self.prediction
        part.block = None if self.block is None else self.block.group(g)
        part.residual_squares = part.residual_sum = None
        part.residual_count = part.count
        if self.block is not None:
            part.residual_squares, part.residual_sum = (self.residual_squares[g],
                                                        self.residual_sum[g])
            part.residual_count = int(self.residual_count[g])
        return part

    def finalize(self) -> np.ndarray:
        return (self.sum / max(self.count, 1)).numpy()


class MaxState:
    """Per-neuron running maximum."""

    def __init__(self, n_neurons: int, groups: int | None = None):
        shape = (n_neurons,) if groups is None else (groups, n_neurons)
        self.max = torch.full(shape, -torch.inf, dtype=torch.float64)
        self.count = 0 if groups is None else torch.zeros(groups, dtype=torch.int64)

    def update(self, values: torch.Tensor, codes: torch.Tensor | None = None,
               z: torch.Tensor | None = None) -> bool:
        # ``z`` as the other states take it; a maximum has no regression estimator.
        if not _finite(values):
            return False
        if values.shape[0]:
            if codes is None:
                top = values.max(dim=0).values
            else:
                top = torch.full(self.max.shape, -torch.inf, dtype=values.dtype,
                                 device=values.device)
                top.scatter_reduce_(0, codes[:, None].expand_as(values), values, "amax")
            self.max = torch.maximum(self.max, top.to(torch.float64).cpu())
        self.count = _add_counts(self.count, codes, values.shape[0])
        return True

    def merge(self, other: MaxState) -> MaxState:
        self.max = torch.maximum(self.max, other.max)
        self.count = self.count + other.count
        return self

    def group(self, g: int) -> MaxState:
        part = MaxState.__new__(MaxState)
        part.max, part.count = self.max[g], int(self.count[g])
        return part

    def finalize(self) -> np.ndarray:
        return self.max.numpy().copy()


class ArgmaxState:
    """How often each neuron is an item's maximally activated one (ties: the lowest index);
    ``covariates=p`` also sums the items' covariates against their one-hot winners."""

    def __init__(self, n_neurons: int, groups: int | None = None, covariates: int = 0,
                 prediction=None):
        shape = (n_neurons,) if groups is None else (groups, n_neurons)
        self.counts = torch.zeros(shape, dtype=torch.int64)
        self.count = 0 if groups is None else torch.zeros(groups, dtype=torch.int64)
        # Winners are not linear in the row: a block prediction's columns are not used, only
        # the latent's (the first ``prediction.p``).
        self.latent = covariates if prediction is None else prediction.p
        self.cross = CrossSums(self.latent, n_neurons, groups) if covariates else None

    def update(self, values: torch.Tensor, codes: torch.Tensor | None = None,
               z: torch.Tensor | None = None) -> bool:
        if not _finite(values):
            return False
        # Upcasting is exact and keeps the order, so the winner is the model dtype's.
        self.add_winners(row_argmax(values), codes, z)
        return True

    def add_winners(self, winners: torch.Tensor, codes: torch.Tensor | None = None,
                    z: torch.Tensor | None = None) -> None:
        """Count items by their winners (int64, on the CPU): a batch's, or the profile's
        (model/winners.py), which need no rows."""
        if len(winners):
            if self.cross is not None and z is not None:
                self.cross.add_winners(z[:, :self.latent], winners, codes)
            if codes is not None:  # one histogram of (group, neuron) cells
                winners = codes.cpu() * self.counts.shape[-1] + winners
            self.counts += torch.bincount(winners, minlength=self.counts.numel()
                                          ).reshape(self.counts.shape)
        self.count = _add_counts(self.count, codes, len(winners))

    def merge(self, other: ArgmaxState) -> ArgmaxState:
        self.counts += other.counts
        if self.cross is not None and other.cross is not None:
            self.cross.merge(other.cross)
        self.count = self.count + other.count
        return self

    def group(self, g: int) -> ArgmaxState:
        part = ArgmaxState.__new__(ArgmaxState)
        part.counts, part.count = self.counts[g], int(self.count[g])
        part.cross = None if self.cross is None else self.cross.group(g)
        return part

    def finalize(self) -> np.ndarray:
        """The distribution: the fraction of items whose maximal neuron each neuron is."""
        return (self.counts.to(torch.float64) / max(self.count, 1)).numpy()


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


STATES = {"avg": MeanState, "argmax": ArgmaxState, ("topk", "mean"): MeanState,
          ("topk", "max"): MaxState}


def state_for(aggregate: str, order: str, n_neurons: int, spread: bool = True,
              groups: int | None = None, covariates: int = 0, prediction=None):
    """A fresh state (G × neurons with ``groups=G``); ``covariates`` (p > 0) makes a mean or
    argmax state sum them too, ``prediction`` (a block's, engine/prediction.py) a mean
    state sum its residual against the latent's."""
    key = aggregate if aggregate != "topk" else (aggregate, order)
    if STATES[key] is MeanState:
        return MeanState(n_neurons, spread, groups, covariates, prediction)
    if STATES[key] is ArgmaxState:
        return ArgmaxState(n_neurons, groups, covariates, prediction)
    return STATES[key](n_neurons, groups)


def rank(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties go to the lower neuron index."""
    order = np.argsort(-values, kind="stable")
    return order[:k]
