"""The forms a Result is written in, and how many rows a table shows before it counts the rest.

Kept apart from render.py so that the session settings, and so ``diagql --help`` and the REPL's
first prompt, read them without loading rich, numpy or torch."""
from __future__ import annotations

FORMATS = ("table", "json", "csv")
MAX_ROWS = 20
