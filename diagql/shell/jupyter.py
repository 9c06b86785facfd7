"""The IPython extension, as jupysql's and DuckDB's magics work: ``%load_ext diagql`` registers
``%diagql STATEMENT`` (a line) and ``%%diagql [connection]`` (a cell, a whole script), which
run over a Connection in the notebook's namespace: the one the cell names, else the only one
there. The last Result is the cell's value and renders as HTML (tables, heat maps,
thumbnails); earlier ones are displayed as they come; a DiagQL error fails the cell, shown
with its caret and no traceback (IPython's UsageError).
"""
from __future__ import annotations

import re

NO_CONNECTION = ("no DiagQL connection in the notebook: make one first, e.g. "
                 "db = diagql.connect(model, data) or db = diagql.demo()")


def load_ipython_extension(ipython) -> None:
    """Called by ``%load_ext diagql`` (through the package's lazy attribute)."""
    ipython.register_magic_function(_magic(ipython), magic_kind="line_cell",
                                    magic_name="diagql")


def _magic(ipython):
    def diagql(line: str, cell: str | None = None):
        """%diagql [connection] STATEMENT, or %%diagql [connection] over a cell's script."""
        namespace = ipython.user_ns
        if cell is None:
            name, text = _named(line, namespace)
        else:
            name, rest = _named(line, namespace)
            if rest.strip():
                from IPython.core.error import UsageError

                raise UsageError(f"%%diagql takes a connection's name on its line, not "
                                 f"{rest.strip()!r}; the statements go in the cell")
            text = cell
        return run(connection(namespace, name), text)

    return diagql


def _named(line: str, namespace: dict) -> tuple[str | None, str]:
    """(the connection's name, the rest) when the line starts with a connection's name."""
    match = re.match(r"\s*([A-Za-z_]\w*)\s*(.*)", line, flags=re.S)
    if match and _is_connection(namespace.get(match.group(1))):
        return match.group(1), match.group(2)
    return None, line


def _is_connection(value) -> bool:
    from diagql.session.connection import Connection

    return isinstance(value, Connection)


def connection(namespace: dict, name: str | None):
    """The named Connection, else the only one in the namespace (UsageError otherwise)."""
    from IPython.core.error import UsageError

    if name is not None:
        return namespace[name]
    found = sorted(key for key, value in namespace.items()
                   if not key.startswith("_") and _is_connection(value))
    if not found:
        raise UsageError(NO_CONNECTION)
    if len({id(namespace[key]) for key in found}) > 1:
        raise UsageError(f"several DiagQL connections in the notebook ({', '.join(found)}): "
                         f"name one, e.g. %%diagql {found[0]}")
    return namespace[found[0]]


def run(conn, text: str):
    """Every statement's Result displayed, the last one returned; an error raised as IPython's
    UsageError, which shows its caret without a traceback and fails the cell (a notebook run
    in CI stops there, as at any failing cell)."""
    from IPython.core.error import UsageError
    from IPython.display import display

    from diagql.errors import DiagQLError

    last = None
    for outcome in conn.run_script(text):
        if isinstance(outcome, DiagQLError):
            if last is not None:
                display(last)
            raise UsageError(outcome.format())
        if last is not None:
            display(last)
        last = outcome
    return last
