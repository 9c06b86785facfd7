"""How long the profile pass took, less DiagQL's own work in it, and how far into each batch
every layer it hooks had its output ready (docs/ARCHITECTURE.md, "Plan and execute": USING
AUTO's exact pass, and "Engines": the profile's time). A query's pass stops once its layers
have run (engine/executor.py's early exit), so an exact answer on an early layer costs that
share of the pass: on an MLP whose second Linear holds most of its work, an exact pass on
its first ReLU took 0.03 s where the whole pass foretold 0.095 s, and USING AUTO and UNTIL
had chosen samples dearer than the exact answer."""
from __future__ import annotations

import time
from collections.abc import Callable


class PassClock:
    """The seconds of a pass less DiagQL's own (``own``: its hooks' work, timed by
    ``timed``, and what the caller adds after each forward), and per hooked layer the seconds
    until its output was ready, summed over the batches (``reached``); each batch's reading of
    the data counts in both, as every pass reads its items."""

    def __init__(self):
        self.began = time.perf_counter()
        self.own = 0.0
        self.reached: dict[str, float] = {}
        self._batch = self.began  # when this batch's reading began
        self._own_then = 0.0  # ``own`` at that moment

    def timed(self, name: str, callback: Callable) -> Callable:
        """``callback`` with its seconds counted as DiagQL's own, and the moment it was
        called counted as ``name``'s output ready."""
        def timed(call) -> None:
            started = time.perf_counter()
            self.reached[name] = self.reached.get(name, 0.0) + \
                started - self._batch - (self.own - self._own_then)
            try:
                callback(call)
            finally:
                self.own += time.perf_counter() - started
        return timed

    def next_batch(self) -> None:
        """The next batch's reading begins now."""
        self._batch, self._own_then = time.perf_counter(), self.own

    def seconds(self) -> float:
        """The pass's seconds so far, less DiagQL's own."""
        return max(time.perf_counter() - self.began - self.own, 0.0)


def merged(parts) -> dict:
    """``Profile``'s ``pass_seconds`` and ``reached`` (each layer's share of the pass when its
    output was ready) from the profile parts of one pass (a local pass's two, a Ray pass's
    shards), each with its ``pass_seconds`` and ``reached`` seconds: the layers every part
    timed, as a share of all the parts' seconds together."""
    total = sum(part.pass_seconds for part in parts)
    names = set.intersection(*(set(part.reached) for part in parts)) if parts else set()
    reached = {name: min(sum(part.reached[name] for part in parts) / total, 1.0)
               for name in sorted(names)} if total > 0 else {}
    return {"pass_seconds": total, "reached": reached}
