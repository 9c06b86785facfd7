"""Plan to Result: batched forward passes with hooks, aggregate states reduced batch by batch
(engine/answers.py turns the states into the Result). Every consumer of a pass is fed rows,
one per item, that its view (model/views.py) made from the module's output inside the hook."""
from __future__ import annotations

import functools
import time

import numpy as np
import torch

from diagql.engine.aggregates import state_for
from diagql.engine.answers import assemble, require_matches
from diagql.engine.planner import Plan
from diagql.errors import ExecutionError
from diagql.model.data import call_model, to_device
from diagql.model.hooks import Hooks, StopForward, evaluation
from diagql.model.views import ModuleCall, View
from diagql.results.result import Result


class Reducer:
    """A plan's aggregate states (one per group), fed with the activations of its items."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.view = plan.bound.view
        self.items = plan.items  # what the states cover (and where group keys are looked up)
        self.wanted = plan.items  # what a forward pass must feed it (less what came from a cache)
        self.keys = plan.group_keys  # each item's group key (None: no GROUP BY)
        query = plan.query
        # An exact answer has no standard error to compute.
        self.new_state = functools.partial(state_for, query.aggregate, query.order,
                                           plan.bound.n_neurons, spread=plan.approximate)
        self.states: dict = {}
        self.bad = 0  # items with NaN or inf activations, and the first of them
        self.first_bad = -1

    def take(self, rows: torch.Tensor, idx: np.ndarray) -> None:
        """Reduce the view's rows of items ``idx`` (sorted, all among the plan's items)."""
        values = self.view.finish(rows.detach())
        if self.keys is None:
            self._update(None, values, idx)
            return
        keys = self.keys[np.searchsorted(self.items, idx)]
        for key in np.unique(keys).tolist():
            mask = keys == key
            self._update(key, values[torch.from_numpy(mask).to(values.device)], idx[mask])

    def _update(self, key, values: torch.Tensor, idx: np.ndarray) -> None:
        if self._state(key).update(values):
            return
        # Items whose activations hold NaN or inf: an average over them is NaN or inf and a
        # ranking is meaningless, so they are counted over the whole pass and reported.
        bad = ~torch.isfinite(values).all(dim=1).cpu().numpy()
        if self.bad == 0:
            self.first_bad = int(idx[np.flatnonzero(bad)[0]])
        self.bad += int(bad.sum())

    def take_rows(self, table: np.ndarray, positions: np.ndarray, items: np.ndarray,
                  batch_size: int) -> None:
        """Reduce cached activations: ``table[positions]`` are the view's rows of ``items``.
        Gathered batch by batch (a run of rows is a view), so no copy of the whole is made."""
        run = len(positions) > 0 and bool(np.all(np.diff(positions) == 1))
        for start in range(0, len(items), batch_size):
            stop = min(start + batch_size, len(items))
            rows = table[positions[start]:positions[start] + stop - start] if run else \
                table[positions[start:stop]]
            self.take(torch.from_numpy(rows), items[start:stop])

    def merge(self, other: Reducer) -> Reducer:
        """Take in the states of another Reducer of the same plan, fed with other items (the
        cache's rows and a pass's, or the shards of a pass): as if this one had seen them all."""
        for key, state in other.states.items():
            if key in self.states:
                self.states[key].merge(state)
            else:
                self.states[key] = state
        if other.bad:
            self.first_bad = other.first_bad if self.bad == 0 else min(self.first_bad,
                                                                         other.first_bad)
            self.bad += other.bad
        return self

    def part(self, items: np.ndarray) -> Reducer:
        """An empty Reducer of the same plan fed only ``items`` (a run of ``wanted``), for a
        shard of a pass on another process (engine/shards.py): it carries no plan, only what
        reducing needs, so it pickles small."""
        part = object.__new__(Reducer)
        lo, hi = np.searchsorted(self.items, [items[0], items[-1] + 1]) if len(items) else (0, 0)
        part.plan, part.view, part.new_state = None, self.view, self.new_state
        part.items, part.wanted = self.items[lo:hi], items
        part.keys = None if self.keys is None else self.keys[lo:hi]
        part.states, part.bad, part.first_bad = {}, 0, -1
        return part

    def _state(self, key):
        if key not in self.states:
            self.states[key] = self.new_state()
        return self.states[key]

    def check(self) -> None:
        if self.bad:
            raise ExecutionError(
                f"layer {self.view.layer.name!r} has NaN or infinite activations for "
                f"{self.bad:,} of {len(self.items):,} items (the first is item "
                f"{self.first_bad}); DiagQL does not average over them")


class Collector:
    """Keeps the rows of some items under one view (for the activation cache)."""

    def __init__(self, view: View, items: np.ndarray, dtype: np.dtype, allocate: bool = True):
        self.view = view
        self.items = self.wanted = items
        self.dtype = np.dtype(dtype)
        self.rows = np.empty((len(items), view.width), dtype=dtype) if allocate else None

    def take(self, rows: torch.Tensor, idx: np.ndarray) -> None:
        if self.rows is None:
            self.rows = np.empty((len(self.items), self.view.width), dtype=self.dtype)
        # Copied here, inside the hook: a later in-place op may overwrite the output.
        values = rows.detach().to("cpu", _torch_dtype(self.dtype))
        self.rows[np.searchsorted(self.items, idx)] = values.numpy()

    def part(self, items: np.ndarray) -> Collector:
        """An empty Collector of ``items`` (a run of its own), for a shard of a pass: its rows
        are made where it is fed, so that none travel to the worker."""
        return Collector(self.view, items, self.dtype, allocate=False)

    def merge(self, part: Collector) -> Collector:
        if part.rows is not None:
            self.rows[np.searchsorted(self.items, part.items)] = part.rows
        return self


def row_dtype(torch_dtype: torch.dtype) -> np.dtype:
    """What cached rows are stored in: float64 for float64 models, else float32 (exact for
    float32, float16 and bfloat16 outputs)."""
    return np.dtype(np.float64) if torch_dtype == torch.float64 else np.dtype(np.float32)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float64 if dtype == np.float64 else torch.float32


def feed(model, source, consumers: list, items: np.ndarray, *, device, dtype, batch_size: int,
         advance) -> None:
    """Feed each consumer its view's rows of its own items, in one forward pass over ``items``
    (the union of their ``wanted``, sorted) in batches of ``batch_size``; ``advance(n)`` is told
    of each batch. Only the consumers' layers are hooked, and each batch stops as soon as all
    of them have run (the rest of the model is skipped). The local pass and every Ray worker's
    shard (engine/ray_engine.py) run this same code."""
    layers: dict[str, dict[str, tuple[View, list]]] = {}  # layer -> view key -> consumers
    for consumer in consumers:
        views = layers.setdefault(consumer.view.layer.name, {})
        views.setdefault(consumer.view.key, (consumer.view, []))[1].append(consumer)
    current: list = [None]  # the batch's item indices

    def callback(views: dict[str, tuple[View, list]]):
        def on_output(call: ModuleCall) -> None:
            idx = current[0]
            for view, members in views.values():
                rows = view.rows(call)
                for consumer in members:
                    wanted = consumer.wanted
                    if len(wanted) == len(items):  # a subset as large as the union is it
                        consumer.take(rows, idx)
                        continue
                    pos = np.minimum(np.searchsorted(wanted, idx), len(wanted) - 1)
                    mask = wanted[pos] == idx
                    if mask.all():
                        consumer.take(rows, idx)
                    elif mask.any():
                        consumer.take(rows[torch.from_numpy(mask).to(rows.device)], idx[mask])
            if hooks.done():  # for a module's n-th call: once that call has run
                raise StopForward
        return on_output

    with evaluation(model), \
            Hooks(model, {name: callback(views) for name, views in layers.items()}) as hooks:
        for idx, x, _ in source.batches(items, batch_size):
            x = to_device(x, device, dtype)
            hooks.start(x, len(idx))
            current[0] = idx
            try:
                call_model(model, x)
            except StopForward:
                pass
            hooks.check_ran()
            advance(len(idx))


class Runner:
    """Everything a forward pass needs from the connection."""

    def __init__(self, model, source, *, device, dtype, batch_size, progress, counters=None,
                 activations=None, engine=None):
        self.model = model
        self.source = source
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.progress = progress
        self.counters = counters if counters is not None else {}
        self.activations = activations  # an ActivationStore, or None: every query streams
        self.engine = engine  # a RayEngine runs passes on a cluster; None: in this process

    def run(self, consumers: list, description: str) -> None:
        """One forward pass over the union of the consumers' items, each consumer fed its
        view's rows of its own items (each view's rows made once per batch): here, or sharded
        over the engine's workers, whose parts of each consumer are merged back in shard
        order (engine/shards.py)."""
        consumers = [c for c in consumers if len(c.wanted)]
        if not consumers:
            return
        items = functools.reduce(np.union1d, [c.wanted for c in consumers])
        if self.engine is not None:
            self.engine.feed(consumers, items, description, batch_size=self.batch_size,
                             dtype=self.dtype, progress=self.progress)
        else:
            with self.progress.task(description, len(items)) as advance:
                feed(self.model, self.source, consumers, items, device=self.device,
                     dtype=self.dtype, batch_size=self.batch_size, advance=advance)
        self.counters["passes"] = self.counters.get("passes", 0) + 1
        self.counters["items"] = self.counters.get("items", 0) + len(items)

    def states(self, plan: Plan, description: str) -> dict:
        """One state per group (the key None without GROUP BY), over the plan's items.

        A sample's items are answered from the activation cache where it can hold them:
        only the items it lacks go through the model (their rows kept as they pass), and a
        query whose states were reduced before (TOPK then AVG, same layer, sample and WHERE)
        reuses them."""
        store = self.activations if plan.approximate else None
        if store is None:
            reducer = Reducer(plan)
            self.run([reducer], description)
            reducer.check()
            return reducer.states
        known = store.reduced(plan)
        if known is not None:
            return known
        cached, fresh = self._split(plan)
        view = plan.bound.view
        collectors = []
        if len(fresh.wanted) and store.fits(view, plan.items):
            collectors.append(Collector(view, fresh.wanted, store.dtype))
        self.run([fresh, *collectors], description)
        for collector in collectors:
            store.add(collector.view, collector.items, collector.rows)
        reducer = cached.merge(fresh)
        reducer.check()
        store.remember(plan, reducer.states)
        return reducer.states

    def _split(self, plan: Plan) -> tuple[Reducer, Reducer]:
        """A sample's states over the rows the activation cache holds, reduced now (before
        rows that a pass keeps can push them out of memory), and a Reducer for a forward pass
        to feed with the items whose rows it lacks; merged, they cover the plan's items."""
        cached = Reducer(plan)
        table, positions, held = self.activations.held_rows(plan.bound.view, plan.items)
        cached.take_rows(table, positions, held, self.batch_size)
        fresh = Reducer(plan)
        fresh.wanted = np.setdiff1d(plan.items, held, assume_unique=True)
        return cached, fresh

    def answer_many(self, plans: list[Plan]) -> list:
        """Answer several plans (a script's consecutive queries) with one forward pass over the
        union of their items: a Result, or the ExecutionError of its own, for each plan.

        Every answer is reduced from what this pass and the rows held before it gave, never
        read back from the activation cache afterwards: the rows the pass keeps may push
        others out of memory. The rows kept are those that fit the budget all together."""
        outcomes: list = [None] * len(plans)
        store = self.activations
        # plan position -> (Reducer over the rows held before the pass or None, Reducer fed by
        # the pass, baseline Reducer or None)
        work: dict[int, tuple] = {}
        reused: dict[int, dict] = {}  # plan position -> states an earlier query reduced
        kept: dict[str, tuple] = {}  # view key -> (View, items whose rows are kept)
        for i, plan in enumerate(plans):
            try:
                require_matches(plan)
            except ExecutionError as exc:
                outcomes[i] = exc
                continue
            base = Reducer(plan.baseline) if plan.baseline is not None else None
            if not plan.approximate or store is None:
                work[i] = (None, Reducer(plan), base)
                continue
            known = store.reduced(plan)
            if known is not None:
                reused[i] = known
                work[i] = (None, None, base)
                continue
            cached, fresh = self._split(plan)
            work[i] = (cached, fresh, base)
            view = plan.bound.view
            items = np.union1d(kept.get(view.key, (view, plan.items[:0]))[1], fresh.wanted)
            if len(fresh.wanted) and store.fits_together({**kept, view.key: (view, items)}):
                kept[view.key] = (view, items)
        collectors = [Collector(view, items, store.dtype) for view, items in kept.values()]
        consumers = [r for _, main, base in work.values() for r in (main, base) if r is not None]
        started = time.perf_counter()
        self.run(consumers + collectors, f"{len(plans)} statements in one pass")
        for collector in collectors:
            store.add(collector.view, collector.items, collector.rows)
        seconds = time.perf_counter() - started
        for i, (cached, main, base) in work.items():
            plan = plans[i]
            if cached is not None:
                main = cached.merge(main)
            try:
                for reducer in (main, base):
                    if reducer is not None:
                        reducer.check()
            except ExecutionError as exc:
                outcomes[i] = exc
                continue
            if i in reused:
                states = reused[i]
            else:
                states = main.states
                if cached is not None:  # a sample's, answered through the activation cache
                    store.remember(plan, states)
            outcomes[i] = assemble(plan, states, None if base is None else base.states,
                                   {"shared_pass": seconds})
        return outcomes

    def answer(self, plan: Plan) -> Result:
        """Run the plan (and its baseline) and assemble the Result with metrics and timings."""
        require_matches(plan)
        query = plan.query
        started = time.perf_counter()
        label = "sampled items" if plan.approximate else "items"
        states = self.states(plan, f"{query.aggregate.upper()} {plan.bound.layer.name} ({label})")
        timings = {"query": time.perf_counter() - started}
        full_states = None
        if plan.baseline is not None:
            started = time.perf_counter()
            full_states = self.states(plan.baseline, f"{query.aggregate.upper()} "
                                                     f"{plan.bound.layer.name} (baseline)")
            timings["baseline"] = time.perf_counter() - started
        return assemble(plan, states, full_states, timings)
