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
                # A layer with itself is 1 by definition, not 1 less a rounding error; two
                # that are one up to a rotation are at most 1 (CKA is a cosine), not 1 + 3e-15.
                out[i, j] = out[j, i] = 1.0 if i == j else min(
                    float(torch.linalg.matrix_norm(moment)) ** 2 / (norms[i] * norms[j]), 1.0)
        return out


class RowState:
    """The rows themselves, per layer (a sample's, or the few items of a narrow WHERE, where
    they take less memory than the moments): merged by concatenation. The debiased estimate
    and its jackknife need every item's own terms, so a sample's answer is computed from these."""

    def __init__(self, widths):
        self.widths = tuple(int(w) for w in widths)
        self.parts: list[list[np.ndarray]] = [[] for _ in self.widths]
        self.count = 0
        self.centred = [False] * len(self.widths)  # ``rows`` made the layer's one part

    @staticmethod
    def floats(widths, items: int) -> int:
        return items * sum(widths)

    def update(self, *rows: torch.Tensor) -> bool:
        if any(self.centred):
            raise RuntimeError("a RowState takes no rows once centred")
        wide = [r.detach().to("cpu", torch.float64) for r in rows]
        if not all(bool(torch.isfinite(r).all()) for r in wide):
            return False
        for part, r in zip(self.parts, wide):
            part.append(r.numpy())
        self.count += wide[0].shape[0]
        return True

    def merge(self, other: "RowState") -> "RowState":
        if any(self.centred) or any(other.centred):
            raise RuntimeError("a RowState takes no rows once centred")
        for mine, theirs in zip(self.parts, other.parts):
            mine.extend(theirs)
        self.count += other.count
        return self

    def rows(self) -> list[np.ndarray]:
        """Each layer's rows (items × width, float64), centred: CKA and the debiased HSIC
        are unchanged by a shift of either layer, and centring keeps their digits. Joined
        into one array as the batches are let go, and centred in place, which is kept as the
        layer's one part: the batches, their concatenation and its centred copy had held
        three copies of the rows (an exact SIMILARITY on a 131,072-wide conv over 1,000
        items took 3.0 GB, where the rows are 1.0 GB; a sweep, benchmarks/README.md,
        "twenty-fourth session"). The state takes no rows after this."""
        out = []
        for i, (part, width) in enumerate(zip(self.parts, self.widths)):
            if self.centred[i]:
                out.append(part[0])
                continue
            x = np.empty((sum(len(p) for p in part), width))
            at = 0
            while part:
                batch = part.pop(0)
                x[at:at + len(batch)] = batch
                at += len(batch)
            if len(x):
                x -= x.mean(axis=0)
            part.append(x)
            self.centred[i] = True
            out.append(x)
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
                    out[i, j] = out[j, i] = 1.0 if i == j else min(
                        _hsic(rows[i], rows[j], grams[i], grams[j]) / (norms[i] * norms[j]), 1.0)
        return out


def _gram_or_moment(x: np.ndarray) -> np.ndarray:
    """X Xᵀ (n × n) or Xᵀ X (d × d), whichever is smaller: the same Frobenius norm."""
    return x @ x.T if len(x) <= x.shape[1] else x.T @ x


def _hsic(x, y, gx, gy) -> float:
    """tr(K L) = ‖XᵀY‖²_F for centred X, Y, by whichever form is cheaper."""
    if gx.shape[0] == len(x) and gy.shape[0] == len(y):
        return float(np.sum(gx * gy))
    return float(np.linalg.norm(x.T @ y) ** 2)


# --- the estimate of a sample ---------------------------------------------------------------
#
# The exact answer is the plain CKA over the N matching items: HSIC = tr(KHLH) / N², with
# K = XXᵀ and L = YYᵀ over the population (diagonals included). Written as sums over index
# tuples, each sum splits into sums over tuples of distinct indices, and under a uniform
# sample without replacement the mean of f over the sample's distinct m-tuples is unbiased for
# the population's. So each population term is estimated from the sample's distinct-tuple means
# of its parts, weighted by N. The result is unbiased for the population's plain HSIC, equals it
# when the sample holds every item, and as N grows becomes Song et al.'s (2012) unbiased HSIC,
# which targets an infinite population; that one kept its gap to a small group's exact CKA even
# when the sample was nearly the whole group (docs/ARCHITECTURE.md, "Similarity").


def _falling(n, k: int):
    out = 1.0
    for i in range(k):
        out = out * (n - i)
    return out


def _sums(x: np.ndarray, y: np.ndarray, gx=None, gy=None) -> tuple[dict, dict]:
    """The sample's sums that its distinct-tuple means come from, and each item's part of
    them (to take the item out). With dK, dL the diagonals, u = K1, v = L1: P = Σ dK·dL,
    Q = Σ_ij K_ij L_ij, tK = Σ dK, SK = 1ᵀK1, U = Σ u·v, W1 = Σ dK·v, W2 = Σ dL·u. The Gram
    form (gx, gy given) costs n² memory; the feature form never forms it."""
    dk, dl = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    if gx is not None and gy is not None:
        u, v = gx.sum(axis=1), gy.sum(axis=1)
        q = np.einsum("ij,ij->i", gx, gy)
        w1, w2, m1, m2 = gy @ dk, gx @ dl, gy @ u, gx @ v
    else:
        u, v = x @ x.sum(axis=0), y @ y.sum(axis=0)
        q = np.einsum("ij,ij->i", x @ (x.T @ y), y)
        w1, w2 = y @ (y.T @ dk), x @ (x.T @ dl)
        m1, m2 = y @ (y.T @ u), x @ (x.T @ v)
    items = dict(dk=dk, dl=dl, u=u, v=v, q=q, w1=w1, w2=w2, m1=m1, m2=m2)
    totals = dict(P=float(dk @ dl), Q=float(q.sum()), tK=float(dk.sum()), tL=float(dl.sum()),
                  SK=float(u.sum()), SL=float(v.sum()), U=float(u @ v), W1=float(dk @ v),
                  W2=float(dl @ u))
    return totals, items


def _without_each(t: dict, i: dict) -> dict:
    """The sums with each item left out in turn (arrays, one value per item)."""
    own = i["dk"] * i["dl"]
    return dict(
        P=t["P"] - own, Q=t["Q"] - 2 * i["q"] + own, tK=t["tK"] - i["dk"], tL=t["tL"] - i["dl"],
        SK=t["SK"] - 2 * i["u"] + i["dk"], SL=t["SL"] - 2 * i["v"] + i["dl"],
        W1=t["W1"] - i["dk"] * i["v"] - i["w1"] + own,
        W2=t["W2"] - i["dl"] * i["u"] - i["w2"] + own,
        U=(t["U"] - i["u"] * i["v"] - (i["m1"] - i["u"] * i["dl"])
           - (i["m2"] - i["dk"] * i["v"]) + (i["q"] - own)))


def _population_hsic(n, s: dict, population: int | None):
    """The estimate of the population's plain HSIC, tr(KHLH) / N², from a sample of n items'
    sums (``_sums``; arrays give one estimate per entry). ``population`` None: an infinite
    one (Song et al.'s unbiased HSIC)."""
    P, Q, tK, tL, SK, SL, U, W1, W2 = (s[key] for key in
                                       ("P", "Q", "tK", "tL", "SK", "SL", "U", "W1", "W2"))
    n2, n3, n4 = _falling(n, 2), _falling(n, 3), _falling(n, 4)
    # The sample's means over distinct tuples (i, j, p, q distinct where they differ).
    a1 = P / n  # K_ii L_ii
    a2 = (Q - P) / n2  # K_ij L_ij
    b2a = (W1 - P) / n2  # K_ii L_iq
    b2b = (W2 - P) / n2  # K_ij L_ii
    b3 = (U - W1 - W2 + 2 * P - Q) / n3  # K_ij L_iq
    c3a = (tK * (SL - tL) - 2 * W1 + 2 * P) / n3  # K_ii L_pq
    c3b = (tL * (SK - tK) - 2 * W2 + 2 * P) / n3  # K_ij L_pp
    c2a = (tK * tL - P) / n2  # K_ii L_pp
    c4 = (SK * SL - n3 * (c3a + c3b + 4 * b3) - n2 * (c2a + 2 * a2 + 2 * b2a + 2 * b2b)
          - P) / n4  # K_ij L_pq
    inv = 0.0 if population is None else 1.0 / population
    f2 = 1 - inv
    f3 = f2 * (1 - 2 * inv)
    f4 = f3 * (1 - 3 * inv)
    # tr(KHLH) = Σ_ij K_ij L_ij − (2/N) Σ_ijq K_ij L_iq + (1/N²) Σ_ij K_ij Σ_pq L_pq, each sum
    # over every index tuple split by which indices coincide, over N².
    first = f2 * a2 + inv * a1
    second = inv * inv * a1 + f2 * inv * (b2a + b2b + a2) + f3 * b3
    third = (f4 * c4 + f3 * inv * (c3a + c3b + 4 * b3)
             + f2 * inv * inv * (c2a + 2 * a2 + 2 * b2a + 2 * b2b) + inv ** 3 * a1)
    return first - 2 * second + third


def _hsic_and_jackknife(x, y, gx, gy, population):
    """The estimated population HSIC of (x, y) over all n sampled items, and its n
    delete-one values."""
    n = len(x)
    totals, items = _sums(x, y, gx, gy)
    whole = _population_hsic(n, totals, population)
    dropped = _population_hsic(n - 1, _without_each(totals, items), population)
    return whole, dropped


MIN_ITEMS = 5  # the distinct 4-tuples need n ≥ 4, and the delete-one values n - 1 ≥ 4


def debiased_matrix(rows: list[np.ndarray], population: int | None = None,
                    level: float = 0.95):
    """Every pair's estimated CKA over a sample's rows (centred, items × width each), drawn
    uniformly without replacement from ``population`` items (None: an infinite population):
    HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), each HSIC the unbiased estimate of the
    population's plain one (the exact answer's; Song et al.'s unbiased HSIC for an infinite
    population), and a ``level`` interval from the delete-one jackknife over the sampled items,
    its variance finite-population corrected. Returns (value, low, high) L × L arrays, clipped
    to [0, 1]; NaN where a layer's own HSIC is not positive."""
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
                                              grams[j] if use else None, population)
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
