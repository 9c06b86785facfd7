"""Max-margin sampling: a linear SVM on the latents, trained on the true labels and Platt-scaled,
finds the items near decision boundaries; the sample takes a share j of those and the rest as
exemplars (paper, IV-B). ``method='paper'`` is the paper's Algorithm 1; the default,
``method='diagql'``, is our refinement of it (see ``MaxMarginSampler``)."""
from __future__ import annotations

import sys
import time
from typing import ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from diagql.errors import BindError, ExecutionError

from .base import SampleData, Sampler
from .boundary import (TIES_ONLY, boundary_and_exemplars, check_fraction,
                       log_likelihood_ratio, two_ended)
from .space import product_rate, reduced_space


# The SVM's space (``reduced_space``): the latents standardised per dimension and, when wider
# than this, projected on as many principal components plus the class means' directions. On
# the demo's 84-dim latents the default method's 5% samples score as well as in all 84 dims,
# and 100,000 x 768 latents take 1.5-1.8 s instead of 20-35 (benchmarks/sampler_speed.py).
FIT_DIMS = 64
# liblinear's bias feature: at 10 the intercept is barely regularised, as befits centred
# latents, where a one-vs-rest intercept is far from 0.
INTERCEPT_SCALING = 10.0


# A draw's cost in multiply-adds, as a multiple of k·n·(d+1)² (the SVM's Newton systems'
# Gram products over its four fits, k classifiers, n items, d dimensions of its space): 25-60
# of them at one thread's product rate over six shapes, 10-1,000 classes, 2,500-20,000 items,
# 64-512 dimensions (benchmarks/README.md, "USING AUTO and the draw's cost"). Beside it, each
# classifier's item costs a fixed DRAW_ITEM_WORK (its margins, the Newton steps' bookkeeping,
# the exemplars' herding): 16-32 dimensions had drawn 1.8-9x the quadratic term alone, and
# AUTO chose a draw dearer than the exact pass. With both, 11 shapes of 2-100 classes,
# 2,000-20,000 items and 16-128 dimensions drew 0.6-1.3x the estimate in one run and
# 0.2-1.0x in another (benchmarks/draw_cost.py; the product rate moves with the load).
DRAW_WORK = 40
DRAW_ITEM_WORK = 100_000
# With the SVM's fit kept (``boundary_log_proba``), a draw's cost per item whatever the
# classes: 1.7 µs an item at 2,500-50,000 items of 2-100 classes (about 100,000 multiply-adds
# at a product rate of 6e10 a second), where the first draw took 0.2-1.7 s.
KEPT_ITEM_WORK = 100_000
# A process's first draw imports scipy.special (0.2-0.29 s measured), more than the draw
# itself on a few thousand items: a fresh process's AUTO had chosen such a draw over a
# 0.26 s exact pass and taken 0.34 s.
FIRST_DRAW_SECONDS = 0.2
# The one-vs-rest classifiers are fitted a block at a time, as many as make a classes x items
# float32 array (the solver holds about eight: targets, margins, slack, steps), or their Newton
# systems, of about this size; the probabilities are made a chunk of items at a time: 1,000
# classes over 50,000 items had held those arrays for every class at once (3.6 GB).
BLOCK_BYTES = 32 << 20


def boundary_log_proba(data: SampleData, fit_dims: int | None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(the latents in the SVM's space, the SVM's calibrated log probabilities there), read-only.

    The last fit is kept, for the same latents and labels (the same arrays, held by the kept
    entry so that their ids cannot be another's): the SVM depends on neither the size, j nor
    seed, and each new call had fitted it again (EVALUATE's six maxmargin draws at 200,000
    items: 11.3 s, six fits of 1.7 s)."""
    last = _kept(data, fit_dims)
    if last is not None:
        REUSED_SECONDS[0] = last[5]
        return last[3], last[4]
    started = time.perf_counter()
    Z = reduced_space(data.latents, fit_dims, data.labels)
    log_proba = svm_log_proba(Z, data.labels, data.n_classes,
                              intercept_scaling=INTERCEPT_SCALING)
    for made in (Z, log_proba):
        if made is not data.latents:  # (the profile's own array stays as it is)
            made.setflags(write=False)
    _LAST_FIT[:] = [(data.latents, data.labels, (data.n_classes, fit_dims), Z, log_proba,
                     time.perf_counter() - started)]
    REUSED_SECONDS[0] = 0.0
    return Z, log_proba


def _kept(data: SampleData, fit_dims: int | None) -> tuple | None:
    """The kept fit (``_LAST_FIT``'s entry) where it is of these very latents and labels."""
    last = _LAST_FIT[0] if _LAST_FIT else None
    if last is not None and last[0] is data.latents and last[1] is data.labels and \
            last[2] == (data.n_classes, fit_dims):
        return last
    return None


_LAST_FIT: list = []  # (latents, labels, (classes, fit_dims), Z, log_proba, seconds): the last
# The seconds of the fit the last call reused (0.0: it fitted): what a draw's time leaves out,
# which EVALUATE's draw time adds back, so that a sampler's time is that of a draw alone.
REUSED_SECONDS = [0.0]


class MaxMarginSampler(Sampler):
    """Boundary items by a calibrated linear SVM, plus exemplars.

    ``method='paper'`` (Algorithm 1): group items by the SVM's predicted class, sort each group
    by the likelihood ratio p(own) / max p(other), and take round(j·k) items from the low
    (outlier) end and the rest from the high (exemplar) end, k proportional to group size.

    ``method='diagql'`` (the default) measures the same SVM against the model under diagnosis,
    and spends the budget where diagnosis queries need it, per group a query can name (true
    class × correct/incorrect). Measured on the demo's workload (benchmarks/paper_workload.py)
    it is better on S1, S2 and S3; four changes (``boundary_and_exemplars``):

    1. The ratio is p(model's prediction) / max p(other) under the SVM, grouped by the model's
       prediction: an item whose prediction the SVM (trained on the true labels) disputes is on
       the model's boundary.
    2. Every group gets a seed first (an incorrect group its lowest-ratio mistake, a correct
       group its most typical item), then every confusion-matrix cell its lowest-ratio mistake:
       mistakes cluster in a few classes, and every subset a query can name stays represented.
    3. The boundary share goes to the model's mistakes before its correct items, each by lowest
       ratio. The mistakes are known (label ≠ prediction); an SVM in all 84 dimensions of the
       demo's latents disputes nearly all of them by itself, but one in fewer dimensions, or
       on a model whose mistakes a linear SVM cannot fit, leaves many out.
    4. Exemplars are herded: the rest of the budget is shared among the groups by size, and
       within a group items are chosen one at a time so that the mean latent of everything the
       sample holds of it tracks its mean (kernel herding, linear kernel), boundary items
       included: a per-neuron mean over the sample's items of a group is close to the group's.

    The classifier is ``CalibratedClassifierCV(LinearSVC(intercept_scaling=10), cv=3)``'s
    answer on the standardised latents (``FIT_DIMS``): one-vs-rest, squared hinge, L2, C=1;
    three stratified folds, Platt's sigmoid per class fitted on the held-out fold with Platt's
    smoothed targets, per-fold probabilities normalised over classes, then averaged. Only the
    solver differs: the exact primal optimum by Newton's method over the active set,
    warm-started from a subsample, in float32 margins and float64 weights, with probabilities
    kept as logs so that none underflows (see ``svm_log_proba``); about 12x faster than sklearn
    at 100k items.
    """

    name = "maxmargin"
    needs_labels = True  # the SVM is trained on the true labels
    description = ("linear SVM on the latents (true labels), Platt-scaled: a share j of items on "
                   "the model's decision boundaries, the rest exemplars")
    _domains = {**Sampler._domains,
                "j": "a fraction in [0, 1]: the share taken from the outlier (boundary) end",
                "method": "'diagql' (default: refined) or 'paper' (Algorithm 1 as published)",
                "random_state": TIES_ONLY}
    fit_dims: ClassVar[int | None] = FIT_DIMS  # None: never reduced (tests compare with it)

    def __init__(self, size=0.05, j=0.7, method="diagql", random_state=None):
        self.size = size
        self.j = j
        self.method = method
        self.random_state = random_state

    def _check(self) -> None:
        check_fraction(self.j, "j")
        if self.method not in ("diagql", "paper"):
            raise BindError(f"method must be 'diagql' or 'paper', not {self.method!r}",
                            param="method")

    def draw_seconds(self, n_items: int, n_classes: int, width: int,
                     kept: bool = False) -> float | None:
        if kept:  # the SVM is fitted: the margins' grouping and the exemplars' herding alone
            return n_items * KEPT_ITEM_WORK / product_rate()
        # The SVM's space: the latent, or FIT_DIMS principal axes and up to as many of the
        # class means' directions (samplers/space.py); one classifier for two classes.
        d = width if width <= FIT_DIMS else min(width, FIT_DIMS + min(n_classes, FIT_DIMS))
        k = 1 if n_classes <= 2 else n_classes
        first = 0.0 if "scipy.special" in sys.modules else FIRST_DRAW_SECONDS
        return first + k * n_items * (DRAW_ITEM_WORK + DRAW_WORK * (d + 1) ** 2) / product_rate()

    def fit_kept(self, data: SampleData) -> bool:
        return _kept(data, self.fit_dims) is not None

    def _select(self, data: SampleData, n: int, rng: np.random.Generator) -> np.ndarray:
        Z, log_proba = boundary_log_proba(data, self.fit_dims)
        if self.method == "paper":
            self.groups_ = log_proba.argmax(axis=1)
            self.log_ratio_ = log_likelihood_ratio(log_proba, self.groups_)
            return two_ended(self.groups_, self.log_ratio_, n, self.j, rng)
        self.groups_ = np.asarray(data.predictions)
        self.log_ratio_ = log_likelihood_ratio(log_proba, self.groups_)
        return boundary_and_exemplars(Z, data.labels, self.groups_, self.log_ratio_, n, self.j,
                                      rng)


def svm_log_proba(latents: np.ndarray, labels: np.ndarray, n_classes: int, *, C: float = 1.0,
                  intercept_scaling: float = 1.0, cv: int = 3) -> np.ndarray:
    """Log of ``CalibratedClassifierCV(LinearSVC(C=C, intercept_scaling=intercept_scaling),
    cv=cv).predict_proba``, N x n_classes.

    Classes absent from ``labels`` get -inf. With a class too rare to appear in every fold, the
    classifier is fitted once on everything and calibrated on its own decision values (where
    sklearn would refuse). Runs on one BLAS thread: the work is many small products, which
    threads slow down as soon as another process shares the cores.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ExecutionError(f"the SVM that maxmargin and weighted rate items by needs items "
                             f"of at least two true classes; the data has {len(classes)}: use "
                             f"random or stratified")
    bias = np.full((len(labels), 1), intercept_scaling, dtype=np.float32)  # liblinear's
    X = np.hstack([np.asarray(latents, dtype=np.float32), bias])
    # Like LinearSVC, two classes make one classifier (for the second class), more make one each.
    targets = classes[1:] if len(classes) == 2 else classes
    folds = _stratified_folds(labels, cv) if counts.min() >= cv else [(slice(None), slice(None))]
    with threadpool_limits(limits=1):
        fitted = [_fit_block(X, labels, block, folds, C)
                  for block in np.array_split(targets, -(-len(targets) // _block(*X.shape)))]
        # Per fold: every classifier's float32 weights (classes x features) and sigmoid.
        folds_fitted = [(np.vstack([b[f][0] for b in fitted]),
                         np.concatenate([b[f][1][0] for b in fitted]),
                         np.concatenate([b[f][1][1] for b in fitted])) for f in range(len(folds))]
        out = np.full((len(labels), n_classes), -np.inf)
        rows = max(1, BLOCK_BYTES // (8 * len(targets)))
        for start in range(0, len(X), rows):
            chunk = slice(start, start + rows)
            log_proba = -np.inf
            for W32, a, b in folds_fitted:
                log_proba = np.logaddexp(log_proba,
                                         _calibrated_log_proba(W32 @ X[chunk].T, a, b))
            out[chunk, classes] = log_proba - np.log(len(folds))
    return out


def _block(n_items: int, features: int) -> int:
    """How many one-vs-rest classifiers are fitted together (``BLOCK_BYTES``): their float32
    rows of every item, and their float64 Newton systems, features x features each."""
    return max(1, BLOCK_BYTES // max(4 * n_items, 8 * features * features))


def _fit_block(X: np.ndarray, labels: np.ndarray, block: np.ndarray, folds: list,
               C: float) -> list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]:
    """One block of one-vs-rest classifiers (``block``: their classes): per fold, their float32
    weights (classes x features) and Platt sigmoid. Each fold's fit starts from the last one's
    optimum and its sigmoid from the last one's; the first from a fit on a subsample."""
    # Per-class arrays are classes x items, so that every sum over items runs along a row.
    positive = block[:, None] == labels[None, :]
    Y = np.where(positive, np.float32(1), np.float32(-1))
    step = max(1, len(X) // 10_000)
    W = _fit(X[::step], Y[:, ::step], C)  # a warm start; each fold's optimum is exact
    sigmoid, out = None, []
    for train, test in folds:
        W = _fit(X[train], Y[:, train], C, W)
        W32 = W.T.astype(np.float32)
        sigmoid = _platt(W32 @ X[test].T, positive[:, test], sigmoid)
        out.append((W32, sigmoid))
    return out


def _stratified_folds(labels: np.ndarray, cv: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) indices of ``sklearn.model_selection.StratifiedKFold(cv)``'s folds (no
    shuffling: CalibratedClassifierCV's own folds for cv=3), computed here because importing
    scikit-learn costs a new process 0.6-1.4 s, most of its first maxmargin draw.

    As sklearn does it: classes numbered in order of first appearance, each fold's share of a
    class dealt round robin over the sorted labels, and a class's items given to the folds in
    blocks, in data order. tests/test_samplers_boundary.py compares with sklearn's."""
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    by_appearance = np.argsort(np.argsort(first, kind="stable"), kind="stable")[inverse.ravel()]
    n_classes = len(first)
    ordered = np.sort(by_appearance)
    allocation = np.array([np.bincount(ordered[i::cv], minlength=n_classes) for i in range(cv)])
    test_folds = np.empty(len(labels), dtype=np.intp)
    for k in range(n_classes):
        test_folds[by_appearance == k] = np.arange(cv).repeat(allocation[:, k])
    return [(np.flatnonzero(test_folds != i), np.flatnonzero(test_folds == i)) for i in range(cv)]


def _fit(X: np.ndarray, Y: np.ndarray, C: float, W: np.ndarray | None = None,
         max_iter: int = 50, rtol: float = 1e-6) -> np.ndarray:
    """Minimise 0.5·|w_k|² + C·Σ_i max(0, 1 − Y_ki x_i·w_k)² for every row k of Y (classes x
    items); W is features x classes.

    The loss is piecewise quadratic, so Newton's method over the items inside the margin (the
    active set) converges in a handful of steps; from w = 0 every item is active and the first
    step is a ridge regression, which is where we start unless given ``W``. Margins live in
    float32 (one pass over X each), weights and Newton systems in float64.
    """
    d = X.shape[1]
    eye = np.eye(d)
    g0 = np.linalg.norm(2 * C * (Y @ X).astype(np.float64), axis=1)  # gradient at w = 0
    if W is None:
        W = np.linalg.solve(eye + 2 * C * (X.T @ X).astype(np.float64),
                            2 * C * (Y @ X).T.astype(np.float64))
    else:
        W = W.copy()
    Z = Y * (W.T.astype(np.float32) @ X.T)  # functional margins y·(x·w)
    # The classifiers still moving: each step works on their rows alone (once most of 1,000
    # classes have converged, a step over every class had cost as much as the first).
    busy = np.arange(W.shape[1])
    hessians: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # class -> (active set, Hessian)
    gram: list = []  # Σ x xᵀ over every item, made when a Hessian first needs it
    for _ in range(max_iter):
        every = len(busy) == W.shape[1]
        Yb, Zb, Wb = (Y, Z, W) if every else (Y[busy], Z[busy], W[:, busy])
        slack = np.maximum(1 - Zb, 0)
        G = Wb - 2 * C * ((slack * Yb) @ X).T.astype(np.float64)
        moving = np.linalg.norm(G, axis=0) > rtol * g0[busy]
        if not moving.any():
            break
        if not moving.all():
            busy, Yb, Zb, Wb, slack, G = (busy[moving], Yb[moving], Zb[moving], Wb[:, moving],
                                          slack[moving], G[:, moving])
        S = np.zeros_like(Wb)
        for i, k in enumerate(busy):
            hessians[k] = _hessian(X, slack[i] > 0, C, eye, hessians.get(k), gram)
            S[:, i] = -_solve_spd(hessians[k][1], G[:, i])
        dZ = Yb * (S.T.astype(np.float32) @ X.T)
        f0 = 0.5 * (Wb * Wb).sum(0) + C * _row_squares(slack)
        slope = (G * S).sum(0)
        t = np.ones(len(busy))
        stuck = None
        for _ in range(20):  # Armijo backtracking; the full step nearly always passes
            Z_new = Zb + t.astype(np.float32)[:, None] * dZ
            W_new = Wb + t * S
            f = 0.5 * (W_new * W_new).sum(0) + C * _row_squares(np.maximum(1 - Z_new, 0))
            short = f > f0 + 1e-4 * t * slope
            if not short.any():
                break
            t = np.where(short, t / 2, t)
        else:
            stuck = short  # no decrease left at float32 precision: as converged as it gets
        W[:, busy], Z[busy] = W_new, Z_new
        if stuck is not None:
            busy = busy[~stuck]
            if not len(busy):
                break
    return W


def _hessian(X: np.ndarray, active: np.ndarray, C: float, eye: np.ndarray,
             previous: tuple[np.ndarray, np.ndarray] | None,
             gram: list) -> tuple[np.ndarray, np.ndarray]:
    """(active, I + 2C·Σ_active x xᵀ). After the first Newton step the active set changes by a
    few items, so the last Hessian is updated by those rather than summed again over every
    active item (rounding in the update only slows Newton's method down: the gradient it
    follows is exact). Where most items are active (the first steps of a one-vs-rest
    classifier among many classes, whose every negative starts inside the margin), the sum is
    Σ x xᵀ over every item (``gram``, float64, made once) less the inactive items'."""
    if previous is not None:
        before, H = previous
        joined, left = active & ~before, before & ~active
        if joined.sum() + left.sum() < active.sum() // 2:
            Xj, Xl = X[joined], X[left]
            return active, H + 2 * C * (Xj.T @ Xj - Xl.T @ Xl).astype(np.float64)
    if 2 * active.sum() > len(active):
        if not gram:
            X64 = X.astype(np.float64)
            gram.append(X64.T @ X64)
        Xi = X[~active]
        return active, eye + 2 * C * (gram[0] - (Xi.T @ Xi).astype(np.float64))
    Xa = X[active]
    return active, eye + 2 * C * (Xa.T @ Xa).astype(np.float64)


def _solve_spd(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    """H⁻¹g for a Newton system I + 2C·Σ x xᵀ, positive definite: LAPACK's Cholesky solve,
    half np.linalg.solve's time on 129 x 129 (most of it the call's own), which 1,000 classes'
    Newton steps make 87,000 times; an LU solve where rounding leaves it indefinite."""
    from scipy.linalg import lapack  # (scipy is imported by the Platt fit's first call too)

    _, x, info = lapack.dposv(H, g, lower=1)
    return x if info == 0 else np.linalg.solve(H, g)


def _row_squares(A: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", A, A, dtype=np.float64)


def _platt(F: np.ndarray, positive: np.ndarray, start=None, max_iter: int = 100):
    """Platt's sigmoid p = 1 / (1 + exp(a·f + b)) per row of F (classes x items), fitted by
    Newton's method on the log loss against Platt's smoothed targets (what sklearn's sigmoid
    calibration minimises). Starts from Platt's (0, log((N- + 1) / (N+ + 1))), or from
    ``start`` (another fold's fit).

    Each step is halved until the loss does not rise: a full Newton step from a start far from
    the optimum (another fold's fit, on decision values of another scale) can overshoot into
    the flat tails of the loss and run off to a ~ 1e15, where every probability is 0 or 1 and
    the likelihood ratios lose their spread."""
    F = F.astype(np.float64)
    n1 = positive.sum(1).astype(np.float64)[:, None]
    n0 = F.shape[1] - n1
    T = np.where(positive, (n1 + 1) / (n1 + 2), 1 / (n0 + 2))
    if start is not None:
        a_out, b_out = np.array(start[0], dtype=np.float64), np.array(start[1], dtype=np.float64)
    else:
        a_out, b_out = np.zeros(len(F)), np.log((n0 + 1) / (n1 + 1))[:, 0]

    def loss(a, b):  # -Σ T·log p + (1 - T)·log(1 - p) = Σ log(1 + e^z) - (1 - T)·z
        z = a[:, None] * F + b[:, None]
        return (np.logaddexp(0, z) - (1 - T) * z).sum(1)

    from scipy.special import expit  # here: scipy costs every new process's import 0.15 s

    # The rows still moving (F, T, a, b, f hold theirs alone): each step works on them only,
    # as a row whose step fell under the tolerance is done.
    live, a, b = np.arange(len(F)), a_out.copy(), b_out.copy()
    f = loss(a, b)
    for _ in range(max_iter):
        p = expit(-(a[:, None] * F + b[:, None]))
        r = p - T
        w = p * (1 - p)
        wF = w * F
        ga, gb = -np.einsum("ij,ij->i", r, F), -r.sum(1)
        haa, hab, hbb = np.einsum("ij,ij->i", wF, F) + 1e-12, wF.sum(1), w.sum(1) + 1e-12
        det = haa * hbb - hab * hab
        da, db = -(hbb * ga - hab * gb) / det, -(haa * gb - hab * ga) / det
        t = np.ones(len(F))
        for _ in range(50):
            f_new = loss(a + t * da, b + t * db)
            rising = f_new > f + 1e-12 * np.abs(f)
            if not rising.any():
                break
            t = np.where(rising, t / 2, t)
        else:
            t = np.where(rising, 0.0, t)  # no decrease left at float64 precision
            f_new = np.where(rising, f, f_new)
        a, b, f = a + t * da, b + t * db, f_new
        a_out[live], b_out[live] = a, b
        # A row is done when a full Newton step is that small; one whose step was halved may
        # only have met a kink of the loss, and one no step decreases (t = 0) is done too.
        moving = (np.maximum(np.abs(t * da), np.abs(t * db)) >= 1e-9 * np.maximum(1.0, np.abs(a))
                  ) | ((t > 0) & (t < 1))
        if not moving.any():
            break
        if not moving.all():
            live, F, T, a, b, f = live[moving], F[moving], T[moving], a[moving], b[moving], \
                f[moving]
    return a_out, b_out


def _calibrated_log_proba(F: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The log of the per-class Platt probabilities (F: classes x items) normalised over
    classes, items x classes (from one row: two classes).

    In logs throughout, so that no probability underflows to 0: far from every boundary the
    ratios stay finite and ordered instead of tying at infinity (where the order would fall
    to the item index). CalibratedClassifierCV's uniform answer where every class's
    probability underflows cannot arise."""
    from scipy.special import log_expit, logsumexp

    z = a * F.T.astype(np.float64) + b
    if len(F) == 1:
        return np.hstack([log_expit(z), log_expit(-z)])
    log_p = log_expit(-z)
    return log_p - logsumexp(log_p, axis=1, keepdims=True)
