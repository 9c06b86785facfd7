"""The selections the boundary samplers share: the paper's two-ended one (Algorithm 1: per
group, a share j of its quota from the low (outlier) end of the likelihood ratio p(own) / max
p(other), the rest from the high (exemplar) end) and maxmargin's default, which seeds every
group a query can name, takes the model's mistakes first and herds its exemplars.
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


# What random_state does for a sampler that takes each group's two ends of a fixed ratio
# (maxmargin's): another seed gives the same sample but for ties and quotas (two seeds had
# drawn the same 200 items, unsaid in SHOW SAMPLERS: sweep MM3; README.md says so).
TIES_ONLY = ("a whole number (defaults to SET seed); the items are the two ends of a ratio, "
             "so it only breaks ties and rounds quotas: another seed gives nearly the same "
             "sample")


def two_ended(groups: np.ndarray, ratio: np.ndarray, n: int, j: float,
              rng: np.random.Generator) -> np.ndarray:
    """Exactly n distinct indices: per group, round(j·k) lowest-ratio items and k − round(j·k)
    highest, where the quotas k sum to n in proportion to group size.

    The quotas come from ``allocate`` (the stratified sampler's rule: largest remainder, at least
    one item per group when n allows, never more than a group holds), so no group is ever asked
    for more than it has and the two ends never overlap. Ties in the ratio are broken at
    random: duplicated items tie, and breaking by index would favour whatever comes first in
    the data.
    """
    groups = np.asarray(groups)
    ratio = np.asarray(ratio, dtype=np.float64)
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    quota = allocate(sizes, n, rng)
    # One sort for every group: by group, then ratio ascending, then a random tie-break.
    order = np.lexsort((rng.permutation(len(ratio)), ratio, inverse))
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


def boundary_and_exemplars(latents: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                           ratio: np.ndarray, n: int, j: float,
                           rng: np.random.Generator) -> np.ndarray:
    """Exactly n distinct indices, taken in this order until n are chosen:

    1. seeds, one per group a query can name (true class × correct/incorrect): a correct
       group's most typical member (the one nearest its mean latent), an incorrect group's most
       boundary mistake; then the most boundary mistake of other non-empty (true, predicted)
       cells, most boundary first, while the seeds are fewer than round(j·n), the boundary's
       share (a 100-class model's 5,605 cells had filled a 5,000-item sample with 98%
       mistakes whatever j: the sweep SS3);
    2. boundary items, up to round(j·n) with the seeds: the model's mistakes before its correct
       items, each by lowest ratio (equal ratios in random order: duplicated items tie);
    3. exemplars: the rest, one for every group with items left, then shared among the groups
       in proportion to their size (``_exemplar_quota``), and herded within each (``herd``) so
       that the mean latent of everything the sample holds of the group tracks the group's
       mean, its boundary items included.

    With n below the number of groups, round(j·n) seeds of incorrect groups and the rest of
    correct groups (as near as the groups allow), each in the order of their most boundary
    item: the first n seeds had been the mistakes' whatever j (review RV1: 40 classes, n of 1
    to 79, all mistakes). With n at most the number of seeds, the first n seeds: every group
    before any finer cell.
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    ratio = np.asarray(ratio, dtype=np.float64)
    wrong = labels != predictions
    order = np.lexsort((rng.permutation(len(ratio)), ratio, ~wrong))
    groups = labels * 2 + wrong
    # The first item of each group (or cell) in that order is its most boundary item.
    _, first = np.unique(groups[order], return_index=True)
    seeds = order[np.sort(first)]
    for i, seed in enumerate(seeds):
        if not wrong[seed]:
            seeds[i] = herd(latents, np.flatnonzero(groups == groups[seed]), 1, rng)[0]
    if n < len(seeds):
        return _split_seeds(seeds, wrong[seeds], n, j)
    mistakes = order[wrong[order]]
    _, first = np.unique((labels * (predictions.max() + 1) + predictions)[mistakes],
                         return_index=True)
    cells = mistakes[np.sort(first)]
    room = max(round(j * n) - len(seeds), 0)
    seeds = np.concatenate([seeds, cells[~np.isin(cells, seeds)][:room]])
    if n <= len(seeds):
        return seeds[:n].astype(np.int64)
    taken = np.zeros(len(ratio), dtype=bool)
    taken[seeds] = True
    extra = order[~taken[order]][:max(round(j * n) - len(seeds), 0)]
    taken[extra] = True
    chosen = [seeds, extra]
    keys, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    free = np.bincount(inverse[~taken], minlength=len(keys))
    quota = _exemplar_quota(sizes, free, n - int(taken.sum()))
    for group, k in enumerate(quota):
        if k:
            mine = inverse == group
            chosen.append(herd(latents, np.flatnonzero(mine & ~taken), int(k), rng,
                               held=np.flatnonzero(mine & taken),
                               target=np.asarray(latents[mine], dtype=np.float64).mean(axis=0)))
    return np.concatenate(chosen).astype(np.int64)


def _split_seeds(seeds: np.ndarray, wrong: np.ndarray, n: int, j: float) -> np.ndarray:
    """n of the groups' seeds: round(j·n) incorrect groups' (fewer or more only where the
    groups of one kind run out), the rest correct groups', each kind in its seeds' order."""
    bad, good = seeds[wrong], seeds[~wrong]
    k = min(max(round(j * n), n - len(good)), len(bad))
    return np.concatenate([bad[:k], good[:n - k]]).astype(np.int64)


def _exemplar_quota(sizes: np.ndarray, free: np.ndarray, n: int) -> np.ndarray:
    """Exemplars per group, summing to n (at most free.sum()), none above what a group has
    ``free``: one for every group with a free item, then the rest in proportion to the
    groups' sizes (largest remainder). One each matters: herding a group's one exemplar toward
    its mean corrects the bias of its boundary items, and a small group counts as much as a
    large one in every query that names it (on a tiny BERT, mean cosine distance 0.03 against
    0.12 without). Deterministic: with fewer exemplars than such groups, the groups holding the
    fewest sampled items get them (ties: the larger group, then the first)."""
    quota = np.zeros(len(sizes), dtype=np.int64)
    n = min(n, int(free.sum()))
    open_ = np.flatnonzero(free > 0)
    if n < len(open_):
        held = (sizes - free)[open_]
        quota[open_[np.lexsort((open_, -sizes[open_], held))[:n]]] = 1
        return quota
    quota[open_] = 1
    n -= len(open_)
    while n > 0:
        open_ = np.flatnonzero(quota < free)
        share = n * sizes[open_] / sizes[open_].sum()
        extra = np.floor(share).astype(np.int64)
        order = np.lexsort((open_, -sizes[open_], -(share - extra)))
        extra[order[:n - int(extra.sum())]] += 1
        extra = np.minimum(extra, (free - quota)[open_])
        quota[open_] += extra
        n -= int(extra.sum())
    return quota


_HERD_CANDIDATES = 2_000  # herding picks among at most this many members of a group


def herd(latents: np.ndarray, members: np.ndarray, k: int, rng: np.random.Generator, *,
         held: np.ndarray | None = None, target: np.ndarray | None = None) -> np.ndarray:
    """k distinct members, picked one at a time so that the mean latent of the picks and the
    ``held`` items (already in the sample) tracks ``target`` (default: the members' mean):
    kernel herding with a linear kernel, each step adding the member that brings the running
    mean closest to the target. A per-neuron mean over such a set stays close to the group's.
    Large groups offer a random subset of candidates."""
    if k >= len(members):
        return members
    if target is None:
        target = np.asarray(latents[members], dtype=np.float64).mean(axis=0)
    if len(members) > max(_HERD_CANDIDATES, k):
        members = np.sort(rng.choice(members, max(_HERD_CANDIDATES, k), replace=False))
    Z = np.asarray(latents[members], dtype=np.float64)
    held = np.empty(0, dtype=np.int64) if held is None else np.asarray(held, dtype=np.int64)
    total = np.asarray(latents[held], dtype=np.float64).sum(axis=0) + np.zeros_like(target)
    # |(total + z)/t - target|² = (|z|² + 2 z·(total - t·target))/t² + terms free of z, t the
    # count after the step; a member once picked gets an infinite |z|² so it cannot be picked
    # again.
    penalty = (Z * Z).sum(axis=1)
    picked = np.empty(k, dtype=np.int64)
    for step in range(k):
        t = len(held) + step + 1
        best = int(np.argmin(penalty + Z @ (2 * (total - t * target))))
        penalty[best] = np.inf
        picked[step] = best
        total += Z[best]
    return members[picked]
