"""Max-margin sampling: a linear SVM on the latents, trained on the true labels and Platt-scaled,
finds the items near decision boundaries; the sample takes a share j of those and the rest as
exemplars (paper, IV-B). ``method='paper'`` is the paper's Algorithm 1; the default,
``method='diagql'``, is our refinement of it (see ``MaxMarginSampler``)."""
from __future__ import annotations

import numpy as np
from scipy.special import expit
from threadpoolctl import threadpool_limits

from diagql.errors import BindError, ExecutionError

from .base import SampleData, Sampler
from .boundary import boundary_and_exemplars, check_fraction, log_likelihood_ratio, two_ended


class MaxMarginSampler(Sampler):
    """Boundary items by a calibrated linear SVM, plus exemplars.

    ``method='paper'`` (Algorithm 1): group items by the SVM's predicted class, sort each group
    by the likelihood ratio p(own) / max p(other), and take round(j·k) items from the low
    (outlier) end and the rest from the high (exemplar) end, k proportional to group size.

    ``method='diagql'`` (the default) measures the same SVM against the model under diagnosis,
    and spends the budget where diagnosis queries need it. Measured on the demo's workload
    (benchmarks/paper_workload.py) it is better on S1, S2 and S3; three changes:

    1. The ratio is p(model's prediction) / max p(other) under the SVM, grouped by the model's
       prediction: an item whose prediction the SVM (trained on the true labels) disputes is on
       the model's boundary, which is where its mistakes are.
    2. Boundary items are taken by the lowest ratio over the whole data, after one item (the
       lowest-ratio one) from every non-empty confusion-matrix cell: mistakes cluster in a few
       classes, so a per-group quota leaves some out, and every (class, correctness) subset a
       query can name stays represented.
    3. Exemplars are herded: per group, items chosen one at a time so that their mean latent
       tracks the group's (kernel herding, linear kernel), so that they represent the group
       (a per-neuron mean over them is close to the group's) rather than being its most
       extreme, most confident items.

    The classifier is ``CalibratedClassifierCV(LinearSVC(), cv=3)``'s answer, about 12x faster
    at 100k items.

    The classifier is sklearn's default ``LinearSVC`` (one-vs-rest, squared hinge, L2, C=1,
    intercept regularised like liblinear's) and the calibration is ``CalibratedClassifierCV``'s
    (three stratified folds; Platt's sigmoid per class fitted on the held-out fold with Platt's
    smoothed targets; per-fold probabilities normalised over classes, then averaged). Only the
    solver differs: the exact primal optimum by Newton's method over the active set, warm-started
    from a subsample, in float32 margins and float64 weights. See ``svm_log_proba``.
    """

    name = "maxmargin"
    needs_labels = True  # the SVM is trained on the true labels
    description = ("linear SVM on the latents (true labels), Platt-scaled: a share j of items on "
                   "the model's decision boundaries, the rest exemplars")
    _domains = {**Sampler._domains,
                "j": "a fraction in [0, 1]: the share taken from the outlier (boundary) end",
                "method": "'diagql' (default: refined) or 'paper' (Algorithm 1 as published)"}

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

    def _select(self, data: SampleData, n: int, rng: np.random.Generator) -> np.ndarray:
        log_proba = svm_log_proba(data.latents, data.labels, data.n_classes)
        if self.method == "paper":
            self.groups_ = log_proba.argmax(axis=1)
            self.log_ratio_ = log_likelihood_ratio(log_proba, self.groups_)
            return two_ended(self.groups_, self.log_ratio_, n, self.j, rng)
        self.groups_ = np.asarray(data.predictions)
        self.log_ratio_ = log_likelihood_ratio(log_proba, self.groups_)
        cells = np.asarray(data.labels, dtype=np.int64) * (data.n_classes + 1) + self.groups_
        return boundary_and_exemplars(data.latents, self.groups_, cells, self.log_ratio_, n,
                                    self.j, rng)


def svm_log_proba(latents: np.ndarray, labels: np.ndarray, n_classes: int, *, C: float = 1.0,
                  cv: int = 3) -> np.ndarray:
    """Log of ``CalibratedClassifierCV(LinearSVC(C=C), cv=cv).predict_proba``, N x n_classes.

    Classes absent from ``labels`` get -inf. With a class too rare to appear in every fold, the
    classifier is fitted once on everything and calibrated on its own decision values (where
    sklearn would refuse). Runs on one BLAS thread: the work is many small products, which
    threads slow down as soon as another process shares the cores.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ExecutionError(f"maxmargin needs items of at least two true classes; the data has "
                             f"{len(classes)}")
    X = np.hstack([np.asarray(latents, dtype=np.float32),
                   np.ones((len(labels), 1), dtype=np.float32)])  # liblinear's bias feature
    # Like LinearSVC, two classes make one classifier (for the second class), more make one each.
    # Per-class arrays are classes x items, so that every sum over items runs along a row.
    positive = (classes[1:] if len(classes) == 2 else classes)[:, None] == labels[None, :]
    Y = np.where(positive, np.float32(1), np.float32(-1))
    with threadpool_limits(limits=1):
        step = max(1, len(X) // 10_000)
        W = _fit(X[::step], Y[:, ::step], C)  # a warm start; each fold's optimum is exact
        if counts.min() >= cv:
            folds = _stratified_folds(labels, cv)
        else:
            folds = [(slice(None), slice(None))]
        proba, sigmoid = 0, None
        for train, test in folds:
            W = _fit(X[train], Y[:, train], C, W)
            W32 = W.T.astype(np.float32)
            sigmoid = _platt(W32 @ X[test].T, positive[:, test], sigmoid)
            proba = proba + _calibrated_proba(W32 @ X.T, *sigmoid)
    with np.errstate(divide="ignore"):  # a probability that underflowed to 0 has log -inf
        log_proba = np.log(proba / len(folds))
    out = np.full((len(labels), n_classes), -np.inf)
    out[:, classes] = log_proba
    return out


def _stratified_folds(labels: np.ndarray, cv: int):
    from sklearn.model_selection import StratifiedKFold

    # No shuffling: CalibratedClassifierCV's own folds for cv=3.
    return list(StratifiedKFold(cv).split(np.zeros((len(labels), 1)), labels))


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
    Z = Y * (W.T.astype(np.float32) @ X.T)  # functional margins y·(x·w)
    busy = np.ones(W.shape[1], dtype=bool)
    for _ in range(max_iter):
        slack = np.maximum(1 - Z, 0)
        G = W - 2 * C * ((slack * Y) @ X).T.astype(np.float64)
        busy &= np.linalg.norm(G, axis=0) > rtol * g0
        if not busy.any():
            break
        S = np.zeros_like(W)
        for k in np.flatnonzero(busy):
            Xa = X[slack[k] > 0]
            S[:, k] = -np.linalg.solve(eye + 2 * C * (Xa.T @ Xa).astype(np.float64), G[:, k])
        dZ = Y * (S.T.astype(np.float32) @ X.T)
        f0 = 0.5 * (W * W).sum(0) + C * _row_squares(slack)
        slope = (G * S).sum(0)
        t = np.ones(W.shape[1])
        for _ in range(20):  # Armijo backtracking; the full step nearly always passes
            Z_new = Z + t.astype(np.float32)[:, None] * dZ
            W_new = W + t * S
            f = 0.5 * (W_new * W_new).sum(0) + C * _row_squares(np.maximum(1 - Z_new, 0))
            short = busy & (f > f0 + 1e-4 * t * slope)
            if not short.any():
                break
            t = np.where(short, t / 2, t)
        else:
            busy &= ~short  # no decrease left at float32 precision: as converged as it gets
        W, Z = W_new, Z_new
    return W


def _row_squares(A: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", A, A, dtype=np.float64)


def _platt(F: np.ndarray, positive: np.ndarray, start=None, max_iter: int = 100):
    """Platt's sigmoid p = 1 / (1 + exp(a·f + b)) per row of F (classes x items), fitted by
    Newton's method on the log loss against Platt's smoothed targets (what sklearn's sigmoid
    calibration minimises). Starts from Platt's (0, log((N- + 1) / (N+ + 1))), or from
    ``start`` (another fold's fit)."""
    F = F.astype(np.float64)
    n1 = positive.sum(1).astype(np.float64)[:, None]
    n0 = F.shape[1] - n1
    T = np.where(positive, (n1 + 1) / (n1 + 2), 1 / (n0 + 2))
    a, b = start if start is not None else (np.zeros(len(F)), np.log((n0 + 1) / (n1 + 1))[:, 0])
    for _ in range(max_iter):
        p = expit(-(a[:, None] * F + b[:, None]))
        r = p - T
        w = p * (1 - p)
        wF = w * F
        ga, gb = -np.einsum("ij,ij->i", r, F), -r.sum(1)
        haa, hab, hbb = np.einsum("ij,ij->i", wF, F) + 1e-12, wF.sum(1), w.sum(1) + 1e-12
        det = haa * hbb - hab * hab
        da, db = -(hbb * ga - hab * gb) / det, -(haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if max(np.abs(da).max(), np.abs(db).max()) < 1e-9 * max(1.0, np.abs(a).max()):
            break
    return a, b


def _calibrated_proba(F: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-class Platt probabilities (F: classes x items) normalised over classes, items x
    classes (from one row: two classes), with CalibratedClassifierCV's uniform answer where
    every class's probability is 0."""
    p = expit(-(a * F.T.astype(np.float64) + b))
    if len(F) == 1:
        return np.hstack([1 - p, p])
    total = p.sum(axis=1, keepdims=True)
    return np.divide(p, total, out=np.full_like(p, 1 / p.shape[1]), where=total > 0)
