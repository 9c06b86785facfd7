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

from diagql.engine.leverage import WEIGHTS
from diagql.engine.regression import CrossSums, OutlierRows, RowSums
from diagql.model.winners import row_argmax

_CHUNK_BYTES = 1 << 20  # float64 pieces of a batch that stay in a core's cache (CPU only)
_PIECE_ROWS = 4
_POOLED_BYTES = 8 << 20  # a sample batch's float64 pieces where it also takes pooled products
# Wider than this, a CPU batch's float64 column sums are taken over upcast pieces even without
# squares: sum(dim=0, dtype=float64) runs 1.4-4.7x slower there (256 x 4,704: 3.9 ms against
# 1.1 ms; 64 x 150,528: 154 against 33 ms), the same sums bit for bit; narrower, it is faster.
_WIDE = 2048


def _slices(values: torch.Tensor) -> list[slice]:
    """The batch's rows in pieces whose float64 copy is about 1 MB on the CPU: upcasting a
    whole batch writes and rereads twice its size through memory (measured 1.7x slower); of
    at least _PIECE_ROWS rows, where a wider layer's 1 or 2 rows a piece made calls too
    small (a 65,536-neuron map's states 25-35% slower than with 4)."""
    rows = len(values) if values.device.type != "cpu" else \
        max(_PIECE_ROWS, _CHUNK_BYTES // (8 * max(values.shape[1], 1)))
    return [slice(start, start + rows) for start in range(0, len(values), rows)]


def _pieces(values: torch.Tensor, codes: torch.Tensor | None, *also: torch.Tensor | None):
    """(rows, their codes, then the same rows of each of ``also``: covariates, or None), a
    piece (``_slices``) at a time."""
    for part in _slices(values):
        yield (values[part], None if codes is None else codes[part],
               *(None if other is None else other[part] for other in also))


def _finite(values: torch.Tensor) -> bool:
    """Whether every value is finite: a float64 sum cannot overflow for float32 or narrower
    values and is NaN or inf exactly when one of them is (3x cheaper than isfinite(values))."""
    if values.dtype == torch.float64:
        return bool(torch.isfinite(values).all())
    return bool(torch.isfinite(values.sum(dtype=torch.float64)))


def _add_sums(total: torch.Tensor, squares: torch.Tensor | None, wide: torch.Tensor,
              codes: torch.Tensor | None, own: bool = False) -> None:
    """Σy and Σy² of a float64 piece, into the batch's sums (per group with ``codes``);
    ``own``: the piece is a copy of the caller's, squared in place (no second copy)."""
    if codes is None:
        total += wide.sum(dim=0)
        if squares is not None:
            squares += (wide.square_() if own else wide * wide).sum(dim=0)
    else:
        total.index_add_(0, codes, wide)
        if squares is not None:
            squares.index_add_(0, codes, wide.square_() if own else wide * wide)


def _pooled_sums(values: torch.Tensor, zd: torch.Tensor, total: torch.Tensor,
                 squares: torch.Tensor | None, pooled: torch.Tensor) -> None:
    """Σy, Σy² and the pooled products Σ(Dᵀz)yᵀ of a batch without groups, into the batch's
    float64 sums, over float64 pieces of about 8 MB (a 256 × 4,704 batch in two): each piece
    summed, multiplied and then squared in place (it is the state's own copy). Per 1 MB piece
    the calls' own cost, not memory, had ruled, and the squares' product was a second copy:
    1.08 → 0.75 ms a conv1 batch (docs/ARCHITECTURE.md, "Plan and execute")."""
    rows = len(values) if values.device.type != "cpu" else \
        max(_PIECE_ROWS, _POOLED_BYTES // (8 * max(values.shape[1], 1)))
    for start in range(0, len(values), rows):
        piece = values[start:start + rows]
        wide = piece.to(torch.float64)
        total += wide.sum(dim=0)
        pooled.addmm_(zd[start:start + rows].T, wide)
        if squares is not None:
            squares += (wide.square_() if wide is not piece else wide * wide).sum(dim=0)


def _add_counts(count, codes: torch.Tensor | None, n: int):
    if codes is None:
        return count + n
    return count + torch.bincount(codes.cpu(), minlength=len(count))


class MeanState:
    """Per-neuron mean: (sum, sum of squares, count); the squares give the standard error.

    ``spread=False`` (an exact answer, which needs no standard error) skips the squares.

    ``covariates`` (width; a sample's model-assisted estimate, engine/regression.py) adds, per
    group: Σz of every covariate column and Σ z_latent zᵀ over every row (``zsums``); over the
    fit rows (``fit`` in ``update``, prediction.fit_rows; all rows without it) the count, Σv,
    Σv² and the latent's zᵀv (``fit_cross``), v the values or, with a block ``prediction``,
    their residual r = y − ŷ; and with ``directions`` (regression.Pooled), the pooled slope's
    products Σ (Dᵀz)yᵀ over every row, d × neurons, in no group (docs/ARCHITECTURE.md,
    "Estimates")."""

    def __init__(self, n_neurons: int, spread: bool = True, groups: int | None = None,
                 covariates: int = 0, prediction=None, directions: np.ndarray | None = None):
        shape = (n_neurons,) if groups is None else (groups, n_neurons)
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.sumsq = torch.zeros(shape, dtype=torch.float64) if spread else None
        self.count = 0 if groups is None else torch.zeros(groups, dtype=torch.int64)
        self.prediction = prediction
        self.latent = covariates if prediction is None else prediction.p
        self.zsums = self.fit_cross = self.fit_sum = self.fit_squares = None
        self.fit_count = self.count
        self.directions = self.pooled = self.weighted = None  # weighted: ``_weighted``
        self._waiting, self._waiting_rows = [], 0  # fit rows not yet summed (``_hold``)
        if covariates:
            self.zsums = CrossSums(covariates, 0, groups, gram_rows=self.latent)
            self.fit_cross = CrossSums(self.latent, n_neurons, groups)
            self.fit_sum = torch.zeros(shape, dtype=torch.float64)
            self.fit_squares = torch.zeros(shape, dtype=torch.float64)
            if directions is not None:
                self.directions = torch.from_numpy(np.ascontiguousarray(directions))
                self.pooled = torch.zeros(directions.shape[1], n_neurons, dtype=torch.float64)

    def update(self, values: torch.Tensor, codes: torch.Tensor | None = None,
               z: torch.Tensor | None = None, fit: torch.Tensor | None = None,
               weights: torch.Tensor | None = None) -> bool:
        """``fit``: which rows the residual variance's sums take (None: all of them);
        ``weights``: each row's leverage weights (rows × 4, float64, CPU; leverage.py)."""
        if codes is not None and values.device.type == "cpu" and \
                (self.pooled is None or z is None):
            return self._update_groups(values, codes, z, fit, weights)
        total = torch.zeros(self.sum.shape, dtype=torch.float64, device=values.device)
        squares = None if self.sumsq is None else torch.zeros_like(total)
        # The pooled products take each float64 piece while it is in cache with the sums
        # (one upcast of the batch, not two: 3x cheaper on a 256 x 4,704 batch).
        pooled = zd = None
        if self.pooled is not None and z is not None:
            pooled = torch.zeros_like(self.pooled, device=values.device)
            zd = (z[:, :self.latent] @ self.directions).to(values.device)
        if squares is None and codes is None and pooled is None and (
                values.shape[1] <= _WIDE or values.device.type != "cpu"):
            total = values.sum(dim=0, dtype=torch.float64)  # upcasts as it goes: no copy
        elif pooled is not None and codes is None:
            _pooled_sums(values, zd, total, squares, pooled)
        else:
            for piece, piece_codes, piece_zd in _pieces(values, codes, zd):
                wide = piece.to(torch.float64)
                if pooled is not None:
                    pooled.addmm_(piece_zd.T, wide)
                _add_sums(total, squares, wide, piece_codes)
        # NaN or inf anywhere in the batch makes a sum NaN or inf: one check per neuron. Only
        # a finite batch joins the state, and then the covariates' sums go straight into it.
        if not bool(torch.isfinite(total).all()):
            return False
        self.sum += total.cpu()
        if squares is not None:
            self.sumsq += squares.cpu()
        if pooled is not None:
            self.pooled += pooled.cpu()
        if self.zsums is not None and z is not None:
            self.zsums.add_z(z, codes)
            if fit is None:  # every row: v = y's sums are the batch's, taken above
                self._add_fit(values, z, codes, None if self.prediction is not None or
                              squares is None else (total, squares), weights)
            else:
                self._hold(values, z, codes, fit, weights)
        self.count = _add_counts(self.count, codes, values.shape[0])
        return True

    def _update_groups(self, values, codes, z, fit, weights) -> bool:
        """``update`` of a grouped CPU batch: checked finite first, then summed straight
        into the state's groups x neurons sums. A zeroed groups x neurons batch sum, checked
        and added, had cost four passes over the whole state per batch, however few groups
        the batch held (an exact GROUP BY of 1,000 classes over 65,536 neurons: 15 s against
        1.2 s for its AVG)."""
        if not _finite(values):
            return False
        for piece, piece_codes in _pieces(values, codes):
            _add_sums(self.sum, self.sumsq, piece.to(torch.float64), piece_codes)
        if self.zsums is not None and z is not None:
            self.zsums.add_z(z, codes)
            if fit is None:  # every row: the fit's sums are taken from the values again
                self._add_fit(values, z, codes, None, weights)
            else:
                self._hold(values, z, codes, fit, weights)
        self.count = _add_counts(self.count, codes, values.shape[0])
        return True

    def _hold(self, values, z, codes, fit, weights=None) -> None:
        """Keep a batch's fit rows (a copy) until about 1 MB of them gather, then sum them:
        the few rows of one batch (every s-th) make products too small to run at speed (6
        rows × 64 × 4,704 for the prediction: 0.3 ms a batch, 20x their share of one over 55
        rows)."""
        # The rows' positions, taken by index_select: a boolean mask's gather had cost 5x
        # as much (0.23 against 0.04 ms for 86 of 256 conv1 rows).
        at = torch.nonzero(fit.cpu()).flatten()
        self._waiting.append((values.index_select(0, at.to(values.device)),
                              z.index_select(0, at),
                              None if codes is None else codes.index_select(0, at.to(codes.device)),
                              None if weights is None else weights.index_select(0, at)))
        self._waiting_rows += int(self._waiting[-1][0].shape[0])
        if self._waiting_rows * max(values.shape[1], 1) * 4 >= _CHUNK_BYTES or \
                self._waiting_rows >= 256:
            self._flush()

    def _flush(self) -> None:
        """Sum the fit rows waiting (``_hold``)."""
        if self._waiting:
            values, z, codes, weights = zip(*self._waiting)
            self._waiting, self._waiting_rows = [], 0
            def joined(parts):  # one batch's rows are their own copy already
                return None if parts[0] is None else parts[0] if len(parts) == 1 else \
                    torch.cat(parts)

            self._add_fit(joined(values), joined(z), joined(codes), weights=joined(weights))

    def _weighted(self) -> OutlierRows:
        """The outlier rows, kept with their weights (regression.OutlierRows)."""
        if self.weighted is None:
            groups = None if self.sum.dim() == 1 else self.sum.shape[0]
            self.weighted = OutlierRows(self.latent, self.sum.shape[-1], WEIGHTS, groups)
        return self.weighted

    def __getstate__(self):  # a shard's state, pickled: its waiting rows summed first
        self._flush()
        return self.__dict__

    def _add_fit(self, values, z, codes, sums: tuple | None = None, weights=None) -> None:
        """Fit rows' count, Σv, Σv² and the latent's sums against v, v the residual of the
        block prediction or the values themselves; ``sums``: their (Σv, Σv²) when the caller
        has them already (every row of a batch, v = y); ``weights``: their leverage weights."""
        if not len(values):
            return
        latent = z[:, :self.latent].contiguous()
        self.fit_cross.add_z(latent, codes)
        home = values.device if values.device.type != "mps" else torch.device("cpu")
        if sums is None:
            total = torch.zeros(self.sum.shape, dtype=torch.float64, device=home)
            squares = torch.zeros_like(total)
        else:
            total, squares = sums
        if self.prediction is not None:
            pieces = self.prediction.residual_pieces(values, z)
        else:
            pieces = ((part, values[part]) for part in _slices(values))
        for part, v in pieces:
            wide = v.to(device=home, dtype=torch.float64)
            piece_codes = None if codes is None else codes[part].to(home)
            # A float32 residual meets the latent in one float32 product, summed in float64
            # per piece: r holds float32's rounding already (prediction.py), and upcast first
            # its 10-row product had cost 3x as much (estimates move by at most 3e-8 relative;
            # docs/ARCHITECTURE.md, "Estimates"); grouped or off the CPU, in float64 as before.
            narrow = self.prediction is not None and v.dtype == torch.float32 and \
                piece_codes is None and home.type == "cpu"
            self.fit_cross.add_products(latent[part], v if narrow else wide, piece_codes)
            if weights is not None:
                self._add_outliers(latent[part], weights[part], wide, piece_codes)
            if sums is None:  # last: an upcast copy is squared in place
                _add_sums(total, squares, wide, piece_codes, own=wide is not v)
        self.fit_sum += total.cpu()
        self.fit_squares += squares.cpu()
        self.fit_count = _add_counts(self.fit_count, codes, len(values))

    def _add_outliers(self, latent, weights, wide, codes) -> None:
        """Keep a piece's outlier fit rows (nonzero weight) with their weights."""
        rows = torch.nonzero(weights[:, 0] > 0).flatten()
        if len(rows):
            self._weighted().add(latent[rows], weights[rows], wide[rows.to(wide.device)],
                                 None if codes is None else codes[rows.to(codes.device)])

    def fit_sums(self) -> RowSums:
        """The fit rows' sums (one group's state: ``group``) as the estimator takes them."""
        self._flush()
        return RowSums(int(self.fit_count), self.fit_sum.numpy(), self.fit_squares.numpy(),
                       self.fit_cross, self.weighted)

    def merge(self, other: MeanState) -> MeanState:
        self._flush()
        other._flush()
        self.sum += other.sum
        if self.sumsq is not None:
            self.sumsq += other.sumsq
        if self.zsums is not None and other.zsums is not None:
            self.zsums.merge(other.zsums)
            self.fit_cross.merge(other.fit_cross)
            self.fit_sum += other.fit_sum
            self.fit_squares += other.fit_squares
            self.fit_count = self.fit_count + other.fit_count
            if other.weighted is not None:
                self._weighted().merge(other.weighted)
            if self.pooled is not None:
                self.pooled += other.pooled
        self.count = self.count + other.count
        return self

    def group(self, g: int) -> MeanState:
        """Row g as a state of its own; a pooled product, which no group owns, is shared."""
        self._flush()
        part = MeanState.__new__(MeanState)
        part._waiting, part._waiting_rows = [], 0
        part.sum, part.count = self.sum[g], int(self.count[g])
        part.sumsq = None if self.sumsq is None else self.sumsq[g]
        part.prediction, part.latent = self.prediction, self.latent
        part.directions, part.pooled = self.directions, self.pooled
        part.zsums = part.fit_cross = part.fit_sum = part.fit_squares = None
        part.fit_count = part.count
        part.weighted = None if self.weighted is None else self.weighted.group(g)
        if self.zsums is not None:
            part.zsums, part.fit_cross = self.zsums.group(g), self.fit_cross.group(g)
            part.fit_sum, part.fit_squares = self.fit_sum[g], self.fit_squares[g]
            part.fit_count = int(self.fit_count[g])
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
                self.max = torch.maximum(self.max, values.max(dim=0).values.to(torch.float64)
                                         .cpu())
            elif values.device.type == "cpu":  # into the state: no groups x neurons batch
                self.max.scatter_reduce_(0, codes[:, None].expand_as(values),
                                         values.to(torch.float64), "amax")
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


STATES = {"avg": MeanState, "argmax": ArgmaxState, ("topk", "mean"): MeanState,
          ("topk", "max"): MaxState}


def state_for(aggregate: str, order: str, n_neurons: int, spread: bool = True,
              groups: int | None = None, covariates: int = 0, prediction=None,
              directions: np.ndarray | None = None):
    """A fresh state (G × neurons with ``groups=G``); ``covariates`` (p > 0) makes a mean or
    argmax state sum them too, ``prediction`` (a block's, engine/prediction.py) a mean
    state sum its residual against the latent's, ``directions`` a mean state stream the
    pooled slope's products (engine/regression.py: Pooled)."""
    kind = STATES[aggregate if aggregate != "topk" else (aggregate, order)]
    if kind is MeanState:
        return MeanState(n_neurons, spread, groups, covariates, prediction, directions)
    if kind is ArgmaxState:
        return ArgmaxState(n_neurons, groups, covariates, prediction)
    return kind(n_neurons, groups)


def rank(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties go to the lower neuron index."""
    order = np.argsort(-values, kind="stable")
    return order[:k]
