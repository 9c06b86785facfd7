"""The model-assisted (regression) estimator of a sample's means (docs/ARCHITECTURE.md,
"Estimates").

Every sampler chooses items from the profile alone, so given an item's latent, whether it was
sampled says nothing about its activations: selection is ignorable, and a model of the
activations fitted on the sampled items predicts the matching items that were not. The model:
each neuron's activation is a group intercept plus a linear function of the item's covariates
(its latent reduced to a few whitened principal components, engine/covariates.py), with one
slope pooled over the query's groups (each group centred) and a ridge. The estimate of a
group's mean is the survey-sampling regression estimator

    ȳ_s + (z̄_U − z̄_s) · B

(the sample mean, corrected by how far the sample's mean covariates are from those of all the
group's matching items), and its variance under the model is σ²·((1 − n/N)/n + h), with σ² the
residual variance and h = δᵀ A⁻¹ δ the slope's share (δ = z̄_U − z̄_s, A = S + ridge, S the
pooled centred cross-product of the covariates). h is the slope's posterior variance with the
ridge read as the prior it is (each slope ~ N(0, σ²/ridge)): the sampling variance of the
shrunk slope, δᵀA⁻¹SA⁻¹δ, plus what the shrinkage may leave of the selection's bias,
ridge·δᵀA⁻²δ. A few items of one cell keep the slope near 0, so a sampler that picks latent
outliers (vas, gmm) leaves most of its bias in the answer; without the second term no
standard error carried it (coverage 0.83-0.89, benchmarks/README.md, "Issue 15, third round").

Everything is computed from mergeable sums (``CrossSums``) streamed with the activations, so
no sampled item's row is held.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Chosen with the covariates' DIMS (engine/covariates.py): in whitened units, about the
# information of 10 items per component, which keeps a slope fitted on a handful of items
# near zero (the plain mean) and lets a slope fitted on hundreds speak.
RIDGE = 10.0


class CrossSums:
    """Sums of the covariates ``z`` (p) of the items a state has seen: Σz, Σzzᵀ and Σzyᵀ
    against the state's values y (or its one-hot argmax winners). Mergeable, float64. With
    ``groups=G`` each sum has a leading axis of G and ``add`` takes each item's group code, as
    the grouped aggregate states do (engine/aggregates.py); ``group(g)`` is one group's sums."""

    def __init__(self, p: int, n_neurons: int, groups: int | None = None):
        lead = () if groups is None else (groups,)
        self.z = torch.zeros(*lead, p, dtype=torch.float64)
        self.zz = torch.zeros(*lead, p, p, dtype=torch.float64)
        self.zy = torch.zeros(*lead, p, n_neurons, dtype=torch.float64)

    def like(self) -> CrossSums:
        """Empty sums of the same shape (a batch's, merged once it is known to be finite)."""
        groups = None if self.z.dim() == 1 else self.z.shape[0]
        return CrossSums(self.z.shape[-1], self.zy.shape[-1], groups)

    @classmethod
    def of_rows(cls, z: np.ndarray, values: np.ndarray) -> CrossSums:
        """The sums over materialised rows (EVALUATE's kept rows, benchmarks)."""
        sums = cls(z.shape[1], values.shape[1])
        sums.add(torch.from_numpy(np.asarray(z, dtype=np.float64)),
                 torch.from_numpy(np.asarray(values, dtype=np.float64)))
        return sums

    def add(self, z: torch.Tensor, values: torch.Tensor,
            codes: torch.Tensor | None = None) -> None:
        """Items' covariates (n × p, float64, CPU), their values (n × neurons) and, grouped,
        their group codes."""
        self.add_z(z, codes)
        self.add_products(z, values, codes)

    def add_products(self, z: torch.Tensor, values: torch.Tensor,
                     codes: torch.Tensor | None = None) -> None:
        """Only zᵀy: a sum over items taken in pieces (the aggregate states' upcast pieces)
        whose Σz and Σzzᵀ were added once for the whole batch (``add_z``)."""
        # On the values' device (one p × neurons product per batch), except MPS: no float64.
        device = values.device if values.device.type != "mps" else torch.device("cpu")
        wide = values.to(device=device, dtype=torch.float64)
        if codes is None:
            if device.type == "cpu":
                self.zy.addmm_(z.T, wide)  # into the sums: no product to allocate and add
            else:
                self.zy += (z.to(device).T @ wide).cpu()
            return
        # Every group in one product: item i's covariates placed in its group's block of
        # G·p columns, so that (spread)ᵀ · values stacks each group's zᵀy.
        groups, p = self.z.shape
        spread = torch.zeros(len(z), groups * p, dtype=torch.float64, device=device)
        columns = codes.to(device)[:, None] * p + torch.arange(p, device=device)
        spread.scatter_(1, columns, z.to(device))
        self.zy += (spread.T @ wide).reshape(groups, p, wide.shape[1]).cpu()  # p may be 0

    def add_winners(self, z: torch.Tensor, winners: torch.Tensor,
                    codes: torch.Tensor | None = None) -> None:
        """Items' covariates and their argmax neurons: y is the one-hot vector of the winner."""
        self.add_z(z, codes)
        if codes is None:
            self.zy.index_add_(1, winners.cpu(), z.T)
            return
        groups, p, n = self.zy.shape
        cells = torch.zeros(groups * n, p, dtype=torch.float64)
        cells.index_add_(0, codes.cpu() * n + winners.cpu(), z)
        self.zy += cells.reshape(groups, n, p).transpose(1, 2)

    def add_z(self, z: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        """Only Σz and Σzzᵀ (``add`` is ``add_z`` and ``add_products``)."""
        if codes is None:
            self.z += z.sum(dim=0)
            self.zz += z.T @ z
            return
        codes = codes.cpu()
        self.z.index_add_(0, codes, z)
        self.zz.index_add_(0, codes, z[:, :, None] * z[:, None, :])

    def merge(self, other: CrossSums) -> CrossSums:
        self.z += other.z
        self.zz += other.zz
        self.zy += other.zy
        return self

    def group(self, g: int) -> CrossSums:
        part = CrossSums.__new__(CrossSums)
        part.z, part.zz, part.zy = self.z[g], self.zz[g], self.zy[g]
        return part


@dataclass(frozen=True)
class GroupSums:
    """What the estimator needs of one group: the sample's sums and the group's population."""

    n: int  # matching sampled items
    total: np.ndarray  # Σy (neurons)
    squares: np.ndarray  # Σy²
    cross: CrossSums
    population: int  # matching items of the whole data set
    population_z: np.ndarray  # their mean covariates


@dataclass(frozen=True)
class Fitted:
    """The regression estimate of one group's mean per neuron and its standard error."""

    mean: np.ndarray
    se: np.ndarray  # before any floor for neurons constant over the sample
    df: int  # degrees of freedom of the residual variance
    exact: bool = False  # known for every matching item (a held view's ARGMAX): no error
    # The factor the standard errors were widened by for the fit's extrapolation
    # (engine/extrapolation.py); 1.0 where none showed.
    widened: float = 1.0


def of_rows(values: np.ndarray, z: np.ndarray, population: int,
            population_z: np.ndarray) -> GroupSums:
    """One group's sums from its sampled rows (n × neurons) and their covariates (n × p)."""
    values = np.asarray(values, dtype=np.float64)
    return GroupSums(len(values), values.sum(axis=0), (values * values).sum(axis=0),
                     CrossSums.of_rows(z, values), population, population_z)


def corrected_mean(values: np.ndarray, z: np.ndarray, population_z: np.ndarray,
                   ridge: float = RIDGE) -> np.ndarray:
    """``assisted``'s estimate of one group's mean from its sampled rows alone (no variance):
    the lean form EVALUATE scores every combination with."""
    values = np.asarray(values, dtype=np.float64)
    ybar, zbar = values.mean(axis=0), z.mean(axis=0)
    zc = z - zbar
    B = np.linalg.solve(zc.T @ zc + ridge * np.eye(z.shape[1]), zc.T @ (values - ybar))
    return ybar + (population_z - zbar) @ B


def assisted(groups: dict, ridge: float = RIDGE) -> dict:
    """key -> Fitted for every group with at least one sampled item (``groups``: key ->
    GroupSums); a group of one item has no residual variance (se NaN)."""
    parts = {}
    for key, g in groups.items():
        if g.n == 0:
            continue
        ybar = g.total / g.n
        zbar = g.cross.z.numpy() / g.n
        szz = g.cross.zz.numpy() - g.n * np.outer(zbar, zbar)
        szy = g.cross.zy.numpy() - g.n * np.outer(zbar, ybar)
        syy = np.maximum(g.squares - g.n * ybar ** 2, 0.0)
        parts[key] = (g, ybar, zbar, szz, szy, syy)
    if not parts:
        return {}
    p = len(next(iter(parts.values()))[2])
    S = sum(part[3] for part in parts.values())
    A = S + ridge * np.eye(p)
    B = np.linalg.solve(A, sum(part[4] for part in parts.values()))  # p × neurons
    A_inv = np.linalg.inv(A)
    p_eff = float(np.trace(S @ A_inv))  # the slope's degrees of freedom (ridge-shrunk)
    n_total = sum(part[0].n for part in parts.values())
    free = n_total - len(parts)
    # Residuals of a fitted slope understate σ²; the floor only keeps a slope that fits all of
    # a tiny sample from dividing by ~0 (it was 1, which left n = 2 or 3 uninflated: its
    # expected cosine distances came out at 0.74x the actual, benchmarks/README.md).
    inflate = free / max(free - p_eff, 0.5)
    out = {}
    for key, (g, ybar, zbar, szz, szy, syy) in parts.items():
        delta = g.population_z - zbar
        mean = ybar + delta @ B
        if g.n < 2:
            out[key] = Fitted(mean, np.full_like(mean, np.nan), 0)
            continue
        rss = syy - 2 * np.einsum("pj,pj->j", B, szy) + np.einsum("pj,pj->j", B, szz @ B)
        sigma2 = np.maximum(rss, 0.0) / (g.n - 1) * inflate
        h = float(delta @ A_inv @ delta)  # = δᵀA⁻¹(S + ridge)A⁻¹δ: noise and shrinkage
        fpc = max(g.population - g.n, 0) / max(g.population, 1)
        out[key] = Fitted(mean, np.sqrt(sigma2 * (fpc / g.n + h)), g.n - 1)
    return out
