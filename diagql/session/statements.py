"""Statement to Result: one handler per kind of statement, dispatched through one table.

A handler that reads the model says so in the table, so that every entry point refuses the
statement in one line when no model is connected, before any work starts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from diagql.engine.answers import record_speedup
from diagql.engine.planner import Plan, plan_query
from diagql.errors import BindError
from diagql.language import ast
from diagql.language.binder import bind_layer, bind_query, require_labels
from diagql.results.result import Result
from diagql.session.settings import Settings
from diagql.suggest import did_you_mean


@dataclass(frozen=True)
class Handler:
    run: Callable  # (conn, statement) -> Result
    needs_model: bool


def run_statement(conn, statement: ast.Statement) -> Result:
    handler = HANDLERS[type(statement)]
    if handler.needs_model:
        conn.require_model()
    return handler.run(conn, statement)


def planned(conn, query: ast.Query) -> tuple[Plan, dict[str, float]]:
    """Bind and plan a query (drawing its sample if need be): the plan and the seconds each
    step took."""
    conn.require_model()
    started = time.perf_counter()
    catalog = conn.catalog  # probed once per model and data, like the profile
    started, probe_seconds = time.perf_counter(), time.perf_counter() - started
    bound = bind_query(query, catalog, n_classes=conn.n_classes, seed=conn.settings.seed,
                       n_items=len(conn.source))
    bound_at = time.perf_counter()
    profile = conn.profile  # after binding, so that a mistake costs no pass over the data
    profiled_at = time.perf_counter()
    if not profile.has_labels:
        require_labels(query)
    sample, sample_seconds = None, 0.0
    if bound.sampler is not None:
        sample, fresh = conn.artifacts.get_sample(bound.sampler)
        sample_seconds = sample.seconds if fresh else 0.0
    planned_at = time.perf_counter()
    plan = plan_query(bound, profile, None if sample is None else sample.indices,
                      None if sample is None else sample.spec)
    return plan, {"bind": bound_at - started, "profile": probe_seconds + profiled_at - bound_at,
                  "sample": sample_seconds, "plan": time.perf_counter() - planned_at}


def _query(conn, query: ast.Query) -> Result:
    plan, timings = planned(conn, query)
    result = conn.runner().answer(plan)
    result.timings.update(timings)
    record_speedup(result)
    return result


def _explain(conn, statement: ast.Explain) -> Result:
    plan, _ = planned(conn, statement.query)
    rows = plan.explain()
    if plan.approximate:
        rows.insert([step for step, _ in rows].index("forward"),
                    ("cache", _cache_detail(conn.activations, plan)))
    return Result(kind="explain", statement=statement.text, title=f"plan: {statement.query.text}",
                  columns=["step", "detail"], rows=rows, plan=plan)


def _cache_detail(store, plan: Plan) -> str:
    layer, view, items = plan.bound.layer, plan.bound.view, plan.items
    held = store.held(view, items)
    if held == len(items):
        return f"all {held:,} items' activations of {layer.name} are cached: no forward pass"
    if store.fits(view, items):
        return (f"{held:,} of {len(items):,} items' activations of {layer.name} are cached; the "
                f"other {len(items) - held:,} go through the model and are kept")
    return (f"{len(items):,} items' activations of {layer.name} exceed the activation cache's "
            f"memory budget: streamed, not kept")


def _set(conn, statement: ast.SetStatement) -> Result:
    name = statement.name
    if name not in Settings.names():
        where = statement.name_span or statement.span
        raise BindError(f"unknown setting {name!r}{did_you_mean(name, Settings.names())}; "
                        f"settings are {', '.join(Settings.names())}",
                        line=where.line, column=where.column, end_column=where.end_column)
    try:
        value = conn.settings.coerce(name, statement.value)
        if name == "latent" and value is not None and conn.model is not None:
            bind_layer(ast.LayerRef(value, span=statement.value_span), conn.catalog)
    except BindError as exc:
        span = statement.value_span
        if exc.line is None and span is not None:
            exc.line, exc.column, exc.end_column = span.line, span.column, span.end_column
        raise
    if name == "latent" and value != conn.settings.latent:
        conn.forget_latent_space()
    setattr(conn.settings, name, value)
    return Result(kind="set", statement=statement.text, columns=["setting", "value"],
                  rows=[(name, "default" if value is None else value)])


def _evaluate(conn, statement: ast.Evaluate) -> Result:
    from diagql.evaluate.evaluation import evaluate_statement

    return evaluate_statement(conn, statement)


def _show(conn, statement: ast.Show) -> Result:
    from diagql.session.show import show

    return show(conn, statement)


def _describe(conn, statement: ast.Describe) -> Result:
    from diagql.session.show import describe

    return describe(conn, statement)


def _top_inputs(conn, statement: ast.TopInputs) -> Result:
    from diagql.session.inputs import run_top_inputs

    return run_top_inputs(conn, statement)


def _clear_cache(conn, statement: ast.ClearCache) -> Result:
    from diagql.session.show import clear_cache

    return clear_cache(conn, statement)


# SHOW needs a model for LAYERS and PROFILE only; those ask for it themselves.
HANDLERS: dict[type, Handler] = {
    ast.Query: Handler(_query, needs_model=True),
    ast.Explain: Handler(_explain, needs_model=True),
    ast.Evaluate: Handler(_evaluate, needs_model=True),
    ast.Describe: Handler(_describe, needs_model=True),
    ast.SetStatement: Handler(_set, needs_model=False),
    ast.Show: Handler(_show, needs_model=False),
    ast.ClearCache: Handler(_clear_cache, needs_model=False),
    ast.TopInputs: Handler(_top_inputs, needs_model=True),
}
