"""Results for people (rich tables) and for programs (JSON lines, CSV).

Every ``result`` here is a Result (results/result.py) and every ``estimate`` its Estimate; they
go unannotated because result.py imports this module to display itself, and the import graph
has no cycles (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import csv
import functools
import io
import json
import math

from rich.console import Console, Group
from rich import box
from rich.text import Text

from diagql.results.formats import (MAX_ROWS, bar, cell_text, group_label, items_text, number,
                                    number_or_dash, probability_text, reasons_text)
from diagql.results.query_table import query_table
from diagql.results.tables import FittingTable, PlainTable, natural_width

# Importing this module loads neither numpy nor the metrics (they load with the first result),
# so that rendering the REPL's first lines waits for nothing.


def renderable(result, max_rows: int = MAX_ROWS, echo: bool = True):
    """The result for a rich console; ``echo=False`` leaves out the statement above it (the
    REPL, where it was just typed)."""
    if result.kind == "evaluation":
        return _evaluation(result, echo)
    if result.kind == "similarity":
        from diagql.results.heatmap import similarity_renderable

        return similarity_renderable(result, echo)
    if result.ranked is not None:
        return _inputs(result, max_rows, echo)
    if not result.is_query:
        table = _info_table(result, max_rows)
        notes = [Text(note, style="yellow") for note in result.notes]
        title = [] if table.title or not result.title else [Text(result.title, style="bold")]
        if result.kind == "set" and echo and not title:  # unlabelled in a script: SS8
            title = [Text(result.statement, style="bold")]
        if result.kind == "across":
            # Narrower, fewer digits; narrower still, a number is cut with '…', never folded:
            # at 60 columns 0.4997 had read '0.499' with its '7' on the next line. Its rows
            # turned (a column per model) before that, and first of all where its own layout
            # passes TURN_WIDTH even on a pipe: a TOPK GROUP BY's twelve "group rank" columns
            # of "neuron value" had run to 287 characters, every cell cut (sweep MM2).
            first = table
            variants = [lambda: first, lambda: _info_table(result, max_rows, 3)]
            if result.turned is not None:
                turned = [lambda: _info_table(result, max_rows, layout=result.turned),
                          lambda: _info_table(result, max_rows, 3, layout=result.turned)]
                wide = natural_width(first) > TURN_WIDTH
                variants = turned + variants if wide else variants + turned
            table = FittingTable([*variants,
                                  lambda: _info_table(result, max_rows, 3, whole=True)])
        return Group(*title, table, *notes) if notes or title else table
    parts = [Text(result.statement, style="bold")] if echo and result.statement else []
    parts.append(query_table(result, max_rows))
    # Below the table rather than as its caption, which rich would wrap to the table's width.
    parts.append(Text(_caption(result), style="dim"))
    parts += [Text(line, style="cyan") for line in provenance_lines(result)]
    line = estimate_line(result)
    if line is not None:
        parts.append(line)
    summary = _summary(result)
    if summary:
        parts.append(summary)
    for note in result.notes:
        parts.append(Text(note, style="yellow"))
    return Group(*parts)


# A table's narrowest form: no lines between columns, only the space that separates them.
_COMPACT = {"box": box.SIMPLE_HEAD, "show_edge": False, "padding": 0}


TURN_WIDTH = 120  # characters past which an across table shows its rows turned


def _info_table(result, max_rows: int, digits: int = 4, whole: bool = False,
                layout: tuple | None = None) -> PlainTable:
    """A table Result as rows, numbers of an across table to ``digits`` significant digits;
    ``whole``: the narrowest form, a cell cut with '…' where it must be, never folded onto a
    second line; ``layout``: (columns, rows) to show instead of the Result's own."""
    columns, all_rows = layout if layout is not None else (result.columns, result.rows)
    limit = max(max_rows, 50) if result.kind == "table" else len(all_rows)
    # Checkpoints side by side: many columns, numbers to ``digits`` places, as a query's
    # table (whole in CSV and JSON; 4 significant digits had mixed "1", "0.121" and
    # "-0.005096" in one table: sweep MM2), an undefined one (a one-item group's CKA) a dash.
    cell = functools.partial(across_cell, places=digits) if result.kind == "across" \
        else cell_text
    rows = [[cell(v) for v in row] for row in all_rows[:limit]]
    # A title longer than the table (an ACROSS CHECKPOINTS statement over a few columns) is a
    # line above it (``renderable``): as the table's title, rich wrapped it word by word. The
    # table's width: its columns' widest cells, each padded and bordered.
    width = sum(max([len(str(column))] + [len(row[i]) for row in rows])
                for i, column in enumerate(columns)) + 3 * len(columns) + 1
    long = bool(result.title) and len(result.title) > width
    table = PlainTable(title=None if long or not result.title else result.title,
                       title_justify="left", title_style="bold", **(_COMPACT if whole else {}))
    for column in columns:
        # A number cut shows '…'; folded, 0.4997 read '0.499' with its '7' a line below.
        table.add_column(column, overflow="ellipsis" if whole else "fold", no_wrap=whole)
    for row in rows:
        table.add_row(*row)
    if len(all_rows) > limit:
        table.caption = Text(f"… {len(all_rows) - limit:,} more rows (--format csv shows all)")
    return table


def across_cell(value, places: int = 4) -> str:
    if isinstance(value, float) and (type(value) is float or math.isnan(value)):
        return number_or_dash(value, places)
    return cell_text(value)


def _evaluation(result, echo: bool) -> Group:
    """EVALUATE SAMPLERS: one row per sampler, size, k (and j), spreads beside the means.
    Where that does not fit the width, the spreads go first, then the item counts and the
    draw's seconds, then the assisted scores' headers take two lines (results/tables.py)."""
    rows = result.records()
    # Several seeds show their spread, 0.000 where they agree (blank had read as one seed's).
    seeds = getattr(result.plan, "seeds", None)
    several = len(seeds) > 1 if seeds is not None else any(r[f"{m} sd"] for r in rows
                                                           for m in ("S1", "S2", "S3"))
    forms = ((several, True, False, False), (False, True, False, False),  # (spreads, counts,
             (False, False, False, False), (False, False, True, False),  # folded, compact)
             (False, False, True, True))
    table = FittingTable(functools.partial(_evaluation_table, rows, *form) for form in forms)
    parts = [Text(result.statement, style="bold")] if echo and result.statement else []
    parts += [table, Text(result.title, style="dim")]
    timings = result.timings
    if "evaluate" in timings:
        parts.append(Text(f"{timings['evaluate']:.1f} s in all: drawing the samples "
                          f"{timings['samples']:.1f} s (draw s: the median per sample), one "
                          f"forward pass {timings['forward']:.1f} s, scoring "
                          f"{timings['score']:.1f} s", style="dim"))
    parts += [Text(note, style="yellow") for note in result.notes]
    return Group(*parts)


def _evaluation_table(rows: list[dict], spreads: bool, counts: bool, folded: bool,
                      compact: bool = False) -> PlainTable:
    """``compact``: the narrowest form, no item count and no lines between columns (at 60
    columns the scores had been cut to '0.8…' and the samplers' names to nothing)."""
    from diagql.results.metrics import METRICS

    show_k, show_j = len({r["k"] for r in rows}) > 1, any(r["j"] is not None for r in rows)
    sections = len({r["sampler"] for r in rows}) < len(rows)
    names = [m.paper for m in METRICS]  # EVALUATE's columns: S1, S1 sd, S2, ...
    table = PlainTable(**(_COMPACT if compact else {}))
    if not spreads and any(r[f"{name} sd"] for r in rows for name in names):  # sweep SS8
        table.caption = "± (the seeds' spreads) left out at this width: --format csv has them"
    table.add_column("sampler", style="cyan", overflow="fold")
    table.add_column("size", justify="right")
    for name, shown in (("k", show_k), ("j", show_j)):
        if shown:
            table.add_column(name, justify="right")
    for metric in METRICS:
        table.add_column(f"{metric.paper} {metric.arrow}", justify="right")
        if spreads:
            table.add_column("±", justify="right", style="dim")
    assisted = all(f"{name} assisted" in r for r in rows for name in names)
    if assisted:  # the model-assisted estimator's scores, beside the sample's own
        for metric in METRICS:
            table.add_column(f"{metric.paper}\nasst" if folded else f"{metric.paper} asst",
                             justify="right", style="green")
    shown = ("items", "correct", "incorrect", "draw s") if counts else \
        () if compact else ("items",)
    for name in shown:
        table.add_column(name, justify="right")
    previous = None
    for r in rows:
        if sections and previous is not None and r["sampler"] != previous:
            table.add_section()
        previous = r["sampler"]
        cells = [r["sampler"], sample_size_text(r["size"])]
        cells += [str(r["k"])] if show_k else []
        cells += ["" if r["j"] is None else f"{r['j']:g}"] if show_j else []
        for name in names:
            sd = r[f"{name} sd"]
            cells += [f"{r[name]:.3f}"] + ([f"{sd:.3f}"] if spreads else [])
        cells += [f"{r[f'{name} assisted']:.3f}" for name in names] if assisted else []
        cells += [f"{r[n]:.0f}" if float(r[n]).is_integer() else f"{r[n]:.1f}"
                  for n in ("items", "correct", "incorrect") if n in shown]
        if counts:
            cells.append(f"{r['seconds']:.3f}")
        table.add_row(*cells)
    return table


def _inputs(result, max_rows: int, echo: bool) -> Group:
    """TOPK k INPUTS: one row per item, best first, with its label, prediction and confidence
    (and its tokens when it has them)."""
    records = result.records()
    tokens = any("tokens" in r for r in records)
    table = PlainTable()
    for name in ("rank", "item", "activation", "", "label", "predicted", "confidence"):
        table.add_column(name, justify="left" if name == "" else "right")
    if tokens:
        table.add_column("tokens", overflow="fold", max_width=60)
    lengths = _rank_bars([r["value"] for r in records],
                         result.ranked is None or result.ranked.largest)
    for r, length in zip(records[:max_rows], lengths):
        cells = [str(r["rank"]), str(r["item"]), number(r["value"]), bar(length, 1.0),
                 group_label(r["label"], "class", result.class_names),
                 group_label(r["predicted"], "predicted", result.class_names),
                 probability_text(r['confidence'])]
        table.add_row(*cells, *([r.get("tokens", "")] if tokens else []))
    if len(records) > max_rows:
        table.add_row("", Text(f"… {len(records) - max_rows:,} more", style="dim"))
    parts = [Text(result.statement, style="bold")] if echo and result.statement else []
    parts += [table, Text(_inputs_caption(result), style="dim")]
    parts += [Text(note, style="yellow") for note in result.notes]
    return Group(*parts)


def _inputs_caption(result) -> str:
    ranked, provenance = result.ranked, result.provenance
    end = "highest" if ranked.largest else "lowest"
    parts = [f"the {len(result.items):,} items of {end} {ranked.neuron} among "
             f"{result.n_items:,} matching"]
    if provenance is not None:
        parts.append(provenance.describe())
    if ranked.how:
        parts.append(ranked.how)
    if "query" in result.timings:
        parts.append(f"{result.timings['query']:.3f} s")
    return " · ".join(parts)


def sample_size_text(size) -> str:
    """A sampler's size as EVALUATE's table and its plot's legend write it: 2.5%, 50, own."""
    if size is None:
        return "own"  # a sampler whose size is its own (ebtree)
    if isinstance(size, float):
        return f"{size * 100:.4g}%"
    return f"{size:,}"


def provenance_lines(result) -> list[str]:
    """How a sampled answer was got, said below its table: AUTO's choice, the growth of
    UNTIL or WITHIN."""
    provenance = result.provenance
    if provenance is None:
        return []
    return [line for line in (provenance.choice,
                              provenance.growth and provenance.growth.text()) if line]


def estimate_line(result) -> Text | None:
    """One line on what the sample alone says about its own accuracy, or why it says nothing."""
    parts = result.parts()
    estimates = [p.estimate for p in parts if p.estimate is not None]
    if not estimates:
        return None
    reliable = [e for e in estimates if e.reliable]
    if not reliable:
        unsampled = sum(1 for p in parts if p.n_items == 0)
        if result.groups is not None and unsampled:
            said = next((p.estimate.reason for p in parts if p.n_items and p.estimate is not None
                         and p.estimate.reason), None)
            return Text(f"no accuracy estimate: {unsampled} of {len(parts)} groups had no "
                        f"matching item sampled" + (f"; the others: {said}" if said else ""),
                        style="yellow")
        reason = estimates[0].reason or (
            f"{result.source.split('(')[0]} does not draw uniformly, so the sample cannot "
            f"measure its own bias; add WITH BASELINE for the real error")
        return Text(f"no accuracy estimate: {reason}", style="yellow")
    if all(e.exact for e in estimates):
        if all(e.n == e.population for e in estimates):
            return Text("exact, from a sample: it holds every matching item", style="dim")
        if result.kind == "argmax":
            return Text("exact, from a sample: the profile keeps every item's winner of "
                        f"{result.layer}, so the shares are counted, not estimated", style="dim")
        held = f"{result.layer} channel means" if result.unit == "channels" else result.layer
        prediction = getattr(getattr(result, "plan", None), "prediction", None)
        if prediction is not None and prediction.rebuilt:  # engine/planner.py: ``_rebuilds``
            return Text(f"exact, from a sample: the profile's principal components of "
                        f"{result.layer} span it and rebuild every item's {held} (to float32 "
                        "rounding), so the means are computed from all matching items", "dim")
        return Text(f"exact, from a sample: the profile holds every item's {held}, so "
                    "the means are computed from all matching items, not estimated", style="dim")
    value = math.fsum(e.expected for e in reliable) / len(reliable)
    scope = " (mean over groups)" if result.groups is not None else ""
    if len(reliable) < len(parts):  # the others say nothing: a mean of the rest alone misleads
        unsaid = reasons_text([p.estimate.reason or "no estimate" for p in parts
                               if p.estimate is not None and not p.estimate.reliable])
        scope = (f" (mean over the {len(reliable)} of {len(parts)} groups with an estimate; "
                 f"the others: {unsaid})")
    # A block's own projections predict its items first (engine/prediction.py).
    plan = getattr(result, "plan", None)
    block = getattr(getattr(plan, "prediction", None), "predictor", None)
    # Or the fit takes a neighbour block's leading projections beside the latent's.
    neighbour, feeder = getattr(plan, "neighbour", None), getattr(plan, "feeder", None)
    blocks = f"blocks {neighbour}'s and {feeder}'s" if feeder else f"block {neighbour}'s"
    fit = f"{block} and a regression on the latent" if block else \
        f"a regression on the latent and {blocks} leading components" \
        if neighbour else "a regression on the latent"
    covers = (f"model-assisted ({fit}): covers the sampler's selection"
              if reliable[0].estimator == "assisted"
              else "covers sampling variance, not a sampler's bias")
    widened = [e.widened or 1.0 for e in reliable]
    if max(widened) > 1.0:
        amount = f"{max(widened):.1f}x" if len(widened) == 1 or \
            f"{min(widened):.1f}" == f"{max(widened):.1f}" else \
            f"{min(widened):.1f}-{max(widened):.1f}x by group"
        covers += (f"; intervals widened {amount}: checked on values the profile knows "
                   f"for every item, the fit missed them by more than its standard errors")
    refused = [e.fit_refused for e in reliable if e.fit_refused]
    if refused:
        which = "" if len(refused) == len(reliable) else f" of {len(refused)} groups"
        covers += (f"; the sample mean answers{which}: the model-assisted fit missed values "
                   f"the profile knows for every item by {max(refused):.1f}x its standard "
                   f"errors, which left its error above the mean's")
    return Text(f"estimated from the sample: expected {reliable[0].metric.label} {value:.3f}{scope}; "
                f"{covers}", style="dim")


def _caption(result) -> str:
    provenance = result.provenance
    parts = [items_text(result)]
    if provenance is not None:
        parts.append(provenance.describe())
    if "query" in result.timings:
        parts.append(f"{result.timings['query']:.3f} s")
    elif "shared_pass" in result.timings:
        parts.append(f"one forward pass shared with the statements beside it, "
                     f"{result.timings['shared_pass']:.3f} s")
    return " · ".join(parts)


_SPEEDUP_SHOWN_FROM = 0.05  # seconds of the full query


def _missed(result) -> str:
    """Where the sample missed some groups, which score the metric's worst: the mean over the
    groups it holds beside it, as their expected distance is (a sweep read 0.310 "over groups"
    beside an expected 0.060, where the groups held scored 0.080)."""
    from diagql.results.metrics import BY_KEY

    key = next((k for k in result.metrics if k in BY_KEY), None)
    if key is None:
        return ""
    compared = [g for g in result.groups.values() if g.baseline is not None and key in g.metrics]
    held = [g.metrics[key] for g in compared if len(g.values)]
    if not held or len(held) == len(compared):
        return ""
    missed = len(compared) - len(held)
    return (f" ({sum(held) / len(held):.3f} over the {len(held)} the sample holds; the "
            f"{missed} it missed score{'s' if missed == 1 else ''} {BY_KEY[key].worst:.3f})")


def _summary(result) -> Text | None:
    if not result.metrics:
        return None
    from diagql.results.metrics import BY_KEY

    text = Text("vs exact: ", style="bold")
    pieces = [f"{BY_KEY[k].label} {v:.3f}" for k, v in result.metrics.items() if k in BY_KEY]
    if result.groups is not None and pieces:
        pieces[0] = "mean " + pieces[0] + " over groups" + _missed(result)
    timings = result.timings
    full_s = timings.get("baseline")
    if full_s is not None:
        drawn = timings.get("sample", 0.0)
        draw = f" (drawing it {drawn:.3f} s)" if drawn >= 0.0005 else ""
        pieces.append(f"sample {timings.get('sample_side', timings['query']):.3f} s{draw} vs "
                      f"full {full_s:.3f} s")
    # Below ~50 ms both sides are per-call overhead (and cache writes), and their ratio noise.
    if "speedup" in result.metrics and full_s is not None and full_s >= _SPEEDUP_SHOWN_FROM:
        speedup = result.metrics["speedup"]
        pieces.append(f"{speedup:.1f}× faster" if speedup >= 1 else f"{1 / speedup:.1f}× slower")
    if timings.get("profile", 0.0) >= _SPEEDUP_SHOWN_FROM:
        pieces.append(f"profile (once per model and data) {timings['profile']:.2f} s")
    text.append(" · ".join(pieces))
    return text


def _rank_bars(values: list[float], largest: bool) -> list[float]:
    """Bar lengths (0..1) that follow the ranks: the first item's the longest. Values of one
    sign scale from 0 (|value| / the largest |value|); values of both signs, or negative ones
    ranked highest first, scale over their range, the last a tenth of it above nothing."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    low, high = min(finite), max(finite)
    if (largest and low >= 0) or (not largest and high <= 0):
        top = max(abs(low), abs(high))
        return [abs(v) / top if top > 0 and math.isfinite(v) else 0.0 for v in values]
    span = (high - low) or 1.0
    floor = low - span / 10 if largest else high + span / 10
    return [abs(v - floor) / abs((high if largest else low) - floor) if math.isfinite(v) else 0.0
            for v in values]


# --- text, HTML, JSON, CSV --------------------------------------------------------------------


WIDE_TABLES = 200  # columns a table may take in text with no width of its own (a pipe)


def whole_width(console, shown, cap: int = WIDE_TABLES) -> int:
    """The width at which the tables of ``shown`` (a renderable or a Group of them) are drawn
    whole, each up to ``cap`` columns, past which their prose folds between words (SHOW
    SAMPLERS' ranges ran 1,400 columns wide) unless a word needs more; the console's own
    where that is wider. For text with no width of its own: a pipe, a string."""
    from rich.measure import Measurement
    from rich.table import Table

    wide = console.options.update(max_width=10_000)
    widths = [console.width]
    for part in getattr(shown, "renderables", [shown]):
        if not isinstance(part, (Table, FittingTable)):
            continue
        size = Measurement.get(console, wide, part)
        # A table of prose (EXPLAIN's steps, DESCRIBE's notes) folds it at the console's
        # width, as the text around it does; a table of numbers keeps its rows on one line.
        prose = _prose(part, console.width)
        widths.append(max(size.minimum, prose if prose is not None else
                          min(size.maximum, cap)))
    return max(widths)


PROSE = 60  # characters of a cell that may wrap past which its table is one of prose


def _prose(table, width: int) -> int | None:
    """The width a table of prose is drawn at: where a column that may wrap holds a cell of
    words longer than ``PROSE`` characters, ``width``, or wider where its columns' longest
    words need it, so that none is folded mid-word (a 67-character class name had been split:
    review PP1; a DESCRIBE whose labels needed 102 columns went to 200: review RR1); None for
    a table of numbers."""
    columns = getattr(table, "columns", ())
    if not any(not column.no_wrap and any(len(str(cell)) > PROSE and " " in str(cell).strip()
                                          for cell in column._cells) for column in columns):
        return None
    longest = [max([len(word) for cell in column._cells for word in str(cell).split()] +
                   [len(word) for word in str(column.header).split()] + [1])
               for column in columns]
    return max(width, sum(longest) + 3 * len(columns) + 1)


def to_text(result, width: int | None = None, max_rows: int = MAX_ROWS) -> str:
    """The result as text: its prose wrapped at ``width`` columns (default 100) and, with
    no ``width`` given, its tables as wide as they need (``whole_width``), never cut to
    "0.…" cells (str(result), print(result) in Python, where a string has no width)."""
    console = Console(file=io.StringIO(), width=width or 100, color_system=None,
                      force_terminal=False, emoji=False)
    shown = renderable(result, max_rows)
    if width is None:
        console.width = whole_width(console, shown)
    console.print(shown)
    return console.file.getvalue().rstrip("\n")


def to_html(result) -> str:
    """The table as rich draws it, with thumbnails or heat maps below (results/html.py)."""
    from diagql.results.html import page

    console = Console(record=True, file=io.StringIO(), width=110, emoji=False)
    console.print(renderable(result))
    return page(result, console.export_html(
        inline_styles=True, code_format="<pre style=\"font-family:monospace\">{code}</pre>"))


def to_json(result) -> str:
    """One compact JSON object: scripts print one line per statement (JSON Lines). An undefined
    number (NaN, inf: a debiased CKA's interval over too few items) is null, since NaN is not
    JSON and jq, JavaScript and strict parsers refuse the whole line."""
    return json.dumps(_finite(result.to_dict()), allow_nan=False, ensure_ascii=False)


def _finite(value):
    """``value`` with every non-finite float, however deeply nested, made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def to_csv(result) -> str:
    records = result.records()
    # A table with no rows still has its header, so that a reader of the file sees what
    # was asked and that nothing came back.
    names = list(dict.fromkeys(key for rec in records for key in rec)) or \
        ([] if result.is_query else list(result.columns))
    if not names:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue().rstrip("\n")
