"""A SIMILARITY result for people: the value of two layers, or the matrix of every pair as a
heat-map-style table (cells shaded by value, and a shade glyph that survives plain text)."""
from __future__ import annotations

import math

import numpy as np

from rich.console import Group
from rich.style import Style
from rich.text import Text

from diagql.results.formats import group_label, items_text, none_sampled
from diagql.results.tables import PlainTable

_SHADES = " ░▒▓█"
_SPEEDUP_SHOWN_FROM = 0.05  # seconds of the exact pass, as for queries


def similarity_renderable(result, echo: bool = True):
    parts = [Text(result.statement, style="bold")] if echo and result.statement else []
    sections = list(result.groups.items()) if result.groups is not None else [(None, result)]
    if len(result.labels) == 2:
        parts.append(_pair_table(result, sections))
    else:
        for key, part in sections:
            if result.groups is not None:
                parts.append(Text(f"{_group_by(result)} = {key}", style="magenta"))
            parts.append(_matrix_table(part))
            if part.baseline is not None:
                parts.append(Text("exact:", style="dim"))
                parts.append(_matrix_table(part.baseline))
    parts.append(Text(_caption(result), style="dim"))
    line = estimate_line(result)
    if line is not None:
        parts.append(line)
    summary = _summary(result)
    if summary is not None:
        parts.append(summary)
    parts += [Text(note, style="yellow") for note in _notes(result)]
    return Group(*parts)


def _group_by(result) -> str:
    provenance = result.provenance
    return (provenance.group_by if provenance is not None else None) or "group"


def _pair_table(result, sections) -> PlainTable:
    """Two layers: one row per group (one row without GROUP BY)."""
    x, y = result.labels
    table = PlainTable()
    if result.groups is not None:
        table.add_column(_group_by(result), style="magenta")
    table.add_column("items", justify="right")
    table.add_column(f"{(result.unit or 'cka').upper()}({x}, {y})", justify="right")
    shown = _shown_estimate(result)
    if shown:
        table.add_column(f"{shown.level:.0%} interval", justify="right")
    table.add_column("", no_wrap=True)
    exact = any(part.baseline is not None for _, part in sections)
    if exact:
        table.add_column("exact", justify="right")
        table.add_column("|error|", justify="right")
    for key, part in sections:
        cells = [group_label(key, _group_by(result), result.class_names)] \
            if result.groups is not None else []
        cells.append(f"{part.n_items:,}")
        if part.value is None:
            cells.append(_no_value(part))
        else:
            cells.append(_number(part.value))
        if shown:
            cells.append(_interval(part, 0, 1))
        cells.append(_bar(part.value))
        if exact:
            base = part.baseline
            cells.append(_number(base.value) if base is not None and base.value is not None
                         else "")
            error = part.metrics.get("cka_abs_error")
            cells.append(_number(error) if error is not None else "")
        table.add_row(*cells)
    return table


def _no_value(part) -> str:
    """Why a CKA cell is empty: too few items for one, or none of the group's sampled."""
    if part.n_items:
        return "—"
    matching = getattr(part.provenance, "matching", None)
    return none_sampled(matching) if matching else "no matching items"


# Wider than this with its labels as headers, a matrix heads its columns by number.
_MATRIX_WIDTH = 100


def _matrix_table(result) -> PlainTable:
    """Three or more layers: rows and columns in the order given, each cell shaded. Where the
    labels as headers would make the table wider than _MATRIX_WIDTH, the rows are numbered
    and the columns headed by those numbers (five BERT layers' labels had squeezed the row
    labels out of a 250-column table: the sweep SS5)."""
    labels = result.labels
    widest = max(len(label) for label in labels)
    numbered = widest + sum(max(len(label), 7) + 3 for label in labels) > _MATRIX_WIDTH
    table = PlainTable()
    table.add_column("", style="cyan", no_wrap=numbered)
    for i, label in enumerate(labels):
        table.add_column(str(i + 1) if numbered else label, justify="right")
    if result.matrix is None:
        table.add_row(_no_value(result), *[""] * len(labels))
        return table
    for i, label in enumerate(labels):
        table.add_row(f"{i + 1} {label}" if numbered else label,
                      *[_cell(result.matrix[i, j]) for j in range(len(labels))])
    return table


def _cell(value: float) -> Text:
    if not math.isfinite(value):
        return Text("—")
    level = min(max(value, 0.0), 1.0)
    glyph = _SHADES[min(int(level * len(_SHADES)), len(_SHADES) - 1)]
    # White (0) to a deep blue (1), the text turning white where the cell is dark.
    red, green = round(255 - 200 * level), round(255 - 150 * level)
    style = Style(bgcolor=f"rgb({red},{green},255)", color="white" if level > 0.6 else "black")
    return Text(f"{value:.3f} {glyph}", style=style)


def _shown_estimate(result):
    parts = result.groups.values() if result.groups is not None else [result]
    return next((p.estimate for p in parts if p.estimate is not None and p.estimate.reliable),
                None)


def _interval(part, i: int, j: int) -> str:
    estimate = part.estimate
    if estimate is None or not estimate.reliable or estimate.ci_low is None:
        return ""
    low, high = estimate.ci_low[i, j], estimate.ci_high[i, j]
    if not (math.isfinite(low) and math.isfinite(high)):
        return ""
    return f"[{low:.3f}, {high:.3f}]"


def estimate_line(result) -> Text | None:
    parts = result.parts()
    estimates = [p.estimate for p in parts if p.estimate is not None]
    if not estimates:
        return None
    # A part with no value at all (a sample of under 5 matching items) says so, not "no interval".
    valueless = [p for p in parts if p.estimate is not None and not p.estimate.reliable
                 and p.matrix is not None and not np.isfinite(_off_diagonal(p.matrix)).any()]
    unsaid = ""
    if valueless and len(valueless) < len(estimates):
        reason = next((p.estimate.reason for p in valueless if p.estimate.reason), "")
        unsaid = (f"; no estimate for {len(valueless)} group{'s' if len(valueless) > 1 else ''}"
                  + (f" ({reason})" if len(valueless) == 1 and reason else
                     " with too few sampled items"))
    if not any(e.reliable for e in estimates):
        # The first reason that is not a valueless group's (theirs follows in ``unsaid``: a
        # group of 4 sampled items had shown "—" under maxmargin's reason alone, sweep SS5).
        reason = next((e.reason for e in estimates if e.reason and not any(
            e is p.estimate for p in valueless)), None) or next(
            (e.reason for e in estimates if e.reason), "the sample cannot measure its own "
            "bias; add WITH BASELINE for the real error")
        what = "no estimate" if len(valueless) == len(estimates) else "no interval"
        return Text(f"{what}: {reason}{unsaid}", style="yellow")
    where = "" if len(result.labels) == 2 else " (Result.estimate has each pair's)"
    if all(e.exact for e in estimates):
        return Text("exact, from a sample: it holds every matching item", style="dim")
    return Text(f"CKA of the matching items estimated from the sample (unbiased HSIC) with a "
                f"{estimates[0].level:.0%} jackknife interval{where}; covers sampling "
                f"variance, not a sampler's bias{unsaid}", style="dim")


def _off_diagonal(matrix: np.ndarray) -> np.ndarray:
    return matrix[~np.eye(len(matrix), dtype=bool)]


def _caption(result) -> str:
    provenance = result.provenance
    parts = [items_text(result)]
    if provenance is not None:
        parts.append(provenance.describe())
    parts.append(f"linear {(result.unit or 'cka').upper()}")
    if "query" in result.timings:
        parts.append(f"{result.timings['query']:.3f} s")
    return " · ".join(parts)


def _summary(result) -> Text | None:
    error = result.metrics.get("cka_abs_error")
    if error is None:
        return None
    scope = "mean " if result.groups is not None or len(result.labels) > 2 else ""
    parts = result.parts()
    # engine/similarity.py scores a pair with no estimate as the worst error, 1.
    missing = any((p.matrix is None or np.isnan(_off_diagonal(p.matrix)).any())
                  and p.baseline is not None and p.baseline.matrix is not None
                  and np.isfinite(_off_diagonal(p.baseline.matrix)).any() for p in parts)
    pieces = [f"{scope}|error| — (the exact CKA is undefined)" if math.isnan(error) else
              f"{scope}|error| {error:.3f}" + (" (no estimate counts 1)" if missing else "")]
    timings = result.timings
    full_s = timings.get("baseline")
    if full_s is not None:
        pieces.append(f"sample {timings.get('sample_side', timings.get('query', 0.0)):.3f} s "
                      f"vs full {full_s:.3f} s")
    if "speedup" in result.metrics and full_s is not None and full_s >= _SPEEDUP_SHOWN_FROM:
        speedup = result.metrics["speedup"]
        pieces.append(f"{speedup:.1f}× faster" if speedup >= 1 else f"{1 / speedup:.1f}× slower")
    text = Text("vs exact: ", style="bold")
    text.append(" · ".join(pieces))
    return text


def _notes(result) -> list[str]:
    """The Result's notes, then each group's, named by its group."""
    notes = list(result.notes)
    for key, part in (result.groups or {}).items():
        notes += [f"{_group_by(result)} = {key}: {n}" for n in part.notes]
    return notes


def _bar(value) -> Text:
    if value is None or not math.isfinite(value):
        return Text("")
    return Text("█" * round(12 * min(max(value, 0.0), 1.0)), style="green")


def _number(value) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4f}"
