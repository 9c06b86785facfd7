"""SIMILARITY's plan to Result: one forward pass hooks every layer named, each batch's rows of
all of them reach one CKA state per group together, and the states become the value or matrix
(docs/ARCHITECTURE.md, "Similarity"). The plan is the query planner's Plan over a
BoundSimilarity: WHERE, GROUP BY, the sample and the baseline select items as for any query."""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from diagql.engine.answers import note_exact_baseline, require_matches
from diagql.engine.cka import MIN_ITEMS, MomentState, RowState, debiased_matrix
from diagql.engine.estimate import COVERS_WHOLE
from diagql.engine.executor import run_together
from diagql.engine.groups import key_order, shown_keys
from diagql.engine.nonfinite import NonFinite
from diagql.engine.planner import Plan
from diagql.errors import ExecutionError
from diagql.language.ast import predicate_text
from diagql.results.result import Estimate, Provenance, Result

# What one statement's CKA states may hold (float64), exact or sampled: past it the statement
# is refused before any pass, naming what it would take.
MEMORY_LIMIT = 4 * 2**30
LEVEL = 0.95
COVERS = ("sampling variance of a uniform sample of the matching items (delete-one jackknife "
          "over the sampled items, finite-population corrected); not a sampler's bias")


def layer_labels(plan: Plan) -> list[str]:
    """Each layer as given, with its TOKENS clause when it has one (``enc TOKEN 0``), and its
    model's name when the layers are several models' (``base.fc2``, ``wide.fc2``)."""
    return [f"{name} {view.text()}".strip()
            for name, view in zip(_layer_names(plan), plan.bound.views)]


def _layer_names(plan: Plan) -> list[str]:
    """Each layer's name, with its model's where the layers are several models'."""
    models = layer_models(plan)
    named = len(set(models)) > 1
    return [f"{model + '.' if named else ''}{view.layer.name}"
            for model, view in zip(models, plan.bound.views)]


def layer_models(plan: Plan) -> list:
    """Each layer's model as the session resolved it (None: the one model)."""
    return [ref.model for ref in plan.bound.query.layers]


def view_ids(plan: Plan) -> list[str]:
    """Each layer's view with its model: one id per distinct (model, view), so that a layer
    named twice is hooked once while base.fc2 and wide.fc2 stay two."""
    return [json.dumps([model, view.key])
            for model, view in zip(layer_models(plan), plan.bound.views)]


class SimilarityReducer:
    """A SIMILARITY plan's CKA states, one per group, fed by one ``Feed`` per distinct view
    (a layer named twice is hooked and copied once). The rows of a batch are held until every
    view has delivered them, then go to the state together."""

    def __init__(self, plan: Plan):
        ids = view_ids(plan)
        keys = list(dict.fromkeys(ids))
        self.views = [plan.bound.views[ids.index(key)] for key in keys]
        self.models = [layer_models(plan)[ids.index(key)] for key in keys]
        self.items = plan.items
        self.group_keys = plan.group_keys  # each item's GROUP BY value (None without)
        self.rows = uses_rows(plan)
        self._start()
        self._part = None  # the part being cut for one shard (part_for), and its items

    def _start(self) -> None:
        self.feeds = [Feed(self, k, view) for k, view in enumerate(self.views)]
        self.pending: list = [None] * len(self.views)
        self.states: dict = {}
        self.bad = [NonFinite() for _ in self.views]  # per view: items it has NaN or inf for

    def part(self, items: np.ndarray) -> SimilarityReducer:
        """An empty reducer of the same views fed only ``items`` (a run of its own), for a
        shard of the pass on another process (engine/shards.py): it carries no plan, only
        the run's group keys, so it pickles small."""
        part = object.__new__(SimilarityReducer)
        lo, hi = np.searchsorted(self.items, [items[0], items[-1] + 1]) if len(items) else (0, 0)
        part.views, part.models, part.rows = self.views, self.models, self.rows
        part.items = items
        part.group_keys = None if self.group_keys is None else self.group_keys[lo:hi]
        part._start()
        part._part = None
        return part

    def part_for(self, items: np.ndarray) -> SimilarityReducer:
        """The one part of a shard that all of the shard's feeds share (``parts_for`` asks
        each feed in turn; they travel in one pickle, so the worker feeds one reducer)."""
        key = (len(items), int(items[0]), int(items[-1])) if len(items) else (0,)
        if self._part is None or self._part[0] != key:
            self._part = (key, self.part(items))
        return self._part[1]

    def merge(self, part: SimilarityReducer) -> SimilarityReducer:
        """Take in a fed part's states, as if this reducer had seen its items."""
        for key, state in part.states.items():
            if key in self.states:
                self.states[key].merge(state)
            else:
                self.states[key] = state
        for mine, theirs in zip(self.bad, part.bad):
            mine.merge(theirs)
        return self

    def put(self, k: int, rows: torch.Tensor, idx: np.ndarray) -> None:
        # A copy: a later in-place op of the model may overwrite this layer's output before
        # the last layer of the batch has run.
        self.pending[k] = (rows.detach().to(torch.float64, copy=True), idx)
        if any(p is None for p in self.pending):
            return
        batch, self.pending = self.pending, [None] * len(self.views)
        if any(not np.array_equal(i, idx) for _, i in batch):
            raise ExecutionError("SIMILARITY's layers were fed different items in one batch")
        values = [r for r, _ in batch]
        if self.group_keys is None:
            self._update(None, values, idx)
            return
        keys = self.group_keys[np.searchsorted(self.items, idx)]
        for key in np.unique(keys).tolist():
            mask = torch.from_numpy(keys == key)
            self._update(key, [v[mask.to(v.device)] for v in values], idx[keys == key])

    def _update(self, key, values: list, idx: np.ndarray) -> None:
        if key not in self.states:
            widths = [view.width for view in self.views]
            self.states[key] = RowState(widths) if self.rows else MomentState(widths)
        if self.states[key].update(*values):
            return
        for bad, v in zip(self.bad, values):
            bad.add(idx, ~torch.isfinite(v).all(dim=1).cpu().numpy())

    def check(self) -> None:
        """Refuse when a layer has NaN or inf for some item, naming those layers only."""
        several = len(set(self.models)) > 1
        for view, model, bad in zip(self.views, self.models, self.bad):
            # Named with its model: SIMILARITY a.2, b.2 had said "layer '2'" of either (SW3).
            name = f"{model}.{view.layer.name}" if several else view.layer.name
            bad.check(f"layer {name!r} has NaN or infinite activations for",
                      len(self.items), "CKA with it over them is undefined")


class Feed:
    """One view's consumer in the Runner's pass: hands its rows to the SimilarityReducer."""

    def __init__(self, reducer: SimilarityReducer, k: int, view):
        self.reducer, self.k, self.view = reducer, k, view
        self.items = self.wanted = reducer.items

    def take(self, rows: torch.Tensor, idx: np.ndarray) -> None:
        self.reducer.put(self.k, rows, idx)

    def part(self, items: np.ndarray) -> Feed:
        """This view's feed of the reducer's part over ``items`` (one part per shard)."""
        return self.reducer.part_for(items).feeds[self.k]

    def merge(self, part: Feed) -> Feed:
        # The feeds of a shard share one part: the first feed takes it in, once.
        if self.k == 0:
            self.reducer.merge(part.reducer)
        return self


def state_floats(plan: Plan) -> tuple[str, int]:
    """Which state answers the plan and the float64 values its states hold: a sample's rows
    (its estimate needs every item's terms), else the cheaper of the rows (each item's once,
    whatever its group) and the moments (every group's own: with GROUP BY class over two
    1,152-wide layers, five groups' moments had been chosen over rows half their size, and
    each batch's update of each group's took 6.4 s against 1.4 s ungrouped)."""
    widths = [view.width for _, view in _distinct_views(plan)]
    rows = RowState.floats(widths, len(plan.items))
    moments = MomentState.floats(widths) * max(len(plan.population), 1)
    if plan.approximate or rows < moments:
        return "rows", rows
    return "moments", moments


def uses_rows(plan: Plan) -> bool:
    return state_floats(plan)[0] == "rows"


def _distinct_views(plan: Plan) -> list[tuple[str, object]]:
    """(the layer's name, with its model's where the layers are several models' (EXPLAIN had
    written "hooks on fc2 (16), fc2 (16)": sweep SY4), its view) of each distinct view."""
    return list(dict(zip(view_ids(plan), zip(_layer_names(plan), plan.bound.views))).values())


def check_memory(plan: Plan) -> None:
    """Refuse, before any pass, a statement whose states would pass MEMORY_LIMIT."""
    for part in (plan, plan.baseline):
        if part is None:
            continue
        form, floats = state_floats(part)
        if floats * 8 > MEMORY_LIMIT:
            what = ("the rows of its items" if form == "rows" else
                    "the cross moments of its layers' features, (Σ widths)²/2 values a "
                    "group")
            raise ExecutionError(
                f"exact CKA here needs {floats * 8 / 2**30:.1f} GiB for {what}, over the "
                f"{MEMORY_LIMIT / 2**30:.0f} GiB limit; name narrower layers (a sequence's "
                f"TOKENS MEAN rather than TOKENS ALL), or ask WHERE fewer items")


def answer_similarity(runner, plan: Plan, runners: dict | None = None) -> Result:
    """Run the plan (and its baseline, in its own pass so that each has its own time).
    ``runners``: each model's Runner when the layers are several models' (the rest run on
    ``runner``); one pass sends each batch through every model, the CKA state taking the rows
    once all of them have delivered the batch's."""
    require_matches(plan)
    check_memory(plan)
    timings = {}
    states = {}
    for part, name in ((plan, "query"), (plan.baseline, "baseline")):
        if part is None:
            continue
        started = time.perf_counter()
        reducer = SimilarityReducer(part)
        label = "sampled items" if part.approximate else ("baseline" if name == "baseline"
                                                          else "items")
        by_model: dict = {}
        for feed, model in zip(reducer.feeds, reducer.models):
            by_model.setdefault(model, []).append(feed)
        passes = [((runners or {}).get(model, runner), feeds)
                  for model, feeds in by_model.items()]
        run_together(passes, f"SIMILARITY {', '.join(layer_labels(part))} ({label})")
        reducer.check()
        states[name] = reducer.states
        # The reducer and its feeds hold each other: their cycle had kept the states' rows
        # (GBs of a wide layer's) until Python's collector ran, past the answer (sweep SX12).
        reducer.feeds, reducer.states = [], {}
        timings[name] = time.perf_counter() - started
    # Each side's time holds its CKA too (a wide layer's Gram over every item is most of it:
    # 1.8 s of 2.5 where its pass took 0.4), not its pass alone.
    started = time.perf_counter()
    result = build_result(plan, states["query"])
    timings["query"] += time.perf_counter() - started
    if plan.baseline is not None:
        started = time.perf_counter()
        result.baseline = build_result(plan.baseline, states["baseline"])
        timings["baseline"] += time.perf_counter() - started
    result.timings.update(timings)
    if plan.baseline is not None:
        compare(plan, result, result.baseline)
    note_exact_baseline(plan, result)
    return result


def build_result(plan: Plan, states: dict) -> Result:
    if plan.query.group_by is None:
        return _single(plan, states.get(None), plan.population[None])
    result = _single(plan, None, sum(plan.population.values()))
    result.groups = {key: _single(plan, states.get(key), plan.population[key])
                     for key in shown_keys(states, plan.population, plan.approximate)}
    result.n_items = sum(g.n_items for g in result.groups.values())
    return result


def _single(plan: Plan, state, population: int) -> Result:
    query = plan.query
    provenance = Provenance(plan.n_data, plan.sampler_spec, plan.n_sample, query.group_by,
                            matching=population if plan.approximate else None)
    result = Result(kind="similarity", statement=query.text, labels=layer_labels(plan),
                    unit=query.measure, provenance=provenance, plan=plan)
    if state is None or state.count == 0:
        return result
    pick = np.ix_(_given_order(plan), _given_order(plan))  # distinct views to layers given
    if plan.approximate and state.count == population:
        # Every matching item sampled: the sample's plain CKA is the exact one.
        matrix = state.matrix()[pick]
        result.estimate = Estimate(COVERS_WHOLE, True, LEVEL, state.count, population,
                                   ci_low=matrix, ci_high=matrix.copy(), exact=True)
    elif plan.approximate:
        rows = state.rows()
        value, low, high = debiased_matrix(rows, population, LEVEL)
        # A view against itself is 1 over any items it varies on, however few (the final
        # model's layer against itself, ACROSS CHECKPOINTS, had read "—" in a group of 4
        # sampled items, and been scored as error 1: the sweep SS5); NaN where its centred
        # rows are all 0, as RowState.matrix's diagonal, without its every pair's Gram.
        own = [1.0 if state.count >= 2 and np.any(x) else np.nan for x in rows]
        for m in (value, low, high):
            np.fill_diagonal(m, own)
        name = plan.bound.sampler.name
        reason = None
        if state.count < MIN_ITEMS:
            reason = (f"{state.count} matching sampled item{'s' if state.count != 1 else ''}: "
                      f"the estimate needs at least {MIN_ITEMS}")
        # The jackknife's model is a uniform sample of the matching items: only a sampler that
        # draws every item with the same probability gives one for any WHERE.
        elif not getattr(plan.bound.sampler, "uniform", False):
            # Its CKA is the favoured items': a sweep's vas samples of a CNN read 0.19-0.27
            # above the matching items' CKA (benchmarks/README.md, eighteenth session).
            size = getattr(plan.bound.sampler, "size", None)
            uniform = f"random({size})" if size is not None else "random"
            reason = (f"{name} does not draw every item with the same probability (it favours "
                      f"{'the mistakes' if name in ('stratified', 'maxmargin') else 'some items'}"
                      f"), so the sample's CKA is theirs, which can be far from the matching "
                      f"items', and the jackknife interval covers the sampling variance of a "
                      f"uniform sample only; USING SAMPLE {uniform} gives an interval, WITH "
                      f"BASELINE the real error")
        result.estimate = Estimate(COVERS, reason is None, LEVEL, state.count, population,
                                   reason, ci_low=low[pick], ci_high=high[pick])
        matrix = value[pick]
    else:
        matrix = state.matrix()[pick]
    result.matrix = matrix
    result.value = float(matrix[0, 1]) if len(matrix) == 2 else None
    result.n_items = state.count
    constant = [label for label, own in zip(result.labels, np.diag(matrix)) if np.isnan(own)]
    # A sample under MIN_ITEMS has its own reason; an exact answer says it even over 1 item.
    if constant and state.count == 1 and not plan.approximate:
        result.notes.append("one matching item: CKA over it is undefined (NaN)")
    elif constant and (state.count >= MIN_ITEMS or not plan.approximate):
        result.notes.append(f"{', '.join(constant)} {'is' if len(constant) == 1 else 'are'} "
                            f"constant over the matching items: CKA with "
                            f"{'it' if len(constant) == 1 else 'them'} is undefined (NaN)")
    return result


def _given_order(plan: Plan) -> list[int]:
    """For each layer as given, the position of its view among the distinct views."""
    ids = view_ids(plan)
    keys = list(dict.fromkeys(ids))
    return [keys.index(key) for key in ids]


def abs_error(approx: Result, exact: Result) -> float:
    """|sampled − exact| CKA: of the one pair, or the mean over the matrix's pairs (each once);
    1 (CKA's range) where the sample has no value: no matching item, or too few for one.
    Pairs whose exact CKA is undefined (a constant layer) are left out."""
    if exact.matrix is None:
        return float("nan")
    upper = np.triu_indices(len(exact.matrix), 1)
    truth = exact.matrix[upper]
    got = approx.matrix[upper] if approx.matrix is not None else np.full(len(truth), np.nan)
    errors = np.where(np.isnan(got), 1.0, np.abs(got - truth))[np.isfinite(truth)]
    return float(errors.mean()) if len(errors) else float("nan")


def compare(plan: Plan, approx: Result, exact: Result) -> None:
    """|sampled − exact| per group and overall (the mean over the groups)."""
    if exact.groups is None:
        approx.metrics["cka_abs_error"] = abs_error(approx, exact)
        return
    approx.groups = approx.groups or {}
    for key, exact_group in exact.groups.items():
        group = approx.groups.setdefault(key, _single(plan, None, 0))
        group.baseline = exact_group
        group.metrics["cka_abs_error"] = abs_error(group, exact_group)
    approx.groups = dict(sorted(approx.groups.items(), key=lambda kv: key_order(kv[0])))
    # A group whose exact CKA is undefined (one item, a constant layer) has no error to average.
    errors = [g.metrics["cka_abs_error"] for g in approx.groups.values()
              if g.baseline is not None and not np.isnan(g.metrics["cka_abs_error"])]
    approx.metrics["cka_abs_error"] = float(np.mean(errors)) if errors else float("nan")


def explain(plan: Plan) -> list[tuple[str, str]]:
    """EXPLAIN SIMILARITY: (step, detail) rows in the order they run."""
    rows = []
    if not plan.approximate:
        rows.append(("scan", f"all {plan.n_data:,} items (USING FULL)"))
    else:
        rows.append(("sample", f"{plan.sampler_spec}: {plan.n_sample:,} of {plan.n_data:,} "
                               f"items, drawn in the latent space"))
    query = plan.query
    where = "WHERE " + predicate_text(query.where, plan.class_names) \
        if query.where is not None else "no predicate"
    rows.append(("filter", f"{where} on the profile → {len(plan.items):,} items"))
    views = _distinct_views(plan)
    hooks = ", ".join(f"{name} ({v.layer.shape_text()})" for name, v in views)
    rows.append(("forward", f"{len(plan.items):,} items in batches, one pass, hooks on {hooks}; "
                            f"the pass stops once the last has run"))
    for name, view in views:
        rows.append(("per item", f"{name}: {view.text() + ': ' if view.text() else ''}"
                                 f"{view.describe()} → {view.width:,} values"))
    rows.append(("measure", _measure_text(plan) + (f", per {query.group_by}"
                                                   if query.group_by else "")))
    rows.append(("cost", f"≈ {plan.estimated_seconds():.3g} s (from the profile pass)"))
    if plan.baseline is not None:
        rows.append(("baseline", f"exact CKA over {len(plan.baseline.items):,} items ("
                                 f"{_state_text(plan.baseline)}), its own pass, ≈ "
                                 f"{plan.baseline.estimated_seconds():.3g} s"))
    elif query.baseline:
        rows.append(("baseline", "none: the answer is exact already"))
    return rows


def _state_text(plan: Plan) -> str:
    form, floats = state_floats(plan)
    size = f"{floats * 8 / 2**20:,.1f} MiB"
    if form == "rows":
        return f"the items' rows held, {size}"
    return f"feature-space cross moments, {size} whatever the number of items"


def _measure_text(plan: Plan) -> str:
    pairs = "every pair of layers" if len(plan.bound.views) > 2 else "the two layers"
    if plan.approximate:
        return (f"linear CKA of {pairs} over the matching items, estimated from the sample "
                f"(each HSIC unbiased for them) with a {LEVEL:.0%} jackknife interval, from "
                f"{_state_text(plan)}")
    return f"exact linear CKA of {pairs} from {_state_text(plan)}"
