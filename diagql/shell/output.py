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
        out.print(renderable(result, settings.max_rows, echo=echo))
        out.print()
