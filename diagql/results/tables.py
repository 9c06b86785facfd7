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
        if options.get("justify") == "right":  # a number: whole, on one line
            options.setdefault("no_wrap", True)
        super().add_column(plain(header), *args, **options)

    def add_row(self, *cells, **options) -> None:
        super().add_row(*map(plain, cells), **options)


def natural_width(table, console=None, options=None) -> int:
    """The width a table takes where nothing narrows it (on ``console``, else a wide one)."""
    from rich.console import Console
    from rich.measure import Measurement

    if console is None:
        console = Console(width=1 << 16, emoji=False)
    options = options or console.options
    return Measurement.get(console, options.update_width(1 << 16), table).maximum


class FittingTable:
    """A table built for the width it is drawn at (rich gives it at render time): the first
    of ``variants`` (functions making a PlainTable, fullest first) whose natural width fits,
    else the last, which rich then narrows by folding its text. A variant gives up what is
    worth least (a bar, a spread) so that the numbers left stay whole: rich narrows every
    column alike when its text cannot give enough, and a 40- to 100-column table had read
    ``0.…`` in every cell (docs/ARCHITECTURE.md, "Results")."""

    def __init__(self, variants):
        self.variants = list(variants)

    def _table(self, console, options) -> PlainTable:
        for make in self.variants:
            table = make()
            if natural_width(table, console, options) <= options.max_width:
                break
        return table

    def __rich_console__(self, console, options):
        yield self._table(console, options)

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        return Measurement.get(console, options, self._table(console, options))
