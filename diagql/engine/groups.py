"""Group keys, in one place: the GROUP BY value of each item, the (true class, correctness)
cell that EVALUATE SAMPLERS scores per, and the order in which group keys are shown."""
from __future__ import annotations

import numpy as np

from diagql.model.profile import Profile


def group_values(group_by: str | None, profile: Profile) -> np.ndarray | None:
    """Each item's GROUP BY value (None without GROUP BY): its true class, its predicted class
    or whether the prediction is correct."""
    if group_by is None:
        return None
    return {"class": profile.labels, "predicted": profile.predictions,
            "correct": profile.correct}[group_by]


def cell_codes(labels: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Each item's (true class, correctness) cell as one int64 code: 2·class if correct,
    2·class + 1 if not, so that a class's two cells are neighbours."""
    return np.asarray(labels, dtype=np.int64) * 2 + (~np.asarray(correct, dtype=bool))


def n_cells(n_classes: int) -> int:
    """How many codes ``cell_codes`` can give for classes 0 .. n_classes - 1."""
    return 2 * n_classes


def cell_of(code) -> tuple:
    """The inverse of ``cell_codes``: (class, correct) of a code, or arrays of codes."""
    if np.ndim(code) == 0:
        return int(code) // 2, int(code) % 2 == 0
    code = np.asarray(code, dtype=np.int64)
    return code // 2, code % 2 == 0


def key_order(key) -> tuple:
    """The sort key of a group key: classes ascending, and for ``correct`` False before True.
    Booleans sort after numbers so that a mix of both (never made by one query) still sorts."""
    return isinstance(key, (bool, np.bool_)), key


def sorted_keys(keys) -> list:
    """Group keys in the order results show them."""
    return sorted(keys, key=key_order)


def shown_keys(states: dict, population: dict, approximate: bool) -> list:
    """The groups an answer shows, in order: those its pass reduced items of and, on a
    sample, every group with matching items, those it drew none of too (their counts are in
    the profile, and a group left out would read as one with no items at all)."""
    if not approximate:
        return sorted_keys(states)
    return sorted_keys(set(states) | {key for key, count in population.items() if count})
