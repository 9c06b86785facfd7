"""A statement's result printed in the session's format, for the command line and the REPL."""
from __future__ import annotations


def print_result(out, result, settings, *, echo: bool = True) -> None:
    """One result in the session's format. A table starts with its statement, which labels
    each result of a script; the REPL passes ``echo=False``, its prompt shows the statement."""
    from diagql.results.render import renderable, to_csv, to_json

    if settings.format == "json":
        out.print(to_json(result), markup=False, highlight=False, soft_wrap=True)
    elif settings.format == "csv":
        text = to_csv(result)
        if text:
            out.print(text, markup=False, highlight=False, soft_wrap=True)
            out.print()
    else:
        shown = renderable(result, settings.max_rows, echo=echo)
        width = None
        if not out.is_terminal:
            # Piped (a log, a file): as wide as the table needs, never cut to "0.4…" cells nor
            # wrapped mid-number; a terminal keeps its own width.
            from rich.measure import Measurement

            width = max(out.width, Measurement.get(out, out.options, shown).maximum)
        out.print(shown, width=width)
        out.print()
