"""The space the latent-space samplers work in: the latents standardised per dimension and, when
they are wider than a sampler needs, projected on their leading principal components."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

# A dimension whose spread is below this share of its own magnitude (or of the widest spread)
# holds only float32 rounding: standardising it would blow that noise up to unit variance.
_CONSTANT = 1e-6
# The standardisation and the principal axes are estimated from at most this many items (every
# k-th one): a 768-dim covariance from all of 100,000 items costs more than the rest of a draw.
_PCA_ITEMS = 10_000
_RANK_TOL = 1e-9  # an axis with less of the leading axis's variance than this has none
_BLOCK_BYTES = 1 << 20  # float64 bytes per block of rows: no copy of all the latents, and one
# block stays in a core's cache through its standardisation and product


_CONTROLLER: list[ThreadpoolController] = []


def one_blas_thread():
    """Limit BLAS and OpenMP to one thread, as ``threadpool_limits(limits=1)`` does, with the
    libraries found once per process: finding them again cost 1.5-15 ms per call, twice in
    every sample query's planning (engine/covariates.py)."""
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1)


_RATE: list[float] = []


def product_rate() -> float:
    """Multiply-adds per second of a float32 Gram product on one BLAS thread (the samplers'
    kind of work), measured once per process (about 2 ms): what a draw's cost is scaled by."""
    if not _RATE:
        X = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
        best = np.inf
        with one_blas_thread():
            for _ in range(5):
                started = time.perf_counter()
                X.T @ X
                best = min(best, time.perf_counter() - started)
        _RATE.append(X.shape[0] * X.shape[1] ** 2 / max(best, 1e-9))
    return _RATE[0]


@dataclass(frozen=True)
class Space:
    """An affine map of latent rows: ``(x[keep] - mean) / scale``, then onto ``axes`` if any."""

    keep: np.ndarray  # the dimensions used (the others are constant)
    mean: np.ndarray
    scale: np.ndarray
    axes: np.ndarray | None  # len(keep) x k orthonormal columns, or None: no projection

    @property
    def dims(self) -> int:
        return len(self.keep) if self.axes is None else self.axes.shape[1]

    def __call__(self, latents: np.ndarray, dtype=np.float64) -> np.ndarray:
        X = _rows(latents)
        if self.axes is not None and dtype == np.float32:
            # One product over the raw rows with the standardisation folded into the basis,
            # constant dimensions weighted 0: no standardised copy of the latents is made.
            basis = np.zeros((X.shape[1], self.dims), dtype=np.float32)
            basis[self.keep] = self.axes / self.scale[:, None]
            offset = ((self.mean / self.scale) @ self.axes).astype(np.float32)
            with one_blas_thread():
                return X.astype(np.float32, copy=False) @ basis - offset
        out = np.empty((len(X), self.dims), dtype=dtype)
        rows = max(1, _BLOCK_BYTES // (8 * max(len(self.keep), 1)))
        # One BLAS thread, as for the axes: these products are small, and a second thread
        # waiting on a busy core made the projection 20x slower (0.38 s for 50,000 x 84 against
        # 0.017 s, on the shared 2-core machine). Blocks, threads and in-place steps leave
        # every value as it was (the same operations on each row).
        with one_blas_thread():
            for start in range(0, len(X), rows):
                block = X[start:start + rows][:, self.keep].astype(np.float64)
                block -= self.mean
                block /= self.scale
                out[start:start + rows] = block if self.axes is None else block @ self.axes
        return out


def fit_space(latents: np.ndarray, dims: int | None, *, standardise: bool = True,
              labels: np.ndarray | None = None) -> Space:
    """The map to the latents' space: centred and, if ``standardise``, scaled to unit variance
    per dimension with (near-)constant dimensions left out; projected on the ``dims`` leading
    principal axes when more dimensions than that remain (``dims=None``: never), and on the
    directions of the class means as well when ``labels`` are given.

    Standardising makes a sampler indifferent to the latents' units: a tanh-saturated pooled
    output whose every dimension varies by 1e-3 is as usable as a ReLU layer's. The axes are
    orthonormal and unwhitened, so the projection is a rotation onto a subspace: distances and
    a linear SVM's optimum (its L2 penalty is rotation invariant) are unchanged wherever the
    latents' spread lies within it. The class means keep what separates the classes when it
    lies in low-variance directions (on synthetic 768-dim latents whose classes differ in every
    dimension, they doubled the model's mistakes an SVM in 64 components finds). Mean, spread
    and axes come from every k-th item, at most ``_PCA_ITEMS`` of them (all items below that).
    """
    X = _rows(latents)
    step = -(-len(X) // _PCA_ITEMS)
    if standardise:
        mean, scale = _moments(X, step)
        keep = np.flatnonzero(scale > _CONSTANT * np.maximum(np.abs(mean), scale.max(initial=0)))
    else:
        mean, scale = X.mean(axis=0, dtype=np.float64), np.ones(X.shape[1])
        keep = np.arange(X.shape[1])
    mean, scale = mean[keep], scale[keep]
    axes = None
    if dims is not None and len(keep) > dims:
        S = (X[::step][:, keep] - mean) / scale
        axes = _principal_axes(S, dims)
        if labels is not None:
            axes = _with_class_means(axes, S, np.asarray(labels)[::step], dims)
    return Space(keep, mean, scale, axes)


def _with_class_means(axes: np.ndarray, S: np.ndarray, labels: np.ndarray,
                      dims: int) -> np.ndarray:
    """``axes`` extended by an orthonormal basis of the class means of the rows ``S`` (their
    leading ``dims`` directions when there are more classes than that) beyond what ``axes``
    already span."""
    means = np.stack([S[labels == c].mean(axis=0) for c in np.unique(labels)], axis=1)
    means -= axes @ (axes.T @ means)
    if means.shape[1] > dims:
        means = np.linalg.svd(means, full_matrices=False)[0][:, :dims]
    q, r = np.linalg.qr(means)
    size = np.abs(np.diag(r))
    # A mean already within the principal axes leaves only rounding behind.
    new = size > 1e-8 * max(size.max(initial=0.0), np.sqrt((S * S).sum() / len(S)))
    return np.hstack([axes, q[:, new]])


def reduced_space(latents: np.ndarray, dims: int | None,
                  labels: np.ndarray | None = None) -> np.ndarray:
    """The latents in their standardised space (``fit_space``) as float32 rows."""
    return fit_space(latents, dims, labels=labels)(latents, np.float32)


def principal_components(latents: np.ndarray, dims: int) -> np.ndarray:
    """The latents, centred (not scaled), projected on their leading ``dims`` principal axes
    (all of them when ``dims`` is the width or more), each signed so that its largest-magnitude
    loading is positive; axes from up to ``_PCA_ITEMS`` items like ``fit_space``'s."""
    X = _rows(latents)
    mean = X.mean(axis=0, dtype=np.float64)
    step = -(-len(X) // _PCA_ITEMS)
    axes = _principal_axes(X[::step] - mean, dims, keep_all=True)
    return Space(np.arange(X.shape[1]), mean, np.ones(X.shape[1]), axes)(X)


def _rows(latents: np.ndarray) -> np.ndarray:
    X = np.asarray(latents).reshape(len(latents), -1)
    return X if np.issubdtype(X.dtype, np.floating) else X.astype(np.float64)


def _moments(X: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation from every ``step``-th item, except for the
    dimensions that do not vary there: those are measured on every item, so that a feature
    only a few items use is not taken for a constant. In float64: a saturated tanh dimension
    at 0.994 ± 0.001 keeps its variance."""
    S = X[::step].astype(np.float64)
    mean, scale = S.mean(axis=0), S.std(axis=0)
    flat = np.flatnonzero(scale <= _CONSTANT * np.maximum(np.abs(mean), scale.max(initial=0)))
    if step > 1 and len(flat):
        rest = X[:, flat].astype(np.float64)
        mean[flat], scale[flat] = rest.mean(axis=0), rest.std(axis=0)
    return mean, scale


def _principal_axes(S: np.ndarray, dims: int, keep_all: bool = False) -> np.ndarray:
    """Up to ``dims`` leading principal axes (d x k orthonormal columns) of centred rows ``S``,
    each signed so that its largest-magnitude entry is positive (the eigensolver's signs are
    arbitrary). Axes of no variance are left out (rows of rank r < dims give r axes) unless
    ``keep_all``."""
    import scipy.linalg  # here, not at import: scipy costs every new process 0.15 s

    S = np.asarray(S, dtype=np.float64)
    gram = S.shape[1] > S.shape[0]  # fewer items than dimensions: the items' Gram matrix
    with one_blas_thread():
        M = S @ S.T if gram else S.T @ S
        k = min(dims, len(M))
        values, vectors = scipy.linalg.eigh(M, subset_by_index=(len(M) - k, len(M) - 1))
    values, vectors = values[::-1], vectors[:, ::-1]
    if not keep_all or gram:
        real = values > _RANK_TOL * values[0] if k and values[0] > 0 else values > 0
        values, vectors = values[real], vectors[:, real]
    # S = U s Vᵀ: the Gram matrix's eigenvectors are U, and the axes V = Sᵀ U / s.
    axes = S.T @ (vectors / np.sqrt(values)) if gram else vectors
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])
    return axes
