"""A block's known-coefficient prediction in the assisted estimator (docs/ARCHITECTURE.md,
"Estimates"): when the profile holds the queried view's principal projections z_b for every
item (model/auxiliaries.py), each item's activation is predicted as ŷ = μ + V z_b with no
coefficient to fit, and the regression estimator fits only the residual y − ŷ on the latent:

    mean_U(y) ≈ μ + V z̄_b,U + [the assisted estimate of the residual's mean]

The mean states stream what the residual's sums need (engine/aggregates.py): over every
sampled row Σy, Σz and Σzzᵀ of all the covariates and the pooled slope's projected products
(regression.Pooled, turned into the residual's by ``pooled``); over the fit rows (at most
FIT_ROWS per group) Σr, Σr² and z_latentᵀr of each batch's r = y − ŷ (ŷ one float32 product
z_b Vᵀ), so no row is held and no sum is derived by a difference that cancels."""
from __future__ import annotations

import numpy as np
import torch

from diagql.engine.regression import Fitted, GroupSums, Pooled, corrected_mean
from diagql.model.auxiliaries import Auxiliary, spread_items

# The float32 residual's pieces: about 4 MB (a conv1 batch's 86 fit rows in one: two 1 MB
# pieces had cost their calls twice; docs/ARCHITECTURE.md, "Estimates"), squared and summed
# as engine/aggregates.py upcasts its pieces.
_PIECE_BYTES = 4 << 20
# The residual's variance needs hundreds of rows, not a sample's thousands: a query's Σr²
# (and the latent's sums against r) are taken over at most FIT_ROWS rows of all its groups
# together, each group's share FIT_ROWS / groups but at least FIT_FLOOR (every s-th item of the
# group in index order), so the fit's per-row work, about 75 multiply-adds per value with a
# block prediction, stops growing with the sample (docs/ARCHITECTURE.md, "Estimates").
# σ² from 1,024 rows is within 4.4% (one standard error), σ within 2.2%, for normal values.
# Chosen by measurement (benchmarks/calibration_scale.py --fit-rows --fit-floor): fewer rows
# cost conv1's sparse neurons coverage (by class at 50,000 items, 0.90-0.94 on 250 rows a
# group, 0.89-0.92 on 125, 0.88-0.91 on 64), where heavy tails make σ̂ noisier than the t
# quantile allows for.
FIT_ROWS = 1024
FIT_FLOOR = 256


def fit_rows(codes: np.ndarray | None, n: int, limit: int | None = None,
             floor: int | None = None) -> np.ndarray | None:
    """Which of a plan's ``n`` items (sorted; ``codes`` their groups) the residual's sums are
    taken over: every s-th item of each group in index order, s = ⌈items / share⌉, the share
    max(``floor``, ``limit`` / groups) (FIT_FLOOR, FIT_ROWS). None when that is every item."""
    limit = FIT_ROWS if limit is None else limit
    floor = FIT_FLOOR if floor is None else floor
    if codes is None:
        if n <= limit:
            return None
        return np.arange(n) % -(-n // limit) == 0
    sizes = np.bincount(codes)
    if len(sizes) == 0:
        return None
    share = max(floor, limit // max(int(np.count_nonzero(sizes)), 1))
    if sizes.max() <= share:
        return None
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(n) - starts[codes[order]]
    stride = -(-sizes // share)
    keep = np.empty(n, dtype=bool)
    keep[order] = rank % stride[codes[order]] == 0
    return keep


SCALE_ITEMS = 2048  # items a held view's row size is measured on (``held_rounding``)


class BlockPrediction:
    """ŷ = mean + basis @ z_b, z_b the covariates' columns after the first ``latent_dims``."""

    def __init__(self, auxiliary: Auxiliary, latent_dims: int, channels: int | None = None,
                 own_rows: bool = False, channels_last: bool = False, rebuilt: bool = False):
        self.layer = auxiliary.layer
        self.mean = auxiliary.mean.astype(np.float64)
        # (neurons, k); None: the identity, a held view's own rows (``_times``; as a matrix,
        # 128 MB of float64 at a 4,096-wide latent), for CHANNELS its channels' averaging
        # (channels x width).
        self.basis = None if auxiliary.basis is None else auxiliary.basis.astype(np.float64)
        if channels is not None and self.basis is None:
            width = len(self.mean)
            columns = np.arange(width)
            owner = columns % channels if channels_last else columns // (width // channels)
            self.basis = np.zeros((channels, width))
            self.basis[owner, columns] = channels / width
            self.mean = self.basis @ self.mean
        elif channels is not None:  # CHANNELS: a channel's mean is linear in the rows too
            k = self.basis.shape[1]
            if channels_last:  # (H, W, C) rows: each channel is every C-th value
                self.mean = self.mean.reshape(-1, channels).mean(axis=0)
                self.basis = self.basis.reshape(-1, channels, k).mean(axis=0)
            else:
                self.mean = self.mean.reshape(channels, -1).mean(axis=1)
                self.basis = self.basis.reshape(channels, -1, k).mean(axis=1)
        self.p = latent_dims
        # ``own_rows``: a view the profile holds is its own auxiliary (engine/covariates.py:
        # _held), or ``rebuilt`` from block directions that span it: ŷ = row, and a group's
        # exact mean is ``held_mean``.
        self.own_rows = own_rows
        self.rebuilt = rebuilt
        self._z = auxiliary.z if own_rows else None  # the rows' scale for ``held_rounding``
        self._rounding: np.ndarray | None = None
        # What predicts the items, for the estimate's line (results/render.py).
        self.predictor = (f"each item's {self.layer} row, rebuilt from all its principal "
                          f"components" if rebuilt else
                          f"each item's own {self.layer} row, held by the profile" if own_rows
                          else f"{self.layer}'s principal components")
        self._tensors: dict = {}  # (device, dtype) -> μ and Vᵀ as tensors, made once

    def _times(self, zb: np.ndarray) -> np.ndarray:
        """V z_b (z_b a vector or k × m)."""
        return zb if self.basis is None else self.basis @ zb

    def residual_pieces(self, values: torch.Tensor, z: torch.Tensor):
        """The residual r = y − ŷ of a batch's rows, (slice, r) in pieces of about 4 MB that
        stay in cache while the state sums them; ŷ = μ + z_b Vᵀ one float32 product per piece
        (float64 rows: float64), the precision the prediction is held in (``restore``)."""
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        device = values.device
        key = (device, dtype)
        held = self._tensors.get(key)
        if held is None:
            held = (torch.from_numpy(self.mean).to(device=device, dtype=dtype),
                    None if self.basis is None else
                    torch.from_numpy(self.basis.T.copy()).to(device=device, dtype=dtype))
            self._tensors[key] = held
        mean, basis_t = held
        zb = z[:, self.p:].to(device=device, dtype=dtype)
        rows = max(1, _PIECE_BYTES // (4 * max(values.shape[1], 1)))
        for start in range(0, len(values), rows):
            part = slice(start, start + rows)
            r = zb[part] + mean if basis_t is None else torch.addmm(mean, zb[part], basis_t)
            torch.sub(values[part].to(dtype), r, out=r)
            yield part, r

    def sums(self, state, population: int, population_z: np.ndarray) -> GroupSums:
        """What the assisted fit models, against the latent covariates alone: for a mean
        state the residual y − ŷ, whose Σr over every row follows exactly from the state's
        Σy and Σz_b and whose sums over the fit rows the state streamed from r itself (not
        as Σy² − 2Σyŷ + Σŷ², which cancels where the block explains most of a neuron); for
        an argmax state its one-hot winners (not predicted)."""
        p = self.p
        if hasattr(state, "counts"):
            counts = state.counts.numpy().astype(np.float64)  # y is one-hot: y² = y
            return GroupSums(state.count, counts, counts, state.cross, population,
                             population_z[:p])
        n = state.count
        z = state.zsums.z.numpy()
        total = state.sum.numpy() - (n * self.mean + self._times(z[p:]))
        return GroupSums(n, total, None, state.zsums.latent(p), population, population_z[:p],
                         state.fit_sums())

    def pooled(self, pooled: Pooled, z: np.ndarray, zz: np.ndarray) -> Pooled:
        """The pass's projected products Dᵀ Σ z yᵀ as the residual's, Dᵀ Σ z rᵀ =
        Dᵀ(Σ z yᵀ − Σz μᵀ − Σ z z_bᵀ Vᵀ), from Σz and Σzzᵀ over every sampled row."""
        d, p = pooled.directions, self.p
        products = pooled.products - np.outer(d.T @ z[:p], self.mean) - \
            self._times((d.T @ zz[:p, p:]).T).T
        return Pooled(d, products)

    def restore(self, fitted: Fitted, population_z: np.ndarray, widened: float = 1.0) -> Fitted:
        """The residual's estimate plus the matching items' mean prediction μ + V z̄_b,U, its
        standard error ``widened`` (engine/extrapolation.py). The prediction is held in
        float32: its rounding joins the standard error, which matters only where the
        projections hold nearly all of a block (residuals near 0)."""
        zu = population_z[self.p:]
        rounding = np.finfo(np.float32).eps * (np.abs(self.mean) + (
            np.abs(zu) if self.basis is None else np.abs(self.basis) @ np.abs(zu)))
        return Fitted(fitted.mean + self.mean + self._times(zu),
                      np.sqrt((widened * fitted.se) ** 2 + rounding ** 2), fitted.df,
                      widened=widened)

    def held_mean(self, population_z: np.ndarray) -> np.ndarray | None:
        """The matching items' exact mean per neuron, μ + V z̄_b,U, when each item's own row
        predicts it (``own_rows``: z_b is the row, V the identity, a CHANNELS view's mean of
        it, or directions that span it); None otherwise (principal components predict, the
        residual is estimated)."""
        if not self.own_rows:
            return None
        return self.mean + self._times(population_z[self.p:])

    def held_rounding(self) -> np.ndarray:
        """Per neuron, how far a ``held_mean`` may lie from the float64 mean of the model's
        own outputs: 8 float32 ulps of its rows' typical size, |μ| + √(V²·rms(z_b)²) (z_b's
        root mean square over spread items; its principal components are uncorrelated). The
        rows are held (or rebuilt) in float32, and their error follows their size, not their
        mean: a centred layer's means near 0 had left intervals of 2⁻²⁰ of its largest mean,
        1e-14 wide, around means 2e-8 off (review MM1)."""
        if self._rounding is None:
            z = self._z[spread_items(len(self._z), SCALE_ITEMS)].astype(np.float64)
            rms = np.sqrt(np.mean(z * z, axis=0))
            spread = rms if self.basis is None else np.sqrt(self.basis ** 2 @ rms ** 2)
            self._rounding = 8 * float(np.finfo(np.float32).eps) * (np.abs(self.mean) + spread)
        return self._rounding

    def corrected_mean(self, values: np.ndarray, z: np.ndarray,
                       population_z: np.ndarray) -> np.ndarray:
        """The same estimate from one group's sampled rows (EVALUATE's lean form)."""
        p = self.p
        predicted = self.mean + self._times(z[:, p:].T).T
        return (self.mean + self._times(population_z[p:])
                + corrected_mean(np.asarray(values, dtype=np.float64) - predicted, z[:, :p],
                                 population_z[:p]))
