"""How far an approximate answer is from the exact one: the paper's S1, S2 and S3 metrics, each
computed row-wise in one place, and the one table of their names.

An empty answer against a non-empty exact one scores precision 0 and distances 1, as the
paper specifies for a sample that holds no matching item (``Metric.worst``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def precisions(approx_top: np.ndarray, exact_top: np.ndarray) -> np.ndarray:
    """Row-wise |top-k(sample) ∩ top-k(full)| / k of (rows, k) neuron indices, each row of
    distinct neurons; an empty exact top (k = 0) scores 1."""
    a = np.atleast_2d(np.asarray(approx_top, dtype=np.int64))
    e = np.atleast_2d(np.asarray(exact_top, dtype=np.int64))
    rows, k = e.shape
    if k == 0:
        return np.ones(rows)
    if a.size == 0:
        return np.zeros(rows)
    # One id per (row, neuron), so that a single sorted isin compares each row with its own
    # exact top: O(rows·k·log) where comparing every pair would be O(rows·k²).
    width = int(max(a.max(), e.max())) + 1
    offset = np.arange(rows, dtype=np.int64)[:, None] * width
    return np.isin(a + offset, e + offset).sum(axis=1) / k


def cosine_distances(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Row-wise 1 − cos in [0, 2]; two zero vectors agree (0), a zero against a non-zero is 1."""
    a = np.atleast_2d(np.asarray(approx, dtype=np.float64))
    b = np.atleast_2d(np.asarray(exact, dtype=np.float64))
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.clip(1.0 - np.einsum("ij,ij->i", a, b) / (na * nb), 0.0, 2.0)
    zero = (na == 0) | (nb == 0)
    out[zero] = np.where(na[zero] == nb[zero], 0.0, 1.0)
    return out


def js_distances(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon distance in base 2 (the square root of the divergence), in
    [0, 1], of two non-negative histograms (counts or shares: each row is normalised). An empty
    histogram against a non-empty one is 1, two empty ones agree (0)."""
    a = np.atleast_2d(np.asarray(approx, dtype=np.float64))
    b = np.atleast_2d(np.asarray(exact, dtype=np.float64))
    sa, sb = a.sum(axis=1, keepdims=True), b.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p, q = a / sa, b / sb
        m = (p + q) / 2
        # m underflows to 0 only beside a denormal p or q, whose term is 0 anyway.
        kl_p = np.where((p > 0) & (m > 0), p * np.log2(p / m), 0.0).sum(axis=1)
        kl_q = np.where((q > 0) & (m > 0), q * np.log2(q / m), 0.0).sum(axis=1)
        out = np.sqrt(np.clip((kl_p + kl_q) / 2, 0.0, 1.0))
    empty = (sa[:, 0] == 0) | (sb[:, 0] == 0)
    out[empty] = np.where(sa[empty, 0] == sb[empty, 0], 0.0, 1.0)
    return out


@dataclass(frozen=True)
class Metric:
    """One of the paper's metrics: its names wherever they are shown, the aggregate it judges
    and its row-wise computation."""

    key: str  # in Result.metrics and the JSON: "precision"
    label: str  # in tables and lines: "JS distance"
    name: str  # in figure titles: "Jensen-Shannon distance"
    paper: str  # the paper's name, EVALUATE's column: "S3"
    higher_is_better: bool
    aggregate: str  # the query kind it judges: "argmax"
    compares: str  # the Result field it compares: "neurons" (a top-k) or "values"
    rows: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (approx, exact) rows -> one score each

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    @property
    def worst(self) -> float:
        """The score of an empty answer (a sample without a matching item)."""
        return 0.0 if self.higher_is_better else 1.0

    @property
    def estimate_key(self) -> str:
        """The key of its expected value in an estimate's JSON."""
        return f"expected_{self.key}"

    def score(self, approx: np.ndarray | None, exact: np.ndarray) -> float:
        """One answer's score: the one-row case of ``rows``."""
        if approx is None or len(approx) == 0:
            return self.worst
        return float(self.rows(np.asarray(approx)[None], np.asarray(exact)[None])[0])


PRECISION = Metric("precision", "precision", "top-k precision", "S1", True, "topk", "neurons",
                   precisions)
COSINE = Metric("cosine_distance", "cosine distance", "cosine distance", "S2", False, "avg",
                "values", cosine_distances)
JS = Metric("js_distance", "JS distance", "Jensen-Shannon distance", "S3", False, "argmax",
            "values", js_distances)

METRICS = (PRECISION, COSINE, JS)
BY_KEY = {m.key: m for m in METRICS}
# Each aggregate is judged by the metric the paper uses for its query set.
OF_AGGREGATE = {m.aggregate: m for m in METRICS}
