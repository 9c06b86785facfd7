"""The forms a Result is written in, and how many rows a table shows before it counts the rest.

Kept apart from render.py so that the session settings, and so ``diagql --help`` and the REPL's
first prompt, read them without loading rich, numpy or torch."""
from __future__ import annotations

import math
import re

FORMATS = ("table", "json", "csv")
MAX_ROWS = 20


def group_label(key, group_by: str | None, names: list[str] | None) -> str:
    """A group's key as shown: with its class's name where the key is a class (GROUP BY class
    or predicted, a label column) and the classes have names: ``3 cat``."""
    if names and group_by in ("class", "predicted") and isinstance(key, int) and \
            0 <= key < len(names):
        return f"{key} {names[key]}"
    return "" if key is None else str(key)


def key_columns(column: str, key, names: list[str] | None) -> dict:
    """A record's key as columns: ``{"class": 3}``, with ``"class_name": "cat"`` beside it
    where the key is a named class, as the table's ``3 cat`` shows it (records had carried
    the bare index: sweep SW9)."""
    out = {column: key}
    if names and column in ("class", "predicted", "label") and isinstance(key, int) and \
            0 <= key < len(names):
        out[f"{column}_name"] = names[key]
    return out


def probability_text(p) -> str:
    """A probability (an item's confidence) as shown: 3 decimals, or 3 significant digits
    under 0.001, where a 50,257-token vocabulary's predictions all lie (its softmax's top is
    at least 1/50,257): ``0.000`` had read as no confidence at all."""
    p = float(p)
    return f"{p:.2e}" if 0 < abs(p) < 1e-3 else f"{p:.3f}"


def items_text(result) -> str:
    """A caption's first part: the matching items (a sample's of the data's, Provenance)."""
    if result.provenance is not None:
        return result.provenance.matched(result.n_items)
    return f"{result.n_items:,} matching item{'' if result.n_items == 1 else 's'}"


def none_sampled(matching: int) -> str:
    """A group's cell when a sample holds none of its ``matching`` items (at least one)."""
    return f"none of its {matching:,} matching items sampled" if matching > 1 else \
        "its one matching item not sampled"


def reasons_text(reasons: list[str]) -> str:
    """Why groups have no estimate, each kind once with its count of groups (one group's
    reason had stood for all: a group of 1 sampled item said to have none sampled, the sweep
    SS3); a group's count of data items is left out where several share a reason."""
    if len(reasons) == 1:
        return reasons[0]
    kinds: dict[str, int] = {}
    for reason in reasons:
        kind = re.sub(r" \([\d,]+ in the data\)$", "", reason)
        kinds[kind] = kinds.get(kind, 0) + 1
    return "; ".join(f"{kind} ({n} group{'' if n == 1 else 's'})" for kind, n in kinds.items())


BAR_WIDTH = 12  # a bar's characters at the largest value


def bar(value: float, top: float):
    """A value's bar (rich Text), BAR_WIDTH characters at ``top``."""
    from rich.text import Text

    if top <= 0 or not math.isfinite(value):
        return Text("")
    filled = round(BAR_WIDTH * max(float(value), 0.0) / top)
    return Text("█" * filled, style="green")


def number(value, places: int = 4) -> str:
    value = float(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.{places}f}"
    return f"{value:.{places - 1}e}"


def number_or_dash(value: float, places: int = 4) -> str:
    """A number as a table shows it; an undefined one (NaN: a group's CKA over too few items)
    a dash."""
    return "—" if math.isnan(value) else number(value, places)


class Percent(float):
    """A share a table shows as a percentage (79.5%); JSON and CSV carry the number (0.795)."""


class Probability(float):
    """A probability a table shows as ``probability_text`` does (0.355, 1.99e-05); JSON and
    CSV carry the number (SHOW PROFILE's mean confidence had been a string there: SX11)."""


class Count(int):
    """A count a table shows with thousands separators (61,706); JSON and CSV, the integer."""


class Bytes(int):
    """A size a table shows in units (2.3 MB); JSON and CSV, the bytes."""


def size_text(size: int) -> str:
    """Bytes in the largest unit they fill: 2.3 MB."""
    for unit, scale in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("kB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def cell_text(value) -> str:
    """A table cell as shown: typed numbers (``Percent``, ``Probability``, ``Count``,
    ``Bytes``) in their form, other floats to four places."""
    if isinstance(value, Percent):
        return f"{value:.1%}"
    if isinstance(value, Probability):
        return probability_text(value)
    if isinstance(value, Count):
        return f"{value:,}"
    if isinstance(value, Bytes):
        return size_text(value)
    if isinstance(value, float):
        return number(value)
    return "" if value is None else str(value)


def frame_of(pd, records: list[dict]):
    """The pandas DataFrame of a Result's records. Whole numbers with gaps (a group the sample
    drew none of: its neuron empty) stay whole, pandas' nullable Int64, not float64's 3.0
    (sweep OO3)."""
    frame = pd.DataFrame.from_records(records)
    for column in frame.columns:
        present = [row[column] for row in records if row.get(column) is not None]
        if present and frame[column].dtype.kind == "f" and all(type(v) is int for v in present):
            frame[column] = frame[column].astype("Int64")
        elif not present and frame[column].dtype == object:
            # Every cell empty (a SIMILARITY whose every CKA is undefined): missing numbers,
            # not objects that round() and idxmax() refuse (SW9).
            frame[column] = frame[column].astype("float64")
    return frame
