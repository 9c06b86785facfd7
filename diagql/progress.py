"""Progress bars for long work: rich bars on a terminal, silence when piped or disabled."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

# Work shorter than this never shows a bar, so quick queries do not flicker.
_SHOW_AFTER_SECONDS = 0.5


def import_rich() -> None:
    """Import rich with the user's Python ``random`` stream put back: rich's style module
    draws from the global ``random`` when first imported (a counter seeded by getrandbits),
    which moved a notebook's seeded stream at DiagQL's first bar or table. Called when a
    connection is first made; the command line's help never imports rich."""
    if "rich.style" in sys.modules:
        return
    import importlib
    import random

    state = random.getstate()
    try:
        importlib.import_module("rich.style")
    finally:
        random.setstate(state)


class Progress:
    """Hands out ``advance(n)`` callbacks; draws only when enabled and on a terminal."""

    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled if enabled is not None else _isatty(self.stream)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        started = time.perf_counter()
        bar: RichProgress | None = None
        task_id = None
        done = 0

        def advance(n: int) -> None:
            nonlocal bar, task_id, done
            done += n
            if bar is None:
                if time.perf_counter() - started < _SHOW_AFTER_SECONDS:
                    return
                bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                   MofNCompleteColumn(), TaskProgressColumn(),
                                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                   console=Console(file=self.stream), transient=True)
                bar.start()
                task_id = bar.add_task(description, total=total, rate="")
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(task_id, completed=done, rate=f"{done / elapsed:,.0f} items/s")

        try:
            yield advance
        finally:
            if bar is not None:
                bar.stop()


    @contextlib.contextmanager
    def live(self) -> Iterator[Callable[[object], None]]:
        """``show(renderable)`` redraws one display in place (a table refining as its sample
        grows); on a terminal only, and cleared at the end, where the final answer is printed."""
        if not self.enabled:
            yield lambda renderable: None
            return
        from rich.console import Console
        from rich.live import Live

        with Live(console=Console(file=self.stream), transient=True,
                  refresh_per_second=8) as display:
            yield display.update


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
