"""One statement's answers per checkpoint, side by side: a table of checkpoints against what
each answer holds (ranks, neurons, groups, rows), and its curves over the checkpoints.

Every ``result`` here is a Result (results/result.py), unannotated as in render.py.
"""
from __future__ import annotations

import math
import textwrap

from diagql.errors import ExecutionError

WIDE = 12  # at most this many answer rows become columns (one row per checkpoint)
_INTERVAL = ("ci_low", "ci_high")  # a table answer's interval columns (SIMILARITY's)
LABELLED = 60  # at most this many curves are named in a legend (beside the axes past WIDE)


def across_result(statement: str, answers: dict, what: str, class_names=None):
    """The Result of a statement run once per checkpoint (``answers``: name → Result, in
    training order); ``what`` says over what, for the title; ``class_names`` name the class
    groups."""
    from diagql.results.result import Result

    key_names, shown, numbers = _pivot(answers)
    keys = list(shown)
    if any(answer.is_query for answer in answers.values()):
        # Groups in order whichever checkpoint had them first; ranks and neurons as they came.
        keys.sort(key=lambda key: [_sortable(part) for part in key[:-1]])
    names = list(answers)
    named = _namer(key_names, class_names)
    # WITH BASELINE: each checkpoint's error against its own exact answer, after the answer's
    # rows (padded to the key's width, for the layout with the keys in columns).
    curves = list(keys)  # what the plot draws: the answer, not its errors
    for metric in dict.fromkeys(m for answer in answers.values() for m in answer.metrics):
        label = "speedup" if metric == "speedup" else f"{metric} vs exact"
        key = ("",) * max(len(key_names) - 1, 0) + (label,)
        keys.append(key)
        shown[key] = {name: answer.metrics[metric] for name, answer in answers.items()
                      if metric in answer.metrics}
        numbers[key] = dict(shown[key])
    # A model without the key (none of its items matched): None, a blank cell, JSON's null.
    turned = ([*key_names, *names],
              [(*named(key), *(shown[key].get(name) for name in names)) for key in keys])
    if len(keys) <= WIDE:  # checkpoints down, the answer's rows across: curves read down
        columns = ["checkpoint", *(_key_text(named(key)) for key in keys)]
        rows = [(name, *(shown[key].get(name) for key in keys)) for name in names]
    else:
        (columns, rows), turned = turned, None
    result = Result(kind="across", statement=statement, columns=columns, rows=rows,
                    title=f"{statement}: {len(names)} models ({what})", checkpoints=answers,
                    turned=turned)
    if any(answer.kind == "topk" for answer in answers.values()):
        curves, numbers = _neuron_curves(answers)
    result.series = {_key_text(named(key)): [numbers[key].get(name, math.nan) for name in names]
                     for key in curves}
    result.notes.extend(_sampled(answers) + _items(answers) + _notes(answers))
    return result


def _items(answers: dict) -> list[str]:
    """Each model's matching items, where they differ: a WHERE or GROUP BY on predictions
    reads each checkpoint's own (sweep MM2: 443 items for one, 366 for another, unsaid). Of
    the whole data, not a sample's (review NN1), and per group."""
    counts = {name: _matching(answer) for name, answer in answers.items() if answer.is_query}
    if len({count for count, _ in counts.values()}) > 1:
        return ["matching items differ, each model's own predictions read: " +
                ", ".join(f"{name} {count:,}" for name, (count, _) in counts.items())]
    if len({tuple(sorted(groups.items())) for _, groups in counts.values()}) > 1:
        return ["each model's groups hold other items, its own predictions read"]
    return []


def _matching(answer) -> tuple[int | None, dict]:
    """(the answer's matching items in the whole data, its groups' by key)."""
    def count(part) -> int | None:
        provenance = part.provenance
        known = None if provenance is None else provenance.matching
        return known if known is not None else part.n_items

    groups = {key: count(part) for key, part in (answer.groups or {}).items()}
    return (sum(v for v in groups.values() if v is not None) if groups else count(answer),
            groups)


def _sampled(answers: dict) -> list[str]:
    """A sampled statement's provenance: the one sample drawn on the final model's profile,
    said once for the models whose answers it gave (an UNTIL's or AUTO's may be exact for
    some)."""
    drawn: dict[str, list[str]] = {}
    for name, answer in answers.items():
        provenance = answer.provenance
        if provenance is not None and provenance.approximate:
            drawn.setdefault(provenance.describe(), []).append(name)
    return [f"{_whose(names, answers, 'each answer')} from the {how}"
            for how, names in drawn.items()]


def _whose(names: list[str], answers: dict, every: str) -> str:
    """The models a line is said of: ``every`` where it is all of several."""
    return every if 1 < len(answers) == len(names) else ", ".join(names)


def _notes(answers: dict) -> list[str]:
    """Each answer's choice (USING AUTO), growth (UNTIL, WITHIN) and estimate as its own
    table says them (SIMILARITY's table holds its estimate as its first note), its notes and
    its groups' (a one-item group's undefined CKA, which its cell shows as a dash), said once
    with the models that have them."""
    from diagql.results import render

    said: dict[str, list[str]] = {}
    for name, answer in answers.items():
        group_by = getattr(answer.provenance, "group_by", None) or "group"
        line = render.estimate_line(answer) if answer.is_query else None
        notes = render.provenance_lines(answer) + ([] if line is None else [line.plain]) + \
            list(answer.notes) + [
            f"{group_by} = {key}: {note}" for key, part in (answer.groups or {}).items()
            for note in part.notes]
        for note in notes:
            said.setdefault(note, []).append(name)
    return [f"{_whose(names, answers, 'every model')}: {note}" for note, names in said.items()]


def _namer(key_names: list[str], classes):
    """A key as shown: its class groups with their names (``3 cat``), as a query's own table
    shows them; sorted and matched by the bare keys."""
    from diagql.results.formats import group_label

    if not classes:
        return lambda key: key
    return lambda key: tuple(
        group_label(part, name, classes) if name in ("class", "predicted") and part != ""
        else part for name, part in zip(key_names, key)) + tuple(key[len(key_names):])


def _pivot(answers: dict) -> tuple[list[str], dict, dict]:
    """(the key columns, key → checkpoint → cell text, key → checkpoint → number): a query's
    key is its group and rank (TOPK, whose cell is the neuron and its value) or neuron label;
    a table's key is its columns that are not numbers."""
    key_names: list[str] = []
    shown: dict[tuple, dict] = {}
    numbers: dict[tuple, dict] = {}
    for name, answer in answers.items():
        for record in answer.records():
            names, key, text, number = _split(answer, record)
            key_names = key_names or names
            # An undefined number (a one-item group's CKA) stays NaN: JSON's null, the
            # table's dash (results/render.py, ``across_cell``).
            shown.setdefault(key, {})[name] = text
            numbers.setdefault(key, {})[name] = number
    return key_names, shown, numbers


def _neuron_curves(answers: dict) -> tuple[list[tuple], dict]:
    """TOPK's curves: one per neuron (its group and label) that any checkpoint ranks, its value
    where that checkpoint ranks it and a gap elsewhere. A curve per rank joined one neuron's
    value to another's wherever the ranking changed, drawing a trend no neuron had."""
    numbers: dict[tuple, dict] = {}
    for name, answer in answers.items():
        for record in answer.records():
            names, key, _, number = _split(answer, record)
            numbers.setdefault((*key[:-1], record["label"]), {})[name] = number
    return list(numbers), numbers


def _split(answer, record: dict) -> tuple[list[str], tuple, str | float, float]:
    if answer.is_query:
        group = [name for name in record if name not in (
            "rank", "neuron", "label", "value", "exact_value", "ci_low", "ci_high", "p_in_topk")]
        value = record["value"]
        if answer.kind == "topk":
            names = [*group, "rank"]
            return names, tuple(record[n] for n in names), f"{record['label']} {_num(value)}", value
        names = [*group, "label"]
        # A lone number stays a number: CSV and JSON carry it whole, the table formats it.
        return names, tuple(record[n] for n in names), value, value
    values = [n for n, v in record.items() if isinstance(v, float) or n in _INTERVAL]
    names = [n for n in record if n not in values]
    key = tuple(record[n] for n in names)
    shown = [n for n in values if n not in _INTERVAL]
    if len(values) == 1:
        return names, key, record[values[0]], record[values[0]]
    # A sample's interval follows its value: "0.7180 [0.69, 0.74]".
    bounds = [record.get(n) for n in _INTERVAL]
    interval = f" [{bounds[0]:.3g}, {bounds[1]:.3g}]" if all(
        isinstance(b, float) and math.isfinite(b) for b in bounds) else ""
    cells = [f"{n}={_num(record[n])}" if len(shown) > 1 else _num(record[n]) for n in shown]
    if cells:
        cells[0] += interval
    return names, key, ", ".join(cells), record[shown[0]] if shown else math.nan


def _sortable(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _key_text(key: tuple) -> str:
    return " ".join(str(part) for part in key)


def _num(value) -> str:
    """A number in a cell of text (a TOPK's, a sample's CKA with its interval): an undefined
    one (a group's CKA over too few sampled items) a dash, as a cell of one number shows it."""
    from diagql.results.formats import number_or_dash

    return number_or_dash(value) if isinstance(value, float) else str(value)


def write_curves(result, path: str) -> None:
    """Each row of the answer as a curve over the checkpoints (x: training order), to ``path``."""
    figure = draw_curves(result)
    try:
        figure.savefig(path, dpi=85, bbox_inches="tight")  # the legend beside the axes too
    except OSError as exc:
        raise ExecutionError(f"cannot write the plot to {path!r}: {exc.strerror or exc}") from None


def draw_curves(result):
    """``write_curves``'s matplotlib Figure."""
    from diagql.results.plots import _figure_class

    Figure, _ = _figure_class()
    figure = Figure(figsize=(7.5, 4.2))
    ax = figure.add_subplot()
    names = list(result.checkpoints)
    x = list(range(len(names)))
    for label, values in result.series.items():
        ax.plot(x, values, marker="o" if len(names) <= 30 else None, linewidth=1.2,
                label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45 if len(names) > 8 else 0, ha="right"
                       if len(names) > 8 else "center", fontsize=8)
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("value")
    title = textwrap.fill(result.statement, 90)
    count = len(result.series)
    if count > LABELLED:  # a legend of hundreds of entries would hide the curves it names
        title += f"\n({count:,} curves, too many to label: the table names them)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if count <= WIDE:
        ax.legend(fontsize=7, ncol=2, loc="best")
    elif count <= LABELLED:  # beside the axes, in columns of at most 20
        figure.set_figwidth(7.5 + 1.9 * -(-count // 20))
        ax.legend(fontsize=6, ncol=-(-count // 20), loc="upper left", bbox_to_anchor=(1.01, 1),
                  frameon=False)
    figure.tight_layout()
    return figure
