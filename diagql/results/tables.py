"""rich Tables whose text is shown as written: a class name such as ``a [/]`` or ``:smile:``
is the user's, not rich markup or an emoji code (a ``[/]`` had crashed the table, and
``:smile:`` was printed as an emoji)."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text


def plain(value):
    """A string as a Text (no markup, no emoji codes); anything else as it is."""
    return Text(value) if isinstance(value, str) else value


class PlainTable(Table):
    """A Table whose title, caption, column headers and string cells are plain text."""

    def __init__(self, *headers, title=None, caption=None, **options):
        super().__init__(*map(plain, headers), title=plain(title), caption=plain(caption),
                         **options)

    def add_column(self, header="", *args, **options) -> None:
        super().add_column(plain(header), *args, **options)

    def add_row(self, *cells, **options) -> None:
        super().add_row(*map(plain, cells), **options)
