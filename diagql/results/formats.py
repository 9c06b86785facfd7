"""The forms a Result is written in, and how many rows a table shows before it counts the rest.

Kept apart from render.py so that the session settings, and so ``diagql --help`` and the REPL's
first prompt, read them without loading rich, numpy or torch."""
from __future__ import annotations

FORMATS = ("table", "json", "csv")
MAX_ROWS = 20


def group_label(key, group_by: str | None, names: list[str] | None) -> str:
    """A group's key as shown: with its class's name where the key is a class (GROUP BY class
    or predicted, a label column) and the classes have names: ``3 cat``."""
    if names and group_by in ("class", "predicted") and isinstance(key, int) and \
            0 <= key < len(names):
        return f"{key} {names[key]}"
    return "" if key is None else str(key)
