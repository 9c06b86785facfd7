"""The error hierarchy: every mistake a user can make surfaces as a DiagQLError subclass."""
from __future__ import annotations

import functools
import operator
import re
import unicodedata


def _columns(ch: str) -> int:
    """The terminal columns a character takes: 2 for East Asian wide and full-width ones, 0
    for a combining mark, else 1."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


@functools.lru_cache(maxsize=4)
def _lines(source: str) -> list[str]:
    """A script's lines, split once: every error of a long script points into the same text.
    A lone carriage return ends a line too, as the parser reads it (language/parser.py)."""
    return re.split(r"\r\n?|\n", source) if "\r" in source else source.split("\n")


# The most of a source line an error shows: a longer one is shown around the error.
_WIDEST_LINE = 100
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all but tab and newline
# A quoted name this long (a 200,000-character layer name) is shown by its ends. Its quotes
# stand outside words: the apostrophes of "the Dataset's ... transformers' DataCollator" had
# been taken for one, and the advice between them cut out (the sweep SS5).
_LONG_QUOTED = re.compile(r"(?<!\w)'[^'\n]{120,}'(?!\w)")


def _shortened(quoted: re.Match) -> str:
    text = quoted.group(0)[1:-1]
    return f"'{text[:60]}…{text[-20:]}' ({len(text):,} characters)"


def shortened(text: str | None, limit: int = 1000) -> str | None:
    """A statement or source line as an error record gives it: whole up to ``limit``
    characters, else its start and end around how long it is (a 100,000-character name had
    been written whole into each JSON error record, twice)."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit - 100]}…{text[-60:]} ({len(text):,} characters)"


class DiagQLError(Exception):
    """Base class of every error DiagQL raises for a user mistake or an unanswerable query.

    When the error belongs to a place in the query text, ``line`` and ``column`` (1-based) say
    where, ``source`` holds the whole text and ``end_column`` (exclusive) closes the span that
    the caret underlines.
    """

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None,
                 end_column: int | None = None, source: str | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column
        self.end_column = end_column
        self.source = source
        self.hint = hint
        self.statement: str | None = None  # a script's failed statement, where it says which

    def at(self, span) -> "DiagQLError":
        """Placed at ``span`` (the ast's: line, column, end) where the raiser knew no place of
        its own (the binder's or a draw's refusal, a script's statement); one with a place
        keeps it. The caret's end only where the span ends on its first line."""
        if self.line is None and span is not None:
            self.line, self.column = span.line, span.column
            self.end_column = span.end_column if span.end_line == span.line else None
        return self

    def with_source(self, source: str) -> "DiagQLError":
        """Attach the query text if the raiser did not know it (the binder sees only the AST)."""
        if self.source is None:
            self.source = source
        return self

    def source_line(self) -> str | None:
        if self.source is None or self.line is None:
            return None
        lines = _lines(self.source)
        return lines[self.line - 1].rstrip("\r") if 0 < self.line <= len(lines) else ""

    def caret(self) -> str | None:
        """The offending source line with ``^`` markers under the span, or None."""
        text = self.source_line()
        if text is None or self.column is None:
            return None
        if not text.strip():  # an empty statement: nothing to point at
            return None
        start = max(self.column - 1, 0)
        width = max((self.end_column or self.column + 1) - self.column, 1)
        width = min(width, max(len(text) - start, 1))
        if len(text) > _WIDEST_LINE:  # a window of a long line around the span, marked "…"
            first = max(0, min(start - _WIDEST_LINE // 3, len(text) - _WIDEST_LINE))
            last = first + _WIDEST_LINE
            width = min(width, last - start)
            text = ("…" if first else "") + text[first:last] + ("…" if last < len(text) else "")
            start = start - first + (1 if first else 0)
        # A control character (ESC, NUL) shown as '?', one column as in the text: written raw
        # it would reach the terminal as a command.
        text = _CONTROL.sub("?", text)
        # Tabs keep their width on the marker line so the caret lands under the right character,
        # and a wide character (狗, an emoji) takes two columns, a combining mark none (the
        # caret had drifted a column left for each such character before it: sweep OO3).
        pad = "".join("\t" if ch == "\t" else " " * _columns(ch) for ch in text[:start])
        marks = sum(map(_columns, text[start:start + width])) or 1
        return f"{text}\n{pad}{'^' * marks}"

    def shown_message(self) -> str:
        """The message as printed: a quoted text of 120 characters or more shortened (a
        100,000-character token had been written whole)."""
        return _LONG_QUOTED.sub(_shortened, self.message)

    def format(self, filename: str | None = None) -> str:
        """``file:line:col: message``, the source line, a caret, and a hint when there is one."""
        where = []
        if filename:
            where.append(filename)
        if self.line is not None:
            where.append(str(self.line))
            if self.column is not None:
                where.append(str(self.column))
        head = ":".join(where)
        message = self.shown_message()
        out = f"{head}: {self.kind}: {message}" if head else f"{self.kind}: {message}"
        caret = self.caret()
        if caret:
            out += "\n" + "\n".join("    " + part for part in caret.split("\n"))
        if self.hint:
            out += f"\n{self.hint}"
        return out

    kind = "error"

    def __str__(self) -> str:
        if self.line is None:
            return self.message
        return f"{self.message} (line {self.line}, column {self.column})"


class ParseError(DiagQLError):
    """The text is not a valid DiagQL statement."""

    kind = "syntax error"


class IncompleteStatement(ParseError):
    """The text ends where the statement needs more: more text could still make it valid (the
    REPL then waits for the next line instead of reporting the error)."""


class BindError(DiagQLError):
    """The statement is well formed but names something the model, data or registry lacks.

    ``param`` names the sampler parameter at fault, so the binder can underline its argument.
    """

    kind = "error"

    def __init__(self, message: str, *, param: str | None = None, **where):
        super().__init__(message, **where)
        self.param = param


class ExecutionError(DiagQLError):
    """The statement is valid but could not be answered (model raised, no items match, ...)."""

    kind = "error"


class NoMatchError(ExecutionError):
    """No item satisfies the statement's WHERE (on this model: ACROSS CHECKPOINTS leaves that
    checkpoint's cells blank and answers the others)."""


class ItemsElsewhere(ExecutionError):
    """An item that this process does not hold (a Ray Dataset's, read on the workers): what
    only shows items (TOPK k INPUTS's previews) goes without them."""


class WeightsError(DiagQLError):
    """Saved weights that cannot be read or do not fit the model (for a checkpoint: ACROSS
    CHECKPOINTS leaves its cells blank and answers the others)."""


class DiagQLWarning(UserWarning):
    """Something went wrong that DiagQL works around (a damaged or unwritable cache)."""


def warn(message: str) -> None:
    """A DiagQLWarning attributed to the user's line that led to it (``db.query(...)``, a
    script's runner, a notebook cell), the first frame outside DiagQL and the standard
    library's context managers, however deep in DiagQL it is raised."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn's caller
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or frame.f_code.co_filename.endswith("contextlib.py")):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, DiagQLWarning, stacklevel=level)


def whole(value):
    """An integer of any kind (numpy's np.int64 from an array's shape or np.unique) as a
    Python int, which the checks of settings and options take; anything else, bools too,
    as it is."""
    if isinstance(value, bool) or isinstance(value, int):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value

