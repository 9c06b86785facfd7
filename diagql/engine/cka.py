"""Linear CKA (Kornblith et al. 2019) between layers' representations of the same items: the
exact value from mergeable feature-space moments, and a sample's debiased estimate with its
jackknife interval (docs/ARCHITECTURE.md, "Similarity").

Every state is fed one batch at a time with one (items × width) row block per layer, the rows
of the same items in the same order (``update(x_rows, y_rows, ...)``), and merges with a state
fed other items (``merge``), whichever model, pass or shard the rows came from.
"""
from __future__ import annotations

import numpy as np
import torch

from diagql.engine.student_t import t_quantile


class MomentState:
    """The sufficient statistics of exact linear CKA between every pair of L layers: the count,
    each layer's mean and each pair's centred cross moment XcᵀYc (dx × dy; a layer's own,
    XcᵀXc, for the diagonal). Memory is (Σd)²/2 floats whatever the number of items, and no
    N × N Gram matrix is ever formed. Batches and shards combine by the pairwise update of Chan,
    Golub and LeVeque (each batch centred at its own mean, the means' difference added as a
    rank-one term), so a large mean costs no precision, unlike XᵀX − n·μμᵀ."""

    def __init__(self, widths):
        self.widths = tuple(int(w) for w in widths)
        self.count = 0
        self.means: list[torch.Tensor] | None = None
        self.moments: dict[tuple[int, int], torch.Tensor] = {}  # (i, j), i <= j

    @staticmethod
    def floats(widths) -> int:
        """How many float64 values the state holds for layers of these widths."""
        widths = list(widths)
        return sum(a * b for i, a in enumerate(widths) for b in widths[i:]) + sum(widths)

    def update(self, *rows: torch.Tensor) -> bool:
        """Add a batch: one (items × width) tensor per layer, the same items in the same order.
        False, leaving the state as it was, when the batch holds NaN or inf."""
        wide = [r.detach().to(torch.float64) for r in rows]
        if not all(bool(torch.isfinite(r).all()) for r in wide):
            return False
        b = wide[0].shape[0]
        if b == 0:
            return True
        means = [r.mean(dim=0) for r in wide]
        centred = [r - m for r, m in zip(wide, means)]
        moments = {(i, j): centred[i].T @ centred[j]
                   for i in range(len(wide)) for j in range(i, len(wide))}
        self._combine(b, means, moments)
        return True

    def _combine(self, b: int, means: list, moments: dict) -> None:
        if self.count == 0:
            self.count, self.means, self.moments = b, means, moments
            return
        n = self.count
        total = n + b
        device = self.means[0].device
        deltas = [m.to(device) - mine for m, mine in zip(means, self.means)]
        for (i, j), moment in moments.items():
            self.moments[i, j] += moment.to(device)
            self.moments[i, j] += (n * b / total) * torch.outer(deltas[i], deltas[j])
        self.means = [mine + d * (b / total) for mine, d in zip(self.means, deltas)]
        self.count = total

    def __getstate__(self) -> dict:
        # A shard's state travels from its worker (perhaps a GPU's) to a driver that may
        # have no GPU.
        state = dict(self.__dict__)
        state["means"] = None if self.means is None else [m.cpu() for m in self.means]
        state["moments"] = {key: m.cpu() for key, m in self.moments.items()}
        return state

    def merge(self, other: "MomentState") -> "MomentState":
        if other.count:
            self._combine(other.count, other.means, other.moments)
        return self

    def matrix(self) -> np.ndarray:
        """Every pair's linear CKA, ‖XcᵀYc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F); NaN beside a layer
        that is constant over the items (its CKA with anything is undefined)."""
        size = len(self.widths)
        out = np.full((size, size), np.nan)
        if self.count < 2:
            return out
        norms = [float(torch.linalg.matrix_norm(self.moments[i, i])) for i in range(size)]
        for (i, j), moment in self.moments.items():
            if norms[i] > 0 and norms[j] > 0:
                # A layer with itself is 1 by definition, not 1 less a rounding error.
                out[i, j] = out[j, i] = 1.0 if i == j else \
                    float(torch.linalg.matrix_norm(moment)) ** 2 / (norms[i] * norms[j])
        return out


class RowState:
    """The rows themselves, per layer (a sample's, or the few items of a narrow WHERE, where
    they take less memory than the moments): merged by concatenation. The debiased estimate
    and its jackknife need every item's own terms, so a sample's answer is computed from these."""

    def __init__(self, widths):
        self.widths = tuple(int(w) for w in widths)
        self.parts: list[list[np.ndarray]] = [[] for _ in self.widths]
        self.count = 0

    @staticmethod
    def floats(widths, items: int) -> int:
        return items * sum(widths)

    def update(self, *rows: torch.Tensor) -> bool:
        wide = [r.detach().to("cpu", torch.float64) for r in rows]
        if not all(bool(torch.isfinite(r).all()) for r in wide):
            return False
        for part, r in zip(self.parts, wide):
            part.append(r.numpy())
        self.count += wide[0].shape[0]
        return True

    def merge(self, other: "RowState") -> "RowState":
        for mine, theirs in zip(self.parts, other.parts):
            mine.extend(theirs)
        self.count += other.count
        return self

    def rows(self) -> list[np.ndarray]:
        """Each layer's rows (items × width, float64), centred: CKA and the debiased HSIC
        are unchanged by a shift of either layer, and centring keeps their digits."""
        out = []
        for part, width in zip(self.parts, self.widths):
            x = np.concatenate(part) if part else np.empty((0, width))
            out.append(x - x.mean(axis=0) if len(x) else x)
        return out

    def matrix(self) -> np.ndarray:
        """The exact linear CKA of every pair over these items (Gram form when the items are
        fewer than a layer's width, feature form otherwise)."""
        rows = self.rows()
        size = len(rows)
        out = np.full((size, size), np.nan)
        if self.count < 2:
            return out
        grams = [_gram_or_moment(x) for x in rows]
        norms = [float(np.linalg.norm(g)) for g in grams]
        for i in range(size):
            for j in range(i, size):
                if norms[i] > 0 and norms[j] > 0:
                    out[i, j] = out[j, i] = 1.0 if i == j else \
                        _hsic(rows[i], rows[j], grams[i], grams[j]) / (norms[i] * norms[j])
        return out


def _gram_or_moment(x: np.ndarray) -> np.ndarray:
    """X Xᵀ (n × n) or Xᵀ X (d × d), whichever is smaller: the same Frobenius norm."""
    return x @ x.T if len(x) <= x.shape[1] else x.T @ x


def _hsic(x, y, gx, gy) -> float:
    """tr(K L) = ‖XᵀY‖²_F for centred X, Y, by whichever form is cheaper."""
    if gx.shape[0] == len(x) and gy.shape[0] == len(y):
        return float(np.sum(gx * gy))
    return float(np.linalg.norm(x.T @ y) ** 2)


# --- the debiased estimate of a sample ----------------------------------------------------------


def _item_terms(x: np.ndarray, y: np.ndarray, gx=None, gy=None):
    """Per item i of the linear kernels K = XXᵀ, L = YYᵀ with their diagonals zeroed:
    u_i = Σ_j K̃_ij, v_i = Σ_j L̃_ij, r_i = Σ_j K̃_ij L̃_ij and c_i = Σ_j (u_j L̃_ij + K̃_ij v_j).
    They give the unbiased HSIC and, each item's own removed, its delete-one values. The
    Gram form costs n² memory; the feature form (for more items than dims) never forms it."""
    a, b = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    if gx is not None and gy is not None:
        k, ell = gx.copy(), gy.copy()
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(ell, 0.0)
        u, v = k.sum(axis=1), ell.sum(axis=1)
        return u, v, np.einsum("ij,ij->i", k, ell), ell @ u + k @ v
    u = x @ x.sum(axis=0) - a
    v = y @ y.sum(axis=0) - b
    r = np.einsum("ij,ij->i", x @ (x.T @ y), y) - a * b
    c = y @ (y.T @ u) - b * u + x @ (x.T @ v) - a * v
    return u, v, r, c


def _unbiased(n, total_r, sum_u, sum_v, sum_uv):
    """Song et al. (2012)'s unbiased HSIC from the sums of the item terms (n ≥ 4; arrays of
    delete-one sums give every delete-one value at once)."""
    return (total_r + sum_u * sum_v / ((n - 1) * (n - 2)) - 2 * sum_uv / (n - 2)) / (n * (n - 3))


def _hsic_and_jackknife(x, y, gx, gy):
    """The unbiased HSIC of (x, y) over all n items, and its n delete-one values."""
    n = len(x)
    u, v, r, c = _item_terms(x, y, gx, gy)
    total_r, sum_u, sum_v, sum_uv = r.sum(), u.sum(), v.sum(), (u * v).sum()
    whole = _unbiased(n, total_r, sum_u, sum_v, sum_uv)
    # Item i removed: its row and column of K̃ and L̃ leave every sum.
    dropped = _unbiased(n - 1, total_r - 2 * r, sum_u - 2 * u, sum_v - 2 * v,
                        sum_uv - u * v - c + r)
    return whole, dropped


MIN_ITEMS = 5  # the unbiased HSIC needs n ≥ 4, and its delete-one values n - 1 ≥ 4


def debiased_matrix(rows: list[np.ndarray], population: int | None = None,
                    level: float = 0.95):
    """Every pair's debiased linear CKA over a sample's rows (centred, items × width each):
    HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L)) with Song et al.'s unbiased HSIC, and a
    ``level`` interval from the delete-one jackknife over the sampled items (its variance
    finite-population corrected by the ``population`` they were drawn from). Returns (value,
    low, high) L × L arrays, clipped to [0, 1]; NaN where a layer's own HSIC is not positive."""
    n, size = len(rows[0]), len(rows)
    nan = np.full((size, size), np.nan)
    if n < MIN_ITEMS:
        return nan, nan.copy(), nan.copy()
    # Gram form while it is the smaller: n × n against the feature form's d_x × d_y.
    grams = [x @ x.T if n <= x.shape[1] else None for x in rows]
    pairs = {}
    for i in range(size):
        for j in range(i, size):
            use = grams[i] is not None and grams[j] is not None
            pairs[i, j] = _hsic_and_jackknife(rows[i], rows[j], grams[i] if use else None,
                                              grams[j] if use else None)
    value, low, high = nan.copy(), nan.copy(), nan.copy()
    fpc = 1.0 if not population else max(population - n, 0) / max(population - 1, 1)
    half_width = t_quantile(n - 1, 0.5 + level / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        for (i, j), (whole, dropped) in pairs.items():
            (self_i, drop_i), (self_j, drop_j) = pairs[i, i], pairs[j, j]
            if not (self_i > 0 and self_j > 0):
                continue
            if i == j:  # a layer with itself: 1 exactly, with no spread
                value[i, i] = low[i, i] = high[i, i] = 1.0
                continue
            estimate = whole / np.sqrt(self_i * self_j)
            leave_one = dropped / np.sqrt(drop_i * drop_j)
            leave_one = leave_one[np.isfinite(leave_one)]
            se = np.sqrt((n - 1) / n * np.sum((leave_one - leave_one.mean()) ** 2) * fpc)
            value[i, j] = value[j, i] = np.clip(estimate, 0.0, 1.0)
            low[i, j] = low[j, i] = np.clip(estimate - half_width * se, 0.0, 1.0)
            high[i, j] = high[j, i] = np.clip(estimate + half_width * se, 0.0, 1.0)
    return value, low, high


def plain_matrix(rows: list[np.ndarray]) -> np.ndarray:
    """Every pair's plain (biased) linear CKA over the rows: what the sample alone gives
    without the correction, for comparison."""
    state = RowState([x.shape[1] for x in rows])
    state.parts = [[x] for x in rows]
    state.count = len(rows[0])
    return state.matrix()
