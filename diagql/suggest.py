"""Did-you-mean suggestions for misspelt names."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'conv2'?"`` when a close match exists, else an empty string."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if name.lower() in lowered and lowered[name.lower()] != name:
        return f"; did you mean {lowered[name.lower()]!r}?"
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    if not close:
        return ""
    if len(close) == 1:
        return f"; did you mean {close[0]!r}?"
    return "; did you mean " + ", ".join(repr(c) for c in close[:-1]) + f" or {close[-1]!r}?"


def name_list(names: list[str], limit: int = 12) -> str:
    """``conv1, conv2, fc1 … (40 more)`` — long lists are cut so messages stay readable."""
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" … ({len(names) - limit} more; SHOW LAYERS lists all)"
