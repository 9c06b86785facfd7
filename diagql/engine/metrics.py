"""How far an approximate answer is from the exact one (the paper's S1, S2 and S3 metrics).

An empty answer against a non-empty exact one scores precision 0 and distances 1, as the
paper specifies for a sample that holds no matching item.
"""
from __future__ import annotations

import numpy as np


def precision(approx_top: np.ndarray, exact_top: np.ndarray) -> float:
    """|top-k(sample) ∩ top-k(full)| / k."""
    k = len(exact_top)
    if k == 0:
        return 1.0
    return len(set(np.asarray(approx_top).tolist()) & set(np.asarray(exact_top).tolist())) / k


def cosine_distance(approx: np.ndarray | None, exact: np.ndarray) -> float:
    """1 − cos(exact, approx); two zero vectors agree, a zero against a non-zero is 1."""
    if approx is None or len(approx) == 0:
        return 1.0
    a, b = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0 if na == nb else 1.0
    return float(np.clip(1.0 - a @ b / (na * nb), 0.0, 2.0))


def js_distance(approx: np.ndarray | None, exact: np.ndarray) -> float:
    """Jensen-Shannon distance in base 2 (the square root of the divergence), in [0, 1]."""
    if approx is None or len(approx) == 0 or not np.any(approx):
        return 1.0
    p = np.asarray(approx, np.float64)
    q = np.asarray(exact, np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x):
        mask = (x > 0) & (m > 0)  # m underflows to 0 only beside a denormal x
        return float(np.sum(x[mask] * np.log2(x[mask] / m[mask])))

    return float(np.sqrt(max((kl(p) + kl(q)) / 2, 0.0)))


# Each aggregate is judged by the metric the paper uses for its query set.
METRIC_OF = {"topk": "precision", "avg": "cosine_distance", "argmax": "js_distance"}
