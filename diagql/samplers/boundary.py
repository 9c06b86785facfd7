"""The two-ended selection the boundary samplers share (the paper's Algorithm 1).

Items are grouped (by cluster or by class), each group is sorted by its likelihood ratio
p(own) / max p(other), and a share j of each group's quota comes from the low (outlier) end,
the rest from the high (exemplar) end.
"""
from __future__ import annotations

import numbers

import numpy as np

from ..errors import BindError
from .stratified import allocate

# Floor for the denominator of the ratio: a rival probability of exactly 0 (underflow) would
# otherwise divide by zero; every item so confident compares equal, and the index breaks the tie.
_TINY = 1e-300


def likelihood_ratio(proba: np.ndarray, own: np.ndarray) -> np.ndarray:
    """p(own) / max over other columns of p, per row; 1 on the boundary, large for exemplars."""
    proba = np.asarray(proba, dtype=np.float64)
    rows = np.arange(len(proba))
    rival = proba.copy()
    rival[rows, own] = -np.inf
    rival = rival.max(axis=1) if proba.shape[1] > 1 else np.zeros(len(proba))
    return proba[rows, own] / np.maximum(rival, _TINY)


def log_likelihood_ratio(log_proba: np.ndarray, own: np.ndarray) -> np.ndarray:
    """log p(own) - max over others of log p: the log of ``likelihood_ratio``, without underflow.

    ``log_proba`` may be unnormalised (a mixture's weighted log densities): the normaliser
    cancels. Far from every boundary the probabilities underflow to 0 while these stay ordered.
    """
    log_proba = np.asarray(log_proba, dtype=np.float64)
    rows = np.arange(len(log_proba))
    rival = log_proba.copy()
    rival[rows, own] = -np.inf
    return log_proba[rows, own] - rival.max(axis=1)


def two_ended(groups: np.ndarray, ratio: np.ndarray, n: int, j: float,
              rng: np.random.Generator) -> np.ndarray:
    """Exactly n distinct indices: per group, round(j·k) lowest-ratio items and k − round(j·k)
    highest, where the quotas k sum to n in proportion to group size.

    The quotas come from ``allocate`` (the stratified sampler's rule: largest remainder, at least
    one item per group when n allows, never more than a group holds), so no group is ever asked
    for more than it has and the two ends never overlap. Ties in the ratio go by item index.
    ``rng`` is only used when n is smaller than the number of groups.
    """
    groups = np.asarray(groups)
    ratio = np.asarray(ratio, dtype=np.float64)
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    quota = allocate(sizes, n, rng)
    # One sort for every group: by group, then ratio ascending, then index.
    order = np.lexsort((np.arange(len(ratio)), ratio, inverse))
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    chosen = []
    for start, size, k in zip(starts, sizes, quota):
        low = round(float(j) * int(k))  # Python's round: half to even, as in round(j·k)
        members = order[start:start + size]
        chosen.append(members[:low])
        chosen.append(members[size - (k - low):])
    return np.concatenate(chosen).astype(np.int64)


def check_fraction(value, name: str) -> None:
    """A tuning factor such as j: a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise BindError(f"{name} must be a number in [0, 1], not {value!r}", param=name)
