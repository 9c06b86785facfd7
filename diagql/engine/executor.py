"""Plan to Result: batched forward passes with hooks, aggregate states reduced batch by batch
(engine/answers.py turns the states into the Result). Every consumer of a pass is fed rows,
one per item, that its view (model/views.py) made from the module's output inside the hook."""
from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Callable

import numpy as np
import torch

from diagql.engine.aggregates import MeanState, state_for
from diagql.engine.answers import assemble, require_matches
from diagql.engine.nonfinite import NonFinite, refuse
from diagql.engine.planner import Plan
from diagql.errors import ExecutionError
from diagql.model.forward import call_model, to_device
from diagql.model.hooks import Hooks, StopForward, evaluation
from diagql.model.views import ModuleCall, View
from diagql.results.result import Result

_WINNER_RUN = 8192  # items counted by winners at a time: 74 float64 covariates, ~5 MB


class Reducer:
    """A plan's aggregate states (one per group), fed with the activations of its items.

    With GROUP BY, one state of groups × neurons takes every group of a batch in one
    reduction (aggregates.py); ``states`` splits it into one state per group that has items."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.view = plan.bound.view
        self.items = plan.items  # what the states cover (and where group keys are looked up)
        self.wanted = plan.items  # what a forward pass must feed it (less what came from a cache)
        self.keys, self.codes = [None], None  # group keys; each item's row among them
        if plan.group_keys is not None:
            keys, codes = np.unique(plan.group_keys, return_inverse=True)
            self.keys, self.codes = keys.tolist(), torch.from_numpy(codes.astype(np.int64))
        query = plan.query
        # An exact answer has no standard error to compute.
        z = plan.covariates
        self.new_state = functools.partial(
            state_for, query.aggregate, query.order, plan.bound.n_neurons,
            spread=plan.approximate, groups=None if self.codes is None else len(self.keys),
            covariates=0 if z is None else z.width, prediction=plan.prediction,
            directions=plan.directions)
        self.state = self.new_state()
        self.z = z  # the covariates (engine/covariates.py), joined per batch
        self.bad = NonFinite()  # items with NaN or inf activations
        # An assisted mean's fit rows (at most FIT_ROWS) and their weights (engine/leverage.py).
        self.fit = self.weights = None
        if z is not None and isinstance(self.state, MeanState):
            self.fit, self.weights = plan.fit, plan.leverage

    @property
    def states(self) -> dict:
        """One state per group key (None without GROUP BY) that has reduced items."""
        if self.codes is None:
            return {None: self.state} if self.state.count else {}
        counts = self.state.count.tolist()
        return {key: self.state.group(g) for g, key in enumerate(self.keys) if counts[g]}

    def take(self, rows: torch.Tensor, idx: np.ndarray) -> None:
        """Reduce the view's rows of items ``idx`` (sorted, all among the plan's items)."""
        values = self.view.finish(rows.detach())
        codes, fitting = None, {}  # a mean's fit rows and their weights among these
        if self.codes is not None or self.fit is not None or self.weights is not None:
            positions = np.searchsorted(self.items, idx)
            if self.codes is not None:
                codes = self.codes[torch.from_numpy(positions)].to(values.device)
            if self.weights is not None:
                fitting["weights"] = torch.from_numpy(self.weights[positions])
            if self.fit is not None:
                fitting["fit"] = torch.from_numpy(self.fit[positions])
        z = None if self.z is None else torch.from_numpy(self.z.rows(idx))
        if self.state.update(values, codes, z, **fitting):
            return
        # Items whose activations hold NaN or inf: an average over them is NaN or inf and a
        # ranking is meaningless, so they are counted over the whole pass and reported.
        self.bad.add(idx, ~torch.isfinite(values).all(dim=1).cpu().numpy())

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

    def take_winners(self, winners: np.ndarray) -> None:
        """Count every plan item by its winner, ``winners[item]`` (the profile's, kept for
        every item: model/winners.py), in runs whose covariate rows take 1-5 MB."""
        for start in range(0, len(self.items), _WINNER_RUN):
            idx = self.items[start:start + _WINNER_RUN]
            codes = None if self.codes is None else self.codes[start:start + _WINNER_RUN]
            z = None if self.z is None else torch.from_numpy(self.z.rows(idx))
            self.state.add_winners(torch.from_numpy(winners[idx].astype(np.int64)), codes, z)

    def merge(self, other: Reducer) -> Reducer:
        """Take in the states of another Reducer of the same plan, fed with other items (the
        cache's rows and a pass's, or the shards of a pass): as if this one had seen them all."""
        self.state.merge(other.state)
        self.bad.merge(other.bad)
        return self

    def part(self, items: np.ndarray) -> Reducer:
        """An empty Reducer of the same plan fed only ``items`` (a run of ``wanted``), for a
        shard of a pass on another process (engine/shards.py): it carries no plan, only what
        reducing needs (its items' slices of the group codes and the covariates), so it
        pickles small."""
        part = object.__new__(Reducer)
        lo, hi = np.searchsorted(self.items, [items[0], items[-1] + 1]) if len(items) else (0, 0)
        part.plan, part.view, part.new_state = None, self.view, self.new_state
        part.items, part.wanted, part.keys = self.items[lo:hi], items, self.keys
        part.codes = None if self.codes is None else self.codes[lo:hi]
        part.fit = None if self.fit is None else self.fit[lo:hi]
        part.weights = None if self.weights is None else self.weights[lo:hi]
        part.z = None if self.z is None else self.z.subset(items)
        part.state, part.bad = self.new_state(), NonFinite()
        return part

    def check(self) -> None:
        aggregate = getattr(getattr(self.plan, "query", None), "aggregate", None)
        refuse(self.bad, self.view.layer.name, len(self.items), aggregate)


class Collector:
    """Keeps the rows of some items under one view (for the activation cache), as the pass
    gave them: one chunk (the batch's items, their rows) per batch, never copied into one
    table. A table of all the rows would be fresh memory, touched page by page, on the first
    query's critical path (47 MB for 2,500 items of a 4,704-wide layer: 0.03-0.1 s on the
    shared machine); a batch's chunk comes from memory the process has used before whenever
    some was freed (docs/ARCHITECTURE.md, "Plan and execute")."""

    def __init__(self, view: View, items: np.ndarray, dtype: np.dtype):
        self.view = view
        self.items = self.wanted = items
        self.dtype = np.dtype(dtype)
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []  # in item order

    def take(self, rows: torch.Tensor, idx: np.ndarray) -> None:
        values = rows.detach().to("cpu", torch.float64 if self.dtype == np.float64 else
                                  torch.float32)
        if values.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr():
            # Still the module's output: a later in-place op (ReLU(inplace=True)) could
            # overwrite it, so it is copied here, inside the hook.
            values = values.clone(memory_format=torch.contiguous_format)
        self.chunks.append((np.array(idx, dtype=np.int64), values.contiguous().numpy()))

    def part(self, items: np.ndarray) -> Collector:
        """An empty Collector of ``items`` (a run of its own), for a shard of a pass: its rows
        are made where it is fed, so that none travel to the worker."""
        return Collector(self.view, items, self.dtype)

    def merge(self, part: Collector) -> Collector:
        self.chunks.extend(part.chunks)  # shards merge in item order
        return self


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
        self.engine = engine  # a ModelEngine runs passes on a Ray cluster; None: in this process
        self.pass_seconds = 0.0  # its passes', consumers' included: session/growth.py's rounds

    def run(self, consumers: list, description: str) -> float | None:
        """One forward pass over the union of the consumers' items, each consumer fed its
        view's rows of its own items (each view's rows made once per batch): here, or sharded
        over the engine's workers, whose parts of each consumer are merged back in shard
        order (engine/shards.py). Only the consumers' layers are hooked, and the pass stops
        as soon as all of them have run (the rest of the model is skipped). Returns the
        seconds per item it took, less what the consumers spent taking their rows (None: no
        pass): what reading kept rows back would save, which the disk cache weighs against
        reading them (a reader reduces the rows too)."""
        return run_together([(self, consumers)], description)

    def states(self, plan: Plan, description: str, baseline: bool = False) -> dict:
        """One state per group (the key None without GROUP BY), over the plan's items; a
        ``baseline`` (WITH BASELINE's exact side, whose time is the comparison's) passes them
        all, reading no kept rows.

        A sample's items are answered from the activation cache where it can hold them:
        only the items it lacks go through the model (their rows kept as they pass), and a
        query whose states were reduced before (TOPK then AVG, same layer, sample and WHERE)
        reuses them."""
        if plan.from_profile:
            return self._from_profile(plan)
        store = self.activations
        if store is None or baseline:
            reducer = Reducer(plan)
            self.run([reducer], description)
            reducer.check()
            return reducer.states
        # An exact answer over items some of whose rows a sample kept (UNTIL's rounds before
        # "exact cheaper", a FULL after a sample) reads those back and passes the rest,
        # keeping none (only samples are): the merged states are the same sums (with none
        # kept, the pass's alone, merged into empty states).
        known = store.reduced(plan) if plan.approximate else None
        if known is not None:
            return known
        cached, fresh = self._split(plan)
        view = plan.bound.view
        collectors = []
        if plan.approximate and len(fresh.wanted) and store.fits(view, plan.items):
            collectors.append(Collector(view, fresh.wanted, store.dtype))
        per_item = None
        try:
            per_item = self.run([fresh, *collectors], description)
        finally:  # rows that came before a Ctrl-C are kept too: a rerun reads them back
            for collector in collectors:
                store.add_chunks(collector.view, collector.chunks, per_item)
        # Nothing held: the pass's states, as merged into empty ones (8 ms of a conv1 sample's).
        reducer = fresh if cached is None else cached.merge(fresh)
        reducer.check()
        states = reducer.states
        if plan.approximate:
            store.remember(plan, states)
        return states

    def _from_profile(self, plan: Plan) -> dict:
        """The states of a plan whose rows (an ARGMAX: winners) the profile holds: no pass."""
        reducer = Reducer(plan)
        if plan.profile_rows is not None:
            reducer.take_rows(plan.profile_rows, plan.items, plan.items, self.batch_size)
        else:
            reducer.take_winners(plan.profile_winners)
        reducer.check()
        return reducer.states

    def _split(self, plan: Plan) -> tuple[Reducer | None, Reducer]:
        """A sample's states over the rows the activation cache holds (None: none), reduced
        now (before rows a pass keeps can push them out of memory), and a Reducer for a pass
        to feed with the items whose rows it lacks; merged, they cover the plan's items."""
        cached, held = None, []
        for table, positions, items in self.activations.held_rows(plan.bound.view, plan.items):
            cached = cached or Reducer(plan)
            cached.take_rows(table, positions, items, self.batch_size)
            held.append(items)
        fresh = Reducer(plan)
        fresh.wanted = plan.items if not held else \
            np.setdiff1d(plan.items, np.concatenate(held), assume_unique=True)
        return cached, fresh

    def answer_many(self, plans: list[Plan]) -> list:
        """Answer several plans (a script's consecutive queries) with one forward pass over the
        union of their items: a Result, or the ExecutionError of its own, for each plan.

        Every answer is reduced from what this pass and the rows held before it gave, never
        read back from the activation cache afterwards: the rows the pass keeps may push
        others out of memory. The rows kept are those that fit the budget all together."""
        outcomes: list = [None] * len(plans)
        store = self.activations
        # plan position -> (Reducer of rows held before the pass or None, the pass's, baseline's)
        work: dict[int, tuple] = {}
        reused: dict[int, dict] = {}  # plan position -> states an earlier query reduced
        kept: dict[str, tuple] = {}  # view key -> (View, items whose rows are kept)
        for i, plan in enumerate(plans):
            try:
                require_matches(plan)
            except ExecutionError as exc:
                outcomes[i] = exc
                continue
            if plan.from_profile:  # answered from the profile, beside the pass
                try:
                    outcomes[i] = self.answer(plan)
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
        per_item = self.run(consumers + collectors,
                            f"{len(plans)} statement{'s' if len(plans) != 1 else ''} in one pass")
        for collector in collectors:
            store.add_chunks(collector.view, collector.chunks, per_item)
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
        if plan.baseline is not None:
            _warm_model(self)
        query = plan.query
        started = time.perf_counter()
        label = "sampled items" if plan.approximate else "items"
        states = self.states(plan, f"{query.aggregate.upper()} {plan.bound.layer.name} ({label})")
        timings = {"query": time.perf_counter() - started}
        full_states = None
        if plan.baseline is not None:
            started = time.perf_counter()
            full_states = self.states(plan.baseline, f"{query.aggregate.upper()} "
                                                     f"{plan.bound.layer.name} (baseline)",
                                      baseline=True)
            timings["baseline"] = time.perf_counter() - started
        started = time.perf_counter()
        result = assemble(plan, states, full_states, timings)
        # Building the Result: ranking, labels, the accuracy estimate ("estimate", within it).
        result.timings["answer"] = time.perf_counter() - started
        return result


_WARM: "weakref.WeakSet" = weakref.WeakSet()  # models that ran a forward pass in this process


def _warm_model(runner: Runner) -> None:
    """One item through the model, untimed, before a timed comparison: a process's first
    forward pass pays its kernels' set-up (0.9 s for the demo's convolutions), which charged
    to the exact side had made a sample look 130x faster (docs/ARCHITECTURE.md, "Plan and
    execute")."""
    if runner.engine is not None or runner.model in _WARM:
        return
    _WARM.add(runner.model)
    for _, x, _ in runner.source.batches(np.arange(1), 1):
        with evaluation(runner.model), contextlib.suppress(Exception):
            call_model(runner.model, to_device(x, runner.device, runner.dtype))


def run_together(passes: list[tuple[Runner, list]], description: str,
                 after_batch: Callable[[np.ndarray], None] | None = None) -> float | None:
    """One pass over the same batches through several models (``(runner, consumers)`` each:
    its model, device and dtype; the first's data and batch size): each batch goes through
    each model whose consumers want some of its items, in the order given, feeding that
    model's consumers, and then ``after_batch(idx)`` runs, so that a state pairing two models'
    rows of the same items (in the same order) can take them there. A model runs only as far
    as its hooked layers (docs/ARCHITECTURE.md, "plan and execute"). A pass of one model
    whose runner has an engine goes to it (docs/ARCHITECTURE.md, "Engines")."""
    passes = [(runner, [c for c in consumers if len(c.wanted)]) for runner, consumers in passes]
    passes = [(runner, consumers) for runner, consumers in passes if consumers]
    if not passes:
        return None
    started = time.perf_counter()
    if len({id(runner.model) for runner, _ in passes}) < len(passes):
        raise ExecutionError("one pass cannot run two models that are one module: give each "
                             "its own copy (ModelEntry.runner(besides=...))")
    first = passes[0][0]
    items = functools.reduce(np.union1d, [c.wanted for _, consumers in passes
                                          for c in consumers])
    # What the consumers spent taking rows (reducing, keeping), counted apart from the model's
    # own work: reading kept rows back saves only the latter, since a reader reduces them too.
    consumed = [0.0]
    if _on_engine(passes, after_batch):
        first.engine.cluster.feed([(runner.engine.key, runner.dtype, consumers)
                                   for runner, consumers in passes], items, description,
                                  batch_size=first.batch_size, progress=first.progress)
    else:
        with first.progress.task(description, len(items)) as advance:
            _forward([(runner.model, runner.device, runner.dtype, consumers)
                      for runner, consumers in passes], first.source, items, first.batch_size,
                     advance, after_batch, consumed)
    seconds = time.perf_counter() - started
    for runner, _ in passes:
        runner.counters["passes"] = runner.counters.get("passes", 0) + 1
        runner.counters["items"] = runner.counters.get("items", 0) + len(items)
        runner.pass_seconds += seconds
    return (seconds - consumed[0]) / len(items)


def _on_engine(passes: list[tuple[Runner, list]], after_batch) -> bool:
    """Whether the pass runs on the runners' engine: every model's runner has one, the same
    cluster (whose workers hold every model of the connection), no ``after_batch`` (it pairs
    rows of several models batch by batch, here), and every consumer can be cut into parts
    (engine/shards.py): the executor's Reducer and Collector, EVALUATE's group reducer,
    SIMILARITY's feeds, TOPK k INPUTS's reader and the inputs index's builder all can."""
    engines = [runner.engine for runner, _ in passes]
    if after_batch is not None or any(e is None or e.cluster is not engines[0].cluster
                                      for e in engines):
        return False
    return all(hasattr(c, "part") and hasattr(c, "merge")
               for _, consumers in passes for c in consumers)


def feed(models: list[tuple], source, items: np.ndarray, *, batch_size: int, advance) -> None:
    """Feed each consumer its view's rows of its own items, in one forward pass over ``items``
    (the union of their ``wanted``, sorted) in batches of ``batch_size``, each batch through
    each of ``models`` ((model, device, dtype, consumers) each) whose consumers want some of
    it; ``advance(n)`` is told of each batch. The local pass and every Ray worker's shard
    (engine/ray_engine.py) run this same code."""
    _forward(models, source, items, batch_size, advance)


def _forward(models: list[tuple], source, items: np.ndarray, batch_size: int, advance,
             after_batch: Callable[[np.ndarray], None] | None = None,
             consumed: list[float] | None = None) -> None:
    """The pass itself: ``models`` are (model, device, dtype, consumers), each hooked only at
    its consumers' layers, each batch stopping in each model as soon as those have run.
    ``consumed[0]`` adds up the seconds the consumers spent taking their rows."""
    current: list = [None]  # the batch's item indices
    wanted = [functools.reduce(np.union1d, [c.wanted for c in consumers])
              for *_, consumers in models]
    with contextlib.ExitStack() as stack:
        hooks = []
        for model, _, _, consumers in models:
            hooked: list = []
            stack.enter_context(evaluation(model))
            hooked.append(stack.enter_context(
                Hooks(model, _callbacks(consumers, items, current, hooked,
                                        [0.0] if consumed is None else consumed))))
            hooks.append(hooked[0])
        for idx, x, _ in source.batches(items, batch_size):
            current[0] = idx
            for (model, device, dtype, _), model_hooks, own in zip(models, hooks, wanted):
                if len(models) > 1 and not np.isin(idx, own, assume_unique=True).any():
                    continue
                model_x = to_device(x, device, dtype)
                model_hooks.start(model_x, len(idx), peers=hooks)
                try:
                    call_model(model, model_x, idx)
                except StopForward:
                    pass
                model_hooks.check_ran()
            if after_batch is not None:
                after_batch(idx)
            advance(len(idx))


def _callbacks(consumers: list, items: np.ndarray, current: list, hooked: list,
               consumed: list[float]) -> dict:
    """Each hooked module's callback: the rows of each view made once per call, fed to the
    view's consumers for the items of theirs in the batch (``current[0]``, among ``items``,
    the pass's), the seconds they take added to ``consumed[0]``."""
    layers: dict[str, dict[str, tuple[View, list]]] = {}  # layer -> view key -> consumers
    for consumer in consumers:
        views = layers.setdefault(consumer.view.layer.name, {})
        views.setdefault(consumer.view.key, (consumer.view, []))[1].append(consumer)

    def callback(views: dict[str, tuple[View, list]]):
        def on_output(call: ModuleCall) -> None:
            idx = current[0]
            for view, members in views.values():
                rows = view.rows(call)
                started = time.perf_counter()
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
                consumed[0] += time.perf_counter() - started
            if hooked[0].done():  # for a module's n-th call: once that call has run
                raise StopForward
        return on_output

    return {name: callback(views) for name, views in layers.items()}
