"""A query's answer as a table: a row per neuron (per group and rank), its value, its estimate
and the exact value beside it, built for the width it is drawn at (results/render.py draws
the rest of the answer around it).

Every ``result`` here is a Result (results/result.py), unannotated as in render.py.
"""
from __future__ import annotations

import functools

from rich.text import Text

from diagql.results.formats import bar, cell_text, group_label, none_sampled, number
from diagql.results.tables import FittingTable, PlainTable

GROUPS_SHOWN = 50  # groups a table draws at least (max_rows, when more)


def query_table(result, max_rows: int) -> FittingTable:
    """A query's table, built for the width it is drawn at. Where it would not fit whole, it
    has no bars (a number is worth more than its bar: on a 40-column terminal the bars' 12
    columns had cut the means to "0.…"), then no column of its own for "in exact top-k" (its
    ✓ or ✗ beside the exact value), then no rank (the rows' order is theirs); what is still
    too wide folds its labels onto more lines."""
    return FittingTable(
        functools.partial(_query_table, result, max_rows, bars, marks, ranks)
        for bars, marks, ranks in ((True, True, True), (False, True, True),
                                   (False, False, True), (False, False, False)))


def _query_table(result, max_rows: int, bars: bool = True, marks: bool = True,
                 ranks: bool = True) -> PlainTable:
    """``bars``: a column of bars; ``marks``: a column for "in exact top-k" (else its mark
    follows the exact value); ``ranks``: TOPK's rank column."""
    table = PlainTable()
    groups = result.groups
    provenance = result.provenance
    group_by = provenance.group_by if provenance is not None else None
    if groups is not None:
        table.add_column(group_by or "group", style="magenta", no_wrap=True)
    # On a narrow terminal the labels (folded onto more lines) and the bars (cropped) give up
    # their width; the numbers and group keys, which nothing else shows, keep theirs. Rich
    # narrows the widest wrapable column first and, when those cannot give enough, every
    # column alike: a no-wrap label column with its "… 188 more" row had kept 20 columns of
    # padding while the means read "0.…" and the group keys vanished.
    if result.kind == "topk" and ranks:
        table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("channel" if result.unit == "channels" else "neuron", style="cyan",
                     overflow="fold")
    value_name = {"topk": provenance.order if provenance is not None else "value",
                  "avg": "mean", "argmax": "share"}[result.kind]
    table.add_column(value_name, justify="right", no_wrap=True)
    estimate = _reliable_estimate(result)
    if estimate is not None:
        table.add_column("P(top-k)" if estimate.p_in_topk is not None else f"±{estimate.level:.0%}",
                         justify="right", no_wrap=True)
    if bars:
        table.add_column("", overflow="crop")
    with_exact = result.baseline is not None or (
        groups is not None and any(g.baseline is not None for g in groups.values()))
    if with_exact:
        table.add_column("exact", justify="right", no_wrap=True)
        if result.kind == "topk" and marks:
            table.add_column("in exact top-k", justify="center")
    sections = list(groups.items()) if groups is not None else [(None, result)]
    # A GROUP BY over thousands of classes had drawn every group (9,208: 24 s and 4.4 M
    # characters, for a 0.6 s query); the rest are a line, and in CSV, JSON and .groups.
    hidden = len(sections) - max(max_rows, GROUPS_SHOWN)
    if hidden > 0:
        sections = sections[:max(max_rows, GROUPS_SHOWN)]
        table.caption = Text(f"… {hidden:,} more groups (in --format csv and result.groups)")
    for i, (key, part) in enumerate(sections):
        if i:
            table.add_section()
        if groups is not None:
            key = group_label(key, group_by, result.class_names)
        _add_rows(table, part, key, groups is not None, with_exact, max_rows,
                  estimate is not None, bars, marks, ranks)
    return table


def _add_exact_rows(table, exact, grouped: bool, max_rows: int, shown_estimate: bool,
                    bars: bool, ranks: bool) -> None:
    """Where the sample holds none of a group's matching items, WITH BASELINE's exact answer
    alone, the largest first (its column had been empty, the answer computed)."""
    import numpy as np  # loaded with the first result, not with this module

    values = exact.values
    order = range(len(values)) if exact.kind == "topk" else \
        np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable").tolist()
    for j in list(order)[:max_rows]:
        cells = [""] if grouped else []
        if exact.kind == "topk" and ranks:
            cells.append(str(j + 1))
        cells += [exact.labels[j], ""] + ([""] if shown_estimate else []) + \
            ([""] if bars else []) + [number(values[j])]
        table.add_row(*cells)


def _add_rows(table, part, key, grouped: bool, with_exact: bool, max_rows: int,
              shown_estimate: bool, bars: bool = True, marks: bool = True,
              ranks: bool = True) -> None:
    if part.n_items == 0 and not len(part.values):  # an ARGMAX counted from the profile has
        # values though it sampled no item
        population = part.estimate.population if part.estimate is not None else None
        # In the label column, which folds (a no-wrap value column had held it whole).
        cells = ([cell_text(key)] if grouped else []) + ([""] if part.kind == "topk" and ranks
                                                        else []) + [
            none_sampled(population) if population else "no matching items in the sample"]
        table.add_row(*cells)
        exact = part.baseline if with_exact else None
        if exact is not None and exact.n_items and len(exact.values):
            _add_exact_rows(table, exact, grouped, max_rows, shown_estimate, bars, ranks)
        return
    values = part.values
    top = float(abs(values).max()) if len(values) else 0.0
    exact = part.baseline if with_exact else None
    exact_set = set(exact.neurons.tolist()) if exact is not None else None
    shown = min(len(values), max_rows)
    order = range(shown)
    if len(values) > shown and part.kind in ("avg", "argmax"):
        import numpy as np  # loaded with the first result, not with this module

        # A wide layer cut to its first neurons by index showed mostly its silent ones: the
        # largest values are shown instead, largest first (--format csv lists every neuron).
        by_value = -np.nan_to_num(values, nan=-np.inf)
        # An ARGMAX beside its exact answer: equal shares (a sample's many zeros) ordered by
        # the exact ones, and a neuron that wins for no sampled item shown where it wins for
        # some matching item (the hidden rows had won 37% of them: sweep SS7).
        wins = _exact_shares(exact, part.neurons) \
            if part.kind == "argmax" and exact is not None and exact.n_items else None
        order = (np.argsort(by_value, kind="stable") if wins is None else
                 np.lexsort((-wins, by_value)))[:shown].tolist()
        if part.kind == "argmax":  # a neuron that wins for no item is no row worth reading
            order = [j for j in order if not values[j] == 0 or
                     (wins is not None and wins[j] > 0)] or order[:1]
    for row, j in enumerate(order):
        neuron = int(part.neurons[j])
        cells = [cell_text(key) if row == 0 else ""] if grouped else []
        if part.kind == "topk" and ranks:
            cells.append(str(j + 1))
        cells += [part.labels[j], number(values[j])]
        if shown_estimate:
            cells.append(_estimate_cell(part.estimate, j, values[j]))
        if bars:
            cells.append(bar(values[j], top))
        if with_exact:
            value = exact.value_of(neuron) if exact is not None and exact.n_items else None
            mark = ("✓" if neuron in exact_set else "✗") \
                if part.kind == "topk" and exact_set is not None else ""
            shown_value = number(value) if value is not None else ""
            cells.append(shown_value if marks else f"{shown_value} {mark}".strip())
            if part.kind == "topk" and marks:
                cells.append(mark)
        table.add_row(*cells)
    if len(values) > shown:
        cells = [""] if grouped else []
        if part.kind == "topk" and ranks:
            cells.append("")
        which = "" if part.kind == "topk" else \
            f" (the {len(order):,} largest shown, largest first)"
        if len(order) < shown:
            # An ARGMAX counted from every item's winner (the profile's) is no sample's.
            sampled = " sampled" if part.approximate and not (
                part.estimate is not None and part.estimate.exact) else ""
            which = f" ({part.unit} that win for no{sampled} item: the others)"
        cells.append(Text(f"… {len(values) - len(order):,} more{which}", style="dim"))
        table.add_row(*cells)


def _exact_shares(exact, neurons):
    """The exact answer's value of each of ``neurons`` (0 for one it does not hold), in one
    lookup: ``value_of`` per neuron scans the answer's neurons each time, quadratic in a wide
    layer's."""
    import numpy as np

    if exact.dense is not None:
        return np.asarray(exact.dense, dtype=np.float64)[np.asarray(neurons)]
    held = dict(zip(np.asarray(exact.neurons).tolist(), np.asarray(exact.values).tolist()))
    return np.array([held.get(n, 0.0) for n in np.asarray(neurons).tolist()], dtype=np.float64)


def _reliable_estimate(result):
    """The first estimate shown (of the groups', the first reliable one), None if none is."""
    parts = result.groups.values() if result.groups is not None else [result]
    return next((p.estimate for p in parts if p.estimate is not None and p.estimate.reliable),
                None)


def _estimate_cell(estimate, j: int, value: float) -> str:
    if estimate is None or not estimate.reliable:
        return ""
    if estimate.p_in_topk is not None:
        return f"{estimate.p_in_topk[j]:.2f}"
    low, high = float(estimate.ci_low[j]), float(estimate.ci_high[j])
    if estimate.exact:  # computed from every matching item's held row: float32 rounding only
        return "±" + number(0.0)
    half = (high - low) / 2
    if abs((low + high) / 2 - float(value)) > 1e-9 * max(abs(half), abs(float(value)), 1e-300):
        # Cut by the range of the layer's module (a ReLU's mean is not negative): its ends.
        return f"[{number(low)}, {number(high)}]"
    return "±" + number(half)
