"""SIMILARITY layer ACROSS CHECKPOINTS: each checkpoint's layer against the final model's over
the matching items (per group with GROUP BY), one checkpoint's weights loaded at a time, the
values as a table of checkpoints against groups and their curves (docs/ARCHITECTURE.md,
"Similarity")."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from diagql.errors import BindError
from diagql.language import ast
from diagql.results.heatmap import estimate_line
from diagql.results.result import Result
from diagql.session.across import across_checkpoints, checkpoint_names, family


def similarity_across(conn, statement: ast.Similarity, answer: Callable) -> Result:
    """``answer(conn, s)`` answers ``s``, a two-layer SIMILARITY (the checkpoint's layer, the
    final model's): once per model of the layer's checkpoint family, the final model last
    (whose value with itself is 1)."""
    (layer,) = statement.layers
    entry, ref = conn.resolve(layer)
    members = family(conn, entry)
    finals = [member.name for member in members if not member.is_checkpoint]
    if members and not finals:
        raise BindError(f"the checkpoints of {entry.name!r} have no final model to compare with")
    final = finals[0] if finals else None

    def rebind(s: ast.Similarity, name: str) -> ast.Similarity:
        # Each pass runs the final model and one checkpoint (the slot's copy): two modules.
        pair = (replace(ref, model=name), replace(ref, model=final))
        return replace(s, layers=pair, tokens=s.tokens * 2, across=None, plot=None)

    def one(conn, s: ast.Similarity) -> Result:  # named with its reduction (TOKEN 0: MM2)
        tokens = s.tokens[0] if s.tokens else None
        return _as_table(answer(conn, s), s.layers[0].text() +
                         ("" if tokens is None else f" {tokens.text()}"))

    return across_checkpoints(conn, statement, one, layer=layer, rebind=rebind)


def explain_across(conn, statement: ast.Similarity) -> tuple[str, str]:
    """EXPLAIN's row for ACROSS CHECKPOINTS: what runs once per checkpoint."""
    (layer,) = statement.layers
    entry, ref = conn.resolve(layer)
    names = checkpoint_names(conn, entry, statement.across.span or layer.span)
    detail = (f"once per model of {', '.join(names)}: its {ref.text()} against "
              f"{names[-1]}'s, both in one pass, one checkpoint's weights loaded at a time"
              f"{own_filter(statement, entry.name)}")
    return "across", detail


def own_filter(statement, planned_on: str) -> str:
    """What EXPLAIN of ACROSS CHECKPOINTS says of a WHERE: each model reads it on its own
    predictions, where the filter row counts the items of the model the plan above is made
    on, ``planned_on`` (sweep SY4)."""
    if statement.where is None:
        return ""
    return (f"; each reads its WHERE on its own profile (its own predictions), the filter "
            f"above counting {planned_on}'s items")


def _as_table(result: Result, layer: str) -> Result:
    """One checkpoint's CKA per group (or of the whole), as rows keyed by the group alone so
    that every checkpoint's answer lines up in results/across.py."""
    group_by = result.provenance.group_by if result.provenance is not None else None
    parts = result.groups.items() if result.groups is not None else [(layer, result)]
    rows = [(key, _cka(part)) for key, part in parts]
    columns = [group_by or "layer", "cka"]
    if any(_interval(part) is not None for _, part in parts):  # a reliable sample's
        columns += ["ci_low", "ci_high"]
        rows = [(key, value, *(_interval(part) or (math.nan, math.nan)))
                for (key, value), (_, part) in zip(rows, parts)]
    exact = result.baseline
    if exact is not None:  # WITH BASELINE: each group's exact CKA beside the sample's
        columns.append("exact")
        rows = [(*row, _cka(exact if exact.groups is None else exact.groups.get(row[0])))
                for row in rows]
    table = Result(kind="table", statement=result.statement, columns=columns, rows=rows,
                   provenance=result.provenance)
    # What the sample says of its accuracy (or why nothing), as the answer's own table says
    # it, and the groups' notes (a one-item group's undefined CKA, a dash in its cell).
    line = estimate_line(result)
    table.notes = ([] if line is None else [line.plain]) + list(result.notes) + \
        [f"{group_by} = {key}: {note}" for key, part in parts if part is not result
         for note in part.notes]
    table.timings, table.n_items = result.timings, result.n_items
    # WITH BASELINE's error and speed-up (rows of the across table), its exact answer, and a
    # sample's estimate, as a SIMILARITY Result holds them.
    table.metrics, table.baseline, table.estimate = result.metrics, result.baseline, \
        result.estimate
    # Read as a SIMILARITY Result is: the CKA (ungrouped) and the pair's matrix.
    table.value, table.matrix = result.value, result.matrix
    return table


def _interval(part: Result) -> tuple[float, float] | None:
    """The pair's interval where the sample gives a reliable one."""
    estimate = part.estimate
    if estimate is None or not estimate.reliable or estimate.ci_low is None:
        return None
    return float(estimate.ci_low[0, 1]), float(estimate.ci_high[0, 1])


def _cka(part: Result | None) -> float:
    return math.nan if part is None or part.value is None else float(part.value)
