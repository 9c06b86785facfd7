"""A block's known-coefficient prediction in the assisted estimator (docs/ARCHITECTURE.md,
"Estimates"): when the profile holds the queried view's principal projections z_b for every
item (model/auxiliaries.py), each item's activation is predicted as ŷ = μ + V z_b with no
coefficient to fit, and the regression estimator fits only the residual y − ŷ on the latent:

    mean_U(y) ≈ μ + V z̄_b,U + [the assisted estimate of the residual's mean]

The mean states stream what the residual's sums need (engine/aggregates.py): Σy, the
latent's z_latentᵀy, Σz and Σzzᵀ over all the covariates, and Σr² directly from each
batch's r = y − ŷ (ŷ one float32 product z_b Vᵀ), so no row is held and no sum is derived by
a difference that cancels; the block's k columns never meet y in float64."""
from __future__ import annotations

import numpy as np
import torch

from diagql.engine.regression import CrossSums, Fitted, GroupSums, corrected_mean
from diagql.model.auxiliaries import Auxiliary

# The float32 residual's pieces: about 1 MB, which stays in a core's cache while it is
# squared and summed (as engine/aggregates.py upcasts its pieces).
_PIECE_BYTES = 1 << 20
# The residual's variance needs a few hundred rows, not a sample's thousands: a group's Σr²
# is taken over at most FIT_ROWS of its rows (every s-th in index order), so the prediction's
# product, n × k × neurons, stops growing with the sample (docs/ARCHITECTURE.md, "Estimates").
# σ² from 1,024 rows is within 4.4% (one standard error), σ within 2.2%.
FIT_ROWS = 1024


def fit_rows(codes: np.ndarray | None, n: int, limit: int | None = None) -> np.ndarray | None:
    """Which of a plan's ``n`` items (sorted; ``codes`` their groups) the residual's Σr² is
    taken over: every s-th item of each group in index order, s = ⌈items / limit⌉, so at
    most ``limit`` (FIT_ROWS) per group. None when that is every item (no group has more)."""
    limit = FIT_ROWS if limit is None else limit
    if codes is None:
        if n <= limit:
            return None
        return np.arange(n) % -(-n // limit) == 0
    sizes = np.bincount(codes)
    if len(sizes) == 0 or sizes.max() <= limit:
        return None
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(n) - starts[codes[order]]
    stride = -(-sizes // limit)
    keep = np.empty(n, dtype=bool)
    keep[order] = rank % stride[codes[order]] == 0
    return keep


def _add(into: torch.Tensor, piece: torch.Tensor, codes: torch.Tensor | None, home) -> None:
    """A float32 piece's column sums into float64 sums (per group with ``codes``)."""
    if codes is None:
        into += piece.sum(dim=0).to(home)  # float32 over one piece: dtype= is 5x slower
    else:
        into.index_add_(0, codes, piece.to(device=home, dtype=torch.float64))


class BlockPrediction:
    """ŷ = mean + basis @ z_b, z_b the covariates' columns after the first ``latent_dims``."""

    def __init__(self, auxiliary: Auxiliary, latent_dims: int, channels: int | None = None,
                 own_rows: bool = False):
        self.layer = auxiliary.layer
        self.mean = auxiliary.mean.astype(np.float64)
        self.basis = auxiliary.basis.astype(np.float64)  # (neurons, k)
        if channels is not None:  # CHANNELS: a channel's mean is linear in the rows too
            k = self.basis.shape[1]
            self.mean = self.mean.reshape(channels, -1).mean(axis=1)
            self.basis = self.basis.reshape(channels, -1, k).mean(axis=1)
        self.p = latent_dims
        # ``own_rows``: a view the profile holds is its own auxiliary (engine/covariates.py:
        # _held): its z_b is the row, ŷ = row.
        # What predicts the items, for the estimate's line (results/render.py).
        self.predictor = (f"each item's own {self.layer} row, held by the profile" if own_rows
                          else f"{self.layer}'s principal components")
        self._tensors: dict = {}  # (device, dtype) -> μ and Vᵀ as tensors, made once

    def residual_squares(self, values: torch.Tensor, z: torch.Tensor,
                         codes: torch.Tensor | None, shape: tuple, with_sum: bool = False):
        """Σ (y − ŷ)² of a batch per neuron (per group with ``codes``: ``shape`` is the
        state's), float64 on the CPU; ``with_sum``: (Σr², Σr). ŷ = μ + z_b Vᵀ is one float32
        product (float64 rows: in float64), the precision the prediction is held in
        (``restore``), taken in pieces of about 1 MB that stay in cache while squared and
        summed; each piece's sum joins float64 sums."""
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        device = values.device
        key = (device, dtype)
        held = self._tensors.get(key)
        if held is None:
            held = (torch.from_numpy(self.mean).to(device=device, dtype=dtype),
                    torch.from_numpy(self.basis.T.copy()).to(device=device, dtype=dtype))
            self._tensors[key] = held
        mean, basis_t = held
        zb = z[:, self.p:].to(device=device, dtype=dtype)
        home = device if device.type != "mps" else torch.device("cpu")  # MPS: no float64
        out = torch.zeros(shape, dtype=torch.float64, device=home)
        total = torch.zeros_like(out) if with_sum else None
        rows = max(1, _PIECE_BYTES // (4 * max(values.shape[1], 1)))
        for start in range(0, len(values), rows):
            part = slice(start, start + rows)
            r = torch.addmm(mean, zb[part], basis_t)
            torch.sub(values[part].to(dtype), r, out=r)
            piece_codes = None if codes is None else codes[part].to(home)
            if total is not None:
                _add(total, r, piece_codes, home)
            r.mul_(r)
            _add(out, r, piece_codes, home)
        return out.cpu() if total is None else (out.cpu(), total.cpu())

    def sums(self, state, population: int, population_z: np.ndarray) -> GroupSums:
        """What the assisted fit models, against the latent covariates alone: for a mean
        state the residual y − ŷ, whose Σr and Σ z_latent rᵀ follow exactly from the state's
        Σy, Σz, Σzzᵀ and z_latentᵀy (float64) and whose Σr² it streamed directly (not as
        Σy² − 2Σyŷ + Σŷ², which cancels where the block explains most of a neuron); for an
        argmax state its one-hot winners (not predicted)."""
        p = self.p
        if hasattr(state, "counts"):
            counts = state.counts.numpy().astype(np.float64)  # y is one-hot: y² = y
            return GroupSums(state.count, counts, counts, state.cross, population,
                             population_z[:p])
        mu, v = self.mean, self.basis
        z, zz = state.block.z.numpy(), state.block.zz.numpy()
        cross = CrossSums.__new__(CrossSums)
        cross.z, cross.zz = state.block.z[:p], state.block.zz[:p, :p]
        cross.zy = torch.from_numpy(state.cross.zy.numpy() - np.outer(z[:p], mu)
                                    - zz[:p, p:] @ v.T)
        n = state.count
        total = state.sum.numpy() - (n * mu + v @ z[p:])
        squares = state.residual_squares.numpy()
        m = state.residual_count
        if m < n:  # Σr² of m of the n rows (``fit_rows``): their centred sum, scaled to n
            fit_total = state.residual_sum.numpy()
            spread = np.maximum(squares - fit_total ** 2 / m, 0.0) * (n - 1) / max(m - 1, 1)
            squares = spread + total ** 2 / n
        return GroupSums(n, total, squares, cross, population, population_z[:p])

    def restore(self, fitted: Fitted, population_z: np.ndarray, widened: float = 1.0) -> Fitted:
        """The residual's estimate plus the matching items' mean prediction μ + V z̄_b,U, its
        standard error ``widened`` (engine/extrapolation.py). The prediction is held in
        float32: its rounding joins the standard error, which matters only where the
        projections hold nearly all of a block (residuals near 0)."""
        zu = population_z[self.p:]
        rounding = np.finfo(np.float32).eps * (np.abs(self.mean) + np.abs(self.basis) @ np.abs(zu))
        return Fitted(fitted.mean + self.mean + self.basis @ zu,
                      np.sqrt((widened * fitted.se) ** 2 + rounding ** 2), fitted.df,
                      widened=widened)

    def corrected_mean(self, values: np.ndarray, z: np.ndarray,
                       population_z: np.ndarray) -> np.ndarray:
        """The same estimate from one group's sampled rows (EVALUATE's lean form)."""
        p = self.p
        predicted = self.mean + z[:, p:] @ self.basis.T
        return (self.mean + self.basis @ population_z[p:]
                + corrected_mean(np.asarray(values, dtype=np.float64) - predicted, z[:, :p],
                                 population_z[:p]))
