"""Exact answers from materialised activations, for benchmarks/calibration.py: every item's
output of a layer, and the top-k, mean and argmax histogram of each (layer, true class,
correctness) combination. It holds a layer for every item: fine for the demo, not for big
layers (which is why it is not part of the package).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diagql.engine.aggregates import rank
from diagql.engine.executor import Collector
from diagql.engine.groups import cell_codes, cell_of
from diagql.model.views import View


@dataclass(frozen=True)
class Combination:
    layer: str
    label: int
    correct: bool
    items: np.ndarray  # all matching items of the data set


@dataclass
class LayerTruth:
    """A layer's activations for every item (float32) and their per-item argmax."""

    activations: np.ndarray
    winners: np.ndarray


def layer_truth(conn, layer: str) -> LayerTruth:
    """One pass over every item, keeping the layer's flattened output (float32)."""
    collector = Collector(View(conn.catalog[layer]), np.arange(len(conn.source)),
                          np.dtype(np.float32))
    conn.runner().run([collector], f"every item's {layer}")
    rows = np.concatenate([chunk for _, chunk in collector.chunks])  # its chunks, in item order
    return LayerTruth(rows, rows.argmax(axis=1))


def combinations(conn, layers: list[str]) -> list[Combination]:
    """Every layer × (class, correctness) cell with at least one item, cells in code order."""
    profile = conn.profile
    codes = cell_codes(profile.labels, profile.correct)
    cells = np.unique(codes)
    combos = []
    for layer in layers:
        for code in cells.tolist():
            label, correct = cell_of(code)
            combos.append(Combination(layer, label, correct, np.flatnonzero(codes == code)))
    return combos


def exact_answers(combos, truths, k: int) -> dict:
    """id(combination) -> (its top-k neurons by mean, its mean, its argmax distribution)."""
    answers = {}
    for combo in combos:
        truth = truths[combo.layer]
        mean = truth.activations[combo.items].astype(np.float64).mean(axis=0)
        hist = np.bincount(truth.winners[combo.items], minlength=len(mean)).astype(np.float64)
        answers[id(combo)] = (rank(mean, k), mean, hist / hist.sum())
    return answers
