"""A connection that is still being made: the REPL shows its prompt while the model and data
load in a background thread, and the first use of the connection waits for them."""
from __future__ import annotations

import threading
from typing import Callable


class PendingConnection:
    """Stands in for the Connection ``make()`` returns. Attribute access waits for it; an error
    raised while connecting is raised again at the first use (a DiagQLError stays one)."""

    def __init__(self, make: Callable[[], object], description: str):
        self._description = description
        self._ready = threading.Event()
        self._value = None
        self._error: BaseException | None = None
        self._on_failure: Callable[[], None] | None = None
        thread = threading.Thread(target=self._run, args=(make,), name="diagql-connect",
                                  daemon=True)
        thread.start()

    def _run(self, make) -> None:
        try:
            self._value = make()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever uses the connection
            self._error = exc
        finally:
            self._ready.set()
        if self._error is not None and self._on_failure is not None:
            self._on_failure()

    def on_failure(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the loading thread, or now) once making the connection has
        failed: the REPL ends its prompt then, rather than at the statement typed next."""
        object.__setattr__(self, "_on_failure", callback)
        if self._ready.is_set() and self._error is not None:
            callback()

    def ready(self) -> bool:
        """Whether the connection is made (or failed): using it then waits for nothing."""
        return self._ready.is_set()

    def failed(self) -> bool:
        return self._ready.is_set() and self._error is not None

    def result(self):
        # Event.wait is interruptible, so Ctrl-C while waiting reaches the REPL.
        while not self._ready.wait(0.1):
            pass
        if self._error is not None:
            raise self._error
        return self._value

    def __getattr__(self, name: str):
        return getattr(self.result(), name)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.result(), name, value)

    def __repr__(self) -> str:
        return f"<diagql.Connection {self.summary()}>"

    def summary(self) -> str:
        """The connection's summary once it is made; until then what it is made from."""
        if self._ready.is_set() and self._error is None:
            return self._value.summary()
        return f"connecting to {self._description}"
