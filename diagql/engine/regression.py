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
The prior's σ²/ridge per slope is too small where the latent predicts a layer closely (small
σ², large slopes): along each direction the sampled rows determine, the slope's size they
show takes its place when larger (``shown_slopes``), and that second term is
ridge²·Σₖ (eₖᵀA⁻¹δ)²·max(σ²/ridge, β̂ₖ²).

σ² is the residual variance with the fit's mean degrees-of-freedom correction. Where the pass
fed the fit rows' leverage weights (a mean state's, as the Reducer does), the latent outliers'
residuals, which the fit follows, are restored from their own leverage, in σ² and in the
slope's noise (engine/leverage.py: ``restored``).

Everything is computed from mergeable sums (``CrossSums``) streamed with the activations, so
no sampled item's row is held but the few latent outliers' (``OutlierRows``).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from diagql.engine import ridge as ridges
from diagql.engine.leverage import corrections, residual_ss, restored
from diagql.engine.ridge import RIDGE


class CrossSums:
    """Sums of the covariates ``z`` (p) of the items a state has seen: Σz, Σzzᵀ and Σzyᵀ
    against the state's values y (or its one-hot argmax winners). Mergeable, float64. With
    ``groups=G`` each sum has a leading axis of G and ``add`` takes each item's group code, as
    the grouped aggregate states do (engine/aggregates.py); ``group(g)`` is one group's sums."""

    def __init__(self, p: int, n_neurons: int, groups: int | None = None,
                 gram_rows: int | None = None):
        # ``gram_rows``: Σzzᵀ's first rows only (gram_rows × p), all that is read of the
        # Gram matrix of a latent's and a block's columns (the latent's rows): 7x cheaper.
        lead = () if groups is None else (groups,)
        self.z = torch.zeros(*lead, p, dtype=torch.float64)
        self.zz = torch.zeros(*lead, p if gram_rows is None else gram_rows, p,
                              dtype=torch.float64)
        self.zy = torch.zeros(*lead, p, n_neurons, dtype=torch.float64)

    def like(self) -> CrossSums:
        """Empty sums of the same shape (a batch's, merged once it is known to be finite)."""
        groups = None if self.z.dim() == 1 else self.z.shape[0]
        return CrossSums(self.z.shape[-1], self.zy.shape[-1], groups, self.zz.shape[-2])

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
        whose Σz and Σzzᵀ were added once for the whole batch (``add_z``). Float32 values on
        the CPU (a block's residual) make a float32 product, added to the float64 sums."""
        # On the values' device (one p × neurons product per batch), except MPS: no float64.
        device = values.device if values.device.type != "mps" else torch.device("cpu")
        if values.dtype == torch.float32 and device.type == "cpu" and codes is None:
            # A float32 product, summed in float64 (a block's float32 residual: aggregates.py)
            self.zy += (z.to(torch.float32).T @ values).to(torch.float64)
            return
        wide = values.to(device=device, dtype=torch.float64)
        if codes is None:
            if device.type == "cpu":
                self.zy.addmm_(z.T, wide)  # into the sums: no product to allocate and add
            else:
                self.zy += (z.to(device).T @ wide).cpu()
            return
        # One p × neurons product per group present, over its rows gathered in order: p
        # multiply-adds per value, where a product with every item's covariates spread over
        # G·p columns did G times as many (GROUP BY class on conv1: 206% of the pass).
        z = z.to(device)
        for g, part in _runs(codes.to(device)):
            if device.type == "cpu":
                self.zy[g].addmm_(z[part].T, wide[part])
            else:
                self.zy[g] += (z[part].T @ wide[part]).cpu()

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
        rows = self.zz.shape[-2]
        if codes is None:
            self.z += z.sum(dim=0)
            self.zz += z[:, :rows].T @ z
            return
        codes = codes.cpu()
        self.z.index_add_(0, codes, z)
        # One Gram matrix per group present over its rows gathered in order (an outer
        # product per item, index_add_-ed, made n × p² values first: 11 MB a batch at p = 74).
        for g, part in _runs(codes):
            self.zz[g] += z[part, :rows].T @ z[part]

    def merge(self, other: CrossSums) -> CrossSums:
        self.z += other.z
        self.zz += other.zz
        self.zy += other.zy
        return self

    def group(self, g: int) -> CrossSums:
        part = CrossSums.__new__(CrossSums)
        part.z, part.zz, part.zy = self.z[g], self.zz[g], self.zy[g]
        return part

    def latent(self, p: int) -> CrossSums:
        """Σz and Σzzᵀ of the first p covariates only (one group's: no leading axis), no zᵀy."""
        part = CrossSums.__new__(CrossSums)
        part.z, part.zz = self.z[:p], self.zz[:p, :p]
        part.zy = torch.zeros(p, 0, dtype=torch.float64)
        return part


class OutlierRows:
    """Some fit rows kept as rows (engine/leverage.py: the outliers, a few percent of at most
    FIT_ROWS): each row's latent covariates z (p), its k weights and its values v (or their
    block residual), float64 on the CPU, per group (``groups=G``: codes 0 .. G-1). Mergeable
    by joining. ``column(j)`` gives one weight column's sums, Σw, Σwv, Σwv², Σwz, Σwzzᵀ and
    Σwzvᵀ (of one group's rows: ``group(g)`` first), made when the estimate reads them. Kept
    as those sums per group while streaming, they had held k·(p + 2) rows' worth of
    float64 a group whatever the rows: a sampled GROUP BY class over a 131,072-wide conv map
    and 10 classes made two of 480 MB for its few outliers, and over 100 classes passed
    3.5 GB (a sweep, benchmarks/README.md, "twenty-fourth session")."""

    def __init__(self, p: int, n_neurons: int, k: int, groups: int | None = None):
        self.p, self.n_neurons, self.k, self.groups = p, n_neurons, k, groups
        self.rows: dict = {}  # group (None without groups) -> [(z, weights, values), ...]

    def add(self, z: torch.Tensor, weights: torch.Tensor, values: torch.Tensor,
            codes: torch.Tensor | None = None) -> None:
        """Rows' latent covariates (rows × p, float64, CPU), their weights (rows × k, float64,
        CPU), their values (rows × neurons, float64, on any device) and group codes."""
        values = values.to("cpu", torch.float64)
        if codes is None:
            self.rows.setdefault(None, []).append((z, weights, values))
            return
        for g, part in _runs(codes.cpu()):
            self.rows.setdefault(g, []).append((z[part], weights[part], values[part]))

    def merge(self, other: OutlierRows) -> OutlierRows:
        for g, parts in other.rows.items():
            self.rows.setdefault(g, []).extend(parts)
        return self

    def group(self, g: int) -> OutlierRows:
        part = OutlierRows(self.p, self.n_neurons, self.k)
        if g in self.rows:
            part.rows[None] = list(self.rows[g])  # its own list: a merge into it stays its own
        return part

    def column(self, j: int) -> SimpleNamespace:
        """One weight column's sums over this (one group's) rows, as tensors."""
        parts = self.rows.get(None) or [tuple(torch.zeros(0, width, dtype=torch.float64)
                                              for width in (self.p, self.k, self.n_neurons))]
        if len(parts) > 1:  # joined once, for every column read after (leverage.restored's
            # four had each joined a wide map's rows again: 0.5 s of its answer, sweep LL2)
            parts[:] = [tuple(torch.cat(columns) for columns in zip(*parts))]
        z, weights, v = parts[0]
        w = weights[:, j]
        wz = w[:, None] * z
        return SimpleNamespace(w=w.sum(), v=w @ v, vv=w @ (v * v), z=wz.sum(dim=0), zz=wz.T @ z,
                               zv=wz.T @ v)


def _runs(codes: torch.Tensor):
    """(group, its rows) for each group present among ``codes``: an index of the rows in
    order, or a slice when they are one run (a sorted batch's, or a single group's)."""
    present, counts = torch.unique_consecutive(codes, return_counts=True)
    if len(present) == len(torch.unique(present)):  # each group one run: slices
        start = 0
        for g, count in zip(present.tolist(), counts.tolist()):
            yield g, slice(start, start + count)
            start += count
        return
    order = torch.argsort(codes, stable=True)
    present, counts = torch.unique_consecutive(codes[order], return_counts=True)
    for g, rows in zip(present.tolist(), torch.split(order, counts.tolist())):
        yield g, rows


@dataclass(frozen=True)
class RowSums:
    """Sums over some of a group's sampled rows: their count, Σv, Σv² and the covariates'
    sums against v (v the values, or the residual of a block prediction)."""

    n: int
    total: np.ndarray
    squares: np.ndarray | None
    cross: CrossSums
    # The outlier rows' weighted sums (engine/leverage.py: row_weights), when the pass had them.
    weighted: OutlierRows | None = None


@dataclass(frozen=True)
class GroupSums:
    """What the estimator needs of one group: the sample's sums and the group's population.
    ``fit``: the rows the residual variance is fitted on (``prediction.fit_rows``), when they
    are some of the n only; then ``cross`` need hold only Σz and Σzzᵀ of all n (the slope
    comes from a ``Pooled`` product) and ``squares`` is not read."""

    n: int  # matching sampled items
    total: np.ndarray  # Σy (neurons)
    squares: np.ndarray | None  # Σy²
    cross: CrossSums
    population: int  # matching items of the whole data set
    population_z: np.ndarray  # their mean covariates
    fit: RowSums | None = None

    @property
    def fit_rows(self) -> RowSums:
        return self.fit if self.fit is not None else \
            RowSums(self.n, self.total, self.squares, self.cross)


@dataclass(frozen=True)
class Pooled:
    """The pooled slope's products over every sampled row of every group, projected on the
    few directions the groups' corrections need (``directions``): Π = Σ (Dᵀz)vᵀ, d × neurons.
    A group's correction δᵀB is uᵀΣ(z − z̄_g)vᵀ with u = A⁻¹δ, and every u lies in the span of
    D (d ≤ the number of groups), so d multiply-adds per value replace the p of Σzvᵀ
    (docs/ARCHITECTURE.md, "Estimates")."""

    directions: np.ndarray  # p × d, orthonormal columns
    products: np.ndarray  # d × neurons


def directions(z: np.ndarray, codes: np.ndarray | None, population_z: list,
               ridge: float = RIDGE) -> np.ndarray:
    """The p × d orthonormal basis of the groups' u = A⁻¹δ (``Pooled``), from the sampled
    items' latent covariates ``z`` (n × p), their group codes (None: one group) and each
    group's population mean covariates (by code)."""
    p = z.shape[1]
    if p == 0 or len(z) == 0:
        return np.zeros((p, 0))
    codes = np.zeros(len(z), np.int64) if codes is None else np.asarray(codes, np.int64)
    u = corrections(np.asarray(z, dtype=np.float64), codes, population_z, ridge)[2]
    left, values, _ = np.linalg.svd(u.T, full_matrices=False)  # a group with no row: u = 0
    keep = values > 1e-12 * max(float(values.max(initial=0)), 1e-300)
    return left[:, keep]


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
    ridge: float = RIDGE  # the fit's (engine/ridge.py)


def of_rows(values: np.ndarray, z: np.ndarray, population: int,
            population_z: np.ndarray) -> GroupSums:
    """One group's sums from its sampled rows (n × neurons) and their covariates (n × p)."""
    values = np.asarray(values, dtype=np.float64)
    return GroupSums(len(values), values.sum(axis=0), (values * values).sum(axis=0),
                     CrossSums.of_rows(z, values), population, population_z)


def corrected_mean(values: np.ndarray, z: np.ndarray, population_z: np.ndarray,
                   ridge: float | None = None) -> np.ndarray:
    """``assisted``'s estimate of one group's mean from its sampled rows alone (no variance):
    the lean form EVALUATE scores every combination with; ``ridge`` None: the one the rows
    choose (engine/ridge.py), as ``assisted``'s."""
    values = np.asarray(values, dtype=np.float64)
    ybar, zbar = values.mean(axis=0), z.mean(axis=0)
    zc, yc = z - zbar, values - ybar
    szz, szv = zc.T @ zc, zc.T @ yc
    if ridge is None:
        ridge = ridges.chosen(szz, szv, (yc ** 2).sum(axis=0), len(values) - 1,
                              [population_z - zbar])
    B = np.linalg.solve(szz + ridge * np.eye(z.shape[1]), szv)
    return ybar + (population_z - zbar) @ B


def _centred(rows: RowSums, products: bool = True) -> tuple:
    """(v̄, z̄, Szz, Szv, Svv) of some rows: their means and centred cross-products (Szv and
    Svv None without ``products``: all that is read of every row when fit rows are given)."""
    n = rows.n
    vbar = rows.total / n
    zbar = rows.cross.z.numpy() / n
    szz = rows.cross.zz.numpy() - n * np.outer(zbar, zbar)
    if not products:
        return vbar, zbar, szz, None, None
    szv = rows.cross.zy.numpy() - n * np.outer(zbar, vbar)
    svv = np.maximum(rows.squares - n * vbar ** 2, 0.0)
    return vbar, zbar, szz, szv, svv


def _slope(S: np.ndarray, szv: np.ndarray, ridge: float) -> tuple:
    """The pooled ridge slope from the parts' summed centred Szz and Szv: (B, A⁻¹)."""
    A = S + ridge * np.eye(S.shape[0])
    B = np.linalg.solve(A, szv)  # p × neurons
    return B, np.linalg.inv(A)


def assisted(groups: dict, pooled: Pooled | None = None, ridge: float | None = None) -> dict:
    """key -> Fitted for every group with at least one sampled item (``groups``: key ->
    GroupSums); a group of one item has no residual variance (se NaN).

    The mean takes the slope fitted on every sampled row: from ``pooled`` when the pass
    streamed it projected (the groups' ``fit`` rows are then some of them), else from the
    groups' own cross-products. The residual variance σ² is fitted on each group's fit rows
    (all of them without ``fit``), with its own slope on those rows; the standard error
    combines it with the full slope's uncertainty and what its shrinkage may leave of the
    selection's bias (the module's docstring). ``ridge``: the fit's; None: chosen from
    the fit rows (engine/ridge.py), or RIDGE where the pass streamed ``pooled`` (thousands of
    rows a group, whose slope a ridge of 10 barely shrinks)."""
    parts = {key: (g, _centred(RowSums(g.n, g.total, None, g.cross), False),
                   _centred(g.fit_rows))
             for key, g in groups.items() if g.n > 0}
    if not parts:
        return {}
    p = len(next(iter(parts.values()))[1][1])
    S = sum(whole[2] for _, whole, _ in parts.values())
    fits = [rows for _, _, rows in parts.values()]
    # The fit rows' pooled Szz and Szv (p × neurons), summed once: the ridge's choice, the
    # slope and the slopes' sizes the rows show all read them.
    S_fit, szv_fit = sum(f[2] for f in fits), sum(f[3] for f in fits)
    free = sum(rows.n for rows in (g.fit_rows for g, _, _ in parts.values())) - len(parts)
    # Every sampled row a fit row (at most FIT_ROWS a group, engine/prediction.py): the fit
    # rows' slope is the whole slope, at any ridge.
    every = all(g.fit_rows.n == g.n for g, _, _ in parts.values())
    if ridge is None:
        ridge = RIDGE if not every else ridges.chosen(
            S_fit, szv_fit, sum(f[4] for f in fits), free,
            [g.population_z - whole[1] for g, whole, _ in parts.values()])
    if ridge != RIDGE:
        pooled = None  # its directions are RIDGE's corrections (``directions``)
    A_inv = np.linalg.inv(S + ridge * np.eye(p))
    B_fit, A_fit_inv = _slope(S_fit, szv_fit, ridge)
    if pooled is not None:
        D = pooled.directions
        # Dᵀ Σ_g S_zv,g: the projected products, each group centred.
        projected = pooled.products - sum(g.n * np.outer(D.T @ whole[1], whole[0])
                                          for g, whole, _ in parts.values())
    p_eff = float(np.trace(S_fit @ A_fit_inv))  # the fit's slope's degrees of freedom
    # Residuals of a fitted slope understate σ²; the floor only keeps a slope that fits all of
    # a tiny sample from dividing by ~0 (it was 1, which left n = 2 or 3 uninflated: its
    # expected cosine distances came out at 0.74x the actual, benchmarks/README.md).
    inflate = free / max(free - p_eff, 0.5)
    # Each neuron's slope along each eigendirection of the fit rows' covariates: its size
    # shows in their cross-products, (eᵀ·Szv)², where they determine it (``shown_slopes``).
    evals, evecs = np.linalg.eigh(S_fit)
    along = (evecs.T @ szv_fit) ** 2
    out = {}
    for key, (g, (ybar, zbar, *_), (fvbar, fzbar, fszz, fszv, fsvv)) in parts.items():
        delta = g.population_z - zbar
        if pooled is None:
            mean = ybar + delta @ B_fit  # the fit rows are every row: B_fit is the slope
        else:
            mean = ybar + (D.T @ (A_inv @ delta)) @ projected
        m = g.fit_rows.n
        if m < 2:
            out[key] = Fitted(mean, np.full_like(mean, np.nan), 0, ridge=ridge)
            continue
        rss = residual_ss(fsvv, fszv, fszz, B_fit)
        sigma2 = np.maximum(rss, 0.0) / (m - 1) * inflate
        u = A_inv @ delta
        noise = float(u @ S @ u)  # the shrunk slope's sampling variance, per unit σ²
        slope_noise = sigma2 * noise
        if g.fit_rows.weighted is not None:  # the outliers' residuals, restored (leverage.py)
            sigma2, slope_noise = restored(
                g.fit_rows.weighted, sigma2, noise, m * inflate / (m - 1), m, fvbar, fzbar,
                B_fit)
        fpc = max(g.population - g.n, 0) / max(g.population, 1)
        # What the shrinkage may leave of the selection's bias, ridge·uᵀβ: the slope's prior
        # (each direction's β² at σ²/ridge) or its size the fit rows show, the larger (shown
        # along the directions that hold RIDGE's information, whatever the fit's ridge).
        prior = np.maximum(sigma2[None, :] / ridge, shown_slopes(evals, along, sigma2, RIDGE))
        bias2 = ridge ** 2 * ((evecs.T @ u) ** 2 @ prior)
        se = np.sqrt(sigma2 * fpc / g.n + slope_noise + bias2)
        # A neuron constant over the fit rows, which the fit follows to rounding (a conv's
        # bias where every sampled image is blank): its shown slope was rounding too, and its
        # se ~1e-15 had escaped the constant floor (estimate._constant_floor) that gives the
        # items not drawn their rule-of-three spread (conv1.0 covered 0.71, where 0.92).
        scale = ROUNDING * m * fvbar ** 2
        out[key] = Fitted(mean, np.where((fsvv <= scale) & (rss <= scale), 0.0, se), m - 1,
                          ridge=ridge)
    return out


# The centred sum of squares over m rows, per m·v̄², at or below which a neuron's values are
# one constant to float rounding (a relative spread of 1e-6; float64 sums of a float32
# constant leave ~1e-16).
ROUNDING = 1e-12


def shown_slopes(evals: np.ndarray, along: np.ndarray, sigma2: np.ndarray,
                 ridge: float) -> np.ndarray:
    """Each neuron's squared slope along each eigendirection e (eigenvalue s) of the fit rows'
    centred covariates (directions × neurons), by the method of moments: their
    cross-products with the values along e are s·β + noise of variance σ²·s, so
    ((eᵀSzv)² − σ²·s) / s² estimates β², clipped at 0. Only where s ≥ ridge, where the rows
    hold at least the prior's information; elsewhere 0 (the prior alone speaks): a
    direction the sample barely spans would give a noise of σ²/s, and had widened a random
    sample's intervals 2x. On a small CNN's pooled layer, whose neurons the latent predicts
    closely (slopes far above σ²/ridge), the bias a shrunk slope leaves had been under-stated:
    benchmarks/README.md, "2026-12-04 (twentieth session)"."""
    determined = evals >= ridge
    squared = np.maximum(along - sigma2[None, :] * evals[:, None], 0.0)
    return np.where(determined[:, None], squared / np.maximum(evals, ridge)[:, None] ** 2, 0.0)
