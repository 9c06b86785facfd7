"""A statement's result printed in the session's format, for the command line and the REPL,
and an internal error as both print it."""
from __future__ import annotations


def print_result(out, result, settings, *, echo: bool = True) -> None:
    """One result in the session's format. A table starts with its statement, which labels
    each result of a script; the REPL passes ``echo=False``, its prompt shows the statement."""
    from diagql.results.render import renderable, to_csv, to_json

    if settings.format == "json":
        # emoji=False: a class name ':smile:' is written as it is, not as an emoji.
        out.print(to_json(result), markup=False, highlight=False, soft_wrap=True, emoji=False)
    elif settings.format == "csv":
        text = to_csv(result)
        if text:
            out.print(text, markup=False, highlight=False, soft_wrap=True, emoji=False)
            out.print()
        # A CSV has no place for them (a checkpoint that could not be read left blank cells
        # and its reason nowhere): each on stderr, one line, as warnings are.
        import sys

        for note in getattr(result, "notes", None) or ():
            print(f"note: {note}", file=sys.stderr)
    else:
        shown = renderable(result, settings.max_rows, echo=echo)
        width = None
        if not out.is_terminal:
            # Piped (a log, a file): as wide as the tables need, never cut to "0.4…" cells nor
            # wrapped mid-number (results/render.py whole_width); the text around them wraps
            # at the pipe's width, and a terminal keeps its own.
            from diagql.results.render import whole_width

            width = whole_width(out, shown)
        if width is not None and width > out.width:  # print() cannot pass the console's width
            before, out.width = out.width, width
            try:
                _print_piped(out, shown)
            finally:
                out.width = before
        elif width is not None:
            _print_piped(out, shown)
        else:
            out.print(shown)
        out.print()


def _print_piped(out, shown) -> None:
    """A table printed to a pipe or a file: its lines without the spaces rich pads each to the
    table's width (a title's line had ended in 34 of them: sweep SY3). Plain text there, with
    no colour codes to keep."""
    with out.capture() as captured:
        out.print(shown)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    out.print(text, markup=False, highlight=False, soft_wrap=True, emoji=False)


def print_internal_error(err, exc: Exception, debug: bool) -> None:
    """A bug (an exception that is no DiagQLError): its traceback with --debug, else one line
    that says how to see it."""
    if debug:
        err.print_exception()
    else:
        err.print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the "
                  f"traceback)", style="red", markup=False, highlight=False, soft_wrap=True)


def discard_unwritten(*consoles) -> None:
    """Drop what an interrupted print left unwritten: Ctrl-C during a long write (a CSV of
    4,704 rows to a terminal) leaves rich's buffer full, and the next statement's print had
    written it again, whole, above its own answer. (rich keeps the buffer per thread, behind
    private names: guarded, so that another rich only keeps what it does.)"""
    for console in consoles:
        try:
            del console._buffer[:]
            console._buffer_index = 0
        except (AttributeError, TypeError):
            pass

