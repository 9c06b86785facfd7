"""The two-ended selection the boundary samplers share (the paper's Algorithm 1).

Items are grouped (by cluster or by class), each group is sorted by its likelihood ratio
p(own) / max p(other), and a share j of each group's quota comes from the low (outlier) end,
the rest from the high (exemplar) end.
"""
from __future__ import annotations

import numbers

import numpy as np

from diagql.errors import BindError

from .stratified import allocate


def log_likelihood_ratio(log_proba: np.ndarray, own: np.ndarray) -> np.ndarray:
    """log p(own) − max over other columns of log p, per row: the log of the likelihood ratio
    (0 on the boundary, large for exemplars), computed without underflow.

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


def boundary_and_exemplars(latents: np.ndarray, groups: np.ndarray, cells: np.ndarray,
                           ratio: np.ndarray, n: int, j: float,
                           rng: np.random.Generator) -> np.ndarray:
    """Exactly n distinct indices: the lowest-ratio item of every cell, then the lowest ratios
    overall up to round(j·n), then per group (quota proportional to its size) exemplars herded
    from its remaining items so that their mean latent matches the group's (``herd``). With n
    at most the number of cells: the n lowest-ratio cell representatives."""
    ratio = np.asarray(ratio, dtype=np.float64)
    by_ratio = np.lexsort((np.arange(len(ratio)), ratio))
    # The first item of each cell in ratio order is that cell's most boundary item.
    _, first = np.unique(np.asarray(cells)[by_ratio], return_index=True)
    seeds = by_ratio[np.sort(first)]
    if n <= len(seeds):
        return seeds[:n].astype(np.int64)
    taken = np.zeros(len(ratio), dtype=bool)
    taken[seeds] = True
    extra = by_ratio[~taken[by_ratio]][:max(round(j * n) - len(seeds), 0)]
    taken[extra] = True
    chosen = [seeds, extra]
    keys, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    free = np.bincount(inverse[~taken], minlength=len(keys))
    quota = _allocate_capped(sizes, free, n - int(taken.sum()), rng)
    for group, k in enumerate(quota):
        if k:
            members = np.flatnonzero((inverse == group) & ~taken)
            chosen.append(herd(latents, members, int(k), rng))
    return np.concatenate(chosen).astype(np.int64)


def _allocate_capped(sizes: np.ndarray, free: np.ndarray, n: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Quotas proportional to ``sizes`` summing to n, none above what a group has ``free``."""
    quota = np.zeros(len(sizes), dtype=np.int64)
    while n > 0 and (quota < free).any():
        open_ = quota < free
        share = allocate(sizes[open_], min(n, int((free - quota)[open_].sum())), rng)
        share = np.minimum(share, (free - quota)[open_])
        quota[open_] += share
        n -= int(share.sum())
    return quota


_HERD_CANDIDATES = 2_000  # herding picks among at most this many members of a group


def herd(latents: np.ndarray, members: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct members whose mean latent tracks the group's: kernel herding with a linear
    kernel, which at each step adds the member that brings the running mean closest to the
    group mean. A per-neuron mean over such a set stays close to the group's. Large groups
    offer a random subset of candidates (the target stays the mean of all members)."""
    if k >= len(members):
        return members
    target = np.asarray(latents[members], dtype=np.float64).mean(axis=0)
    if len(members) > max(_HERD_CANDIDATES, k):
        members = np.sort(rng.choice(members, max(_HERD_CANDIDATES, k), replace=False))
    Z = np.asarray(latents[members], dtype=np.float64)
    # |(total + z)/t - target|² = (|z|² + 2 z·(total - t·target))/t² + terms free of z; a
    # member once picked gets an infinite |z|² so it cannot be picked again.
    penalty = (Z * Z).sum(axis=1)
    total = np.zeros_like(target)
    picked = np.empty(k, dtype=np.int64)
    for t in range(1, k + 1):
        best = int(np.argmin(penalty + Z @ (2 * (total - t * target))))
        penalty[best] = np.inf
        picked[t - 1] = best
        total += Z[best]
    return members[picked]
