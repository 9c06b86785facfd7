"""A block's known-coefficient prediction in the assisted estimator (docs/ARCHITECTURE.md,
"Estimates"): when the profile holds the queried view's principal projections z_b for every
item (model/auxiliaries.py), each item's activation is predicted as ŷ = μ + V z_b with no
coefficient to fit, and the regression estimator fits only the residual y − ŷ on the latent:

    mean_U(y) ≈ μ + V z̄_b,U + [the assisted estimate of the residual's mean]

The residual's sums follow from the states' sums over the covariates [z_latent, z_b], so the
states stream as before and no row is held."""
from __future__ import annotations

import numpy as np
import torch

from diagql.engine.regression import CrossSums, Fitted, GroupSums, corrected_mean
from diagql.model.auxiliaries import Auxiliary


class BlockPrediction:
    """ŷ = mean + basis @ z_b, z_b the covariates' columns after the first ``latent_dims``."""

    def __init__(self, auxiliary: Auxiliary, latent_dims: int, channels: int | None = None):
        self.layer = auxiliary.layer
        self.mean = auxiliary.mean.astype(np.float64)
        self.basis = auxiliary.basis.astype(np.float64)  # (neurons, k)
        if channels is not None:  # CHANNELS: a channel's mean is linear in the rows too
            k = self.basis.shape[1]
            self.mean = self.mean.reshape(channels, -1).mean(axis=1)
            self.basis = self.basis.reshape(channels, -1, k).mean(axis=1)
        self.p = latent_dims

    def residual(self, g: GroupSums) -> GroupSums:
        """The sums of the residual y − ŷ against the latent covariates alone."""
        p, mu, v = self.p, self.mean, self.basis
        z, zz, zy = (t.numpy() for t in (g.cross.z, g.cross.zz, g.cross.zy))
        zb_sum = z[p:]
        predicted = g.n * mu + v @ zb_sum  # Σŷ
        y_predicted = mu * g.total + np.einsum("jk,kj->j", v, zy[p:])  # Σ y∘ŷ
        predicted_sq = (g.n * mu * mu + 2 * mu * (v @ zb_sum)
                        + np.einsum("jk,kl,jl->j", v, zz[p:, p:], v))  # Σŷ²
        cross = CrossSums.__new__(CrossSums)
        cross.z, cross.zz = g.cross.z[:p], g.cross.zz[:p, :p]
        cross.zy = torch.from_numpy(zy[:p] - np.outer(z[:p], mu) - zz[:p, p:] @ v.T)
        return GroupSums(g.n, g.total - predicted, g.squares - 2 * y_predicted + predicted_sq,
                         cross, g.population, g.population_z[:p])

    def latent_only(self, g: GroupSums) -> GroupSums:
        """The sums against the latent covariates alone (ARGMAX's winners: not predicted)."""
        cross = CrossSums.__new__(CrossSums)
        p = self.p
        cross.z, cross.zz, cross.zy = g.cross.z[:p], g.cross.zz[:p, :p], g.cross.zy[:p]
        return GroupSums(g.n, g.total, g.squares, cross, g.population, g.population_z[:p])

    def restore(self, fitted: Fitted, population_z: np.ndarray) -> Fitted:
        """The residual's estimate plus the matching items' mean prediction μ + V z̄_b,U. The
        prediction is held in float32: its rounding joins the standard error, which matters
        only where the projections hold nearly all of a block (residuals near 0)."""
        zu = population_z[self.p:]
        rounding = np.finfo(np.float32).eps * (np.abs(self.mean) + np.abs(self.basis) @ np.abs(zu))
        return Fitted(fitted.mean + self.mean + self.basis @ zu,
                      np.sqrt(fitted.se ** 2 + rounding ** 2), fitted.df)

    def corrected_mean(self, values: np.ndarray, z: np.ndarray,
                       population_z: np.ndarray) -> np.ndarray:
        """The same estimate from one group's sampled rows (EVALUATE's lean form)."""
        p = self.p
        predicted = self.mean + z[:, p:] @ self.basis.T
        return (self.mean + self.basis @ population_z[p:]
                + corrected_mean(np.asarray(values, dtype=np.float64) - predicted, z[:, :p],
                                 population_z[:p]))
