"""Statement to Result: one handler per kind of statement, dispatched through one table.

A handler that reads the model says so in the table, so that every entry point refuses the
statement in one line when no model is connected, before any work starts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

from diagql.engine.answers import record_speedup, require_matches
from diagql.engine.planner import Plan, plan_query
from diagql.engine.similarity import explain as explain_similarity
from diagql.errors import BindError, DiagQLError, ExecutionError
from diagql.language import ast
from diagql.language.binder import (bind_layer, bind_query, bind_similarity, bind_view,
                                    require_labels)
from diagql.results.result import Result
from diagql.session.artifacts import keep_in_use
from diagql.session.changes import batch_size_changed
from diagql.session.checkpoints import FINAL
from diagql.session.models import name_model, sampling_source, with_model
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
    try:
        return handler.run(conn, statement)
    finally:
        for entry in conn.models.values():
            keep_in_use(entry.artifacts)


def planned(conn, query: ast.Query | ast.Similarity) -> tuple[Plan, dict[str, float]]:
    """Bind and plan a query (drawing its sample if need be): the plan and the seconds each
    step took. The plan's ``query.layer.model`` names the model whose layer it reads."""
    conn.require_model()
    if isinstance(query, ast.Similarity):
        return _planned_similarity(conn, query)
    started = time.perf_counter()
    src = sources(conn, query)
    query, entry = src.query, src.entry
    catalog = entry.catalog  # probed once per model and data, like the profile
    started, probe_seconds = time.perf_counter(), time.perf_counter() - started
    with entry.naming():
        bound = bind_query(query, catalog, n_classes=entry.n_classes, seed=conn.settings.seed,
                           n_items=len(conn.source), has_labels=conn.source.labelled())
    bound_at = time.perf_counter()
    # After binding, so that a mistake costs no pass over the data (sources() says whose).
    profile, src = _reader_profile(src)
    profiled_at = time.perf_counter()
    if not profile.has_labels:
        require_labels(query)
    choice, chosen_seconds = "", 0.0
    if isinstance(query.source, ast.Auto) and query.until is None:
        from diagql.session.auto import choose

        bound, choice, chosen_seconds = choose(conn, bound, profile, src)
    elif query.until is not None:
        from diagql.session.growth import first_round

        bound, choice, chosen_seconds = first_round(conn, bound, profile, src)
    unchecked = _unchecked(src, bound.sampler)
    if unchecked and query.until is not None and query.until.target is not None:
        # Its rounds would grow, unable to tell the target met, until exact is cheaper.
        span = query.until.span
        raise BindError(f"UNTIL {query.until.target.text()} grows the sample until its "
                        f"estimate meets the target, and here there is none: {unchecked}",
                        **({} if span is None else {"line": span.line, "column": span.column,
                                                    "end_column": span.end_column}))
    sample, sample_seconds = _draw(src.sampling, bound.sampler, query.source)
    planned_at = time.perf_counter()
    plan = plan_query(bound, profile, None if sample is None else sample.indices,
                      None if sample is None else with_model(sample.spec, src.drawn_on),
                      conn.settings.estimator, rows_from_profile=src.own,
                      unran=_unran(src, profile))
    plan = _named(plan, _names(conn), choice=choice, unchecked=unchecked)
    return plan, {"bind": bound_at - started, "profile": probe_seconds + profiled_at - bound_at,
                  "sample": sample_seconds + chosen_seconds,
                  "plan": time.perf_counter() - planned_at}


def _unchecked(src, sampler) -> str:
    """Why a sample's estimate of another model's layer is not given (docs/ARCHITECTURE.md,
    "Estimates"): a sampler that draws unevenly on one model's profile leaves the fit on
    that model's latent to extrapolate another model's layer, and nothing the profile holds
    checks that fit (a sweep's second MLP's logits under gmm, weighted and ebtree: coverage
    0.69-0.78, expected cosine a third of the actual). A checkpoint's layer is read on its
    own final model's sample, which is checked as that model's own (0.87-0.99)."""
    entry, sampling = src.entry, src.sampling
    if sampler is None or getattr(sampler, "uniform", False) or entry is sampling or \
            entry.is_checkpoint or sampling.is_checkpoint:
        return ""
    return (f"{sampler.name} draws unevenly, on {sampling.name}'s profile, and a fit on "
            f"{sampling.name}'s latent cannot be checked on {entry.name}'s layers; draw the "
            f"sample on {entry.name} for an estimate ({sampler.name}(..., model={entry.name}))")


@dataclass(frozen=True)
class Sources:
    """Where a query's parts come from when the connection has several models."""

    query: ast.Query  # its layer resolved to (model, layer), its sampler call without model=
    entry: object  # the ModelEntry whose layer it reads
    sampling: object  # the ModelEntry whose profile its sample is drawn from
    drawn_on: str | None  # the sampler's model= parameter
    reader: object  # the ModelEntry whose profile plans it

    @property
    def own(self) -> bool:
        """Whether the profile that plans it is its layer's model's: only then may its latent
        and logit rows answer the layer (another model's fc2 rows are not this one's)."""
        return self.reader is self.entry


def sources(conn, query: ast.Query) -> Sources:
    entry, layer = conn.resolve(query.layer)
    source, sampling, drawn_on = sampling_source(conn, query.source)
    query = replace(query, layer=layer, source=source)
    # The labels are the data's: a query that reads no prediction is planned on a profile the
    # statement needs anyway, so that a checkpoint's query over a sample costs no pass over
    # all the data.
    reader = entry if reads_predictions(query) else sampling
    return Sources(query, entry, sampling, drawn_on, reader)


def _unran(src: Sources, profile) -> tuple:
    """The layers of the query's model that did not run in some batch of a profile pass
    (``Profile.unran``): its own profile's, planning the query or held; for a checkpoint
    planned on its final model's, that one's (one architecture: a loop over the padded length
    runs as often whatever the weights); none known otherwise (another model's profile
    computed only for this would cost the pass a sample saves)."""
    if src.own:
        return profile.unran
    held = src.entry.artifacts.profile
    if held is not None:
        return held.unran
    if src.entry.is_checkpoint and src.reader.architecture() is src.entry.architecture():
        return profile.unran
    return ()


def _reader_profile(src: Sources) -> tuple:
    """The profile that plans the query, and its Sources. Without a sample, another model's
    profile only stands in for the layer's own (the labels are the data's): when that one
    fails (the default model's classes do not fit the labels), the layer's own model's is
    read, so that one model's mistake does not fail queries on the others."""
    try:
        return src.reader.profile, src
    except DiagQLError:
        if src.reader is src.entry or not isinstance(src.query.source, ast.Full):
            raise
    src = replace(src, reader=src.entry)
    return src.entry.profile, src


def _draw(entry, sampler, call=None):
    """The sample of ``sampler`` (None: no sample) on ``entry``'s profile, and the seconds its
    draw took now (0 when it was drawn before). ``call``: the statement's USING SAMPLE, where
    a draw's refusal is placed (maxmargin on data of one class had none: SW4)."""
    if sampler is None:
        return None, 0.0
    try:
        sample, fresh = entry.artifacts.get_sample(sampler)
    except DiagQLError as exc:
        raise exc.at(getattr(call, "span", None))
    return sample, sample.seconds if fresh else 0.0


def _planned_similarity(conn, statement: ast.Similarity) -> tuple[Plan, dict[str, float]]:
    """SIMILARITY's plan: each layer bound on its model's catalog (``wide.fc2``), the items
    from the default model's profile and sample (or the sampler's ``model=``'s)."""
    started = time.perf_counter()
    resolved = [conn.resolve(ref) for ref in statement.layers]
    source, entry, drawn_on = sampling_source(conn, statement.source)
    statement = replace(statement, layers=tuple(ref for _, ref in resolved), source=source)
    reader = entry
    if reads_predictions(statement):  # the first layer's model's predictions, as a query's
        reader = resolved[0][0]
    # Its classes bound WHERE predicted = k: the sampling model's had refused a 6-class
    # model's class 4 as outside 0..3 (sweep MM3).
    bound = bind_similarity(statement, entry.catalog, n_classes=reader.n_classes,
                            seed=conn.settings.seed, n_items=len(conn.source),
                            catalogs=[own.catalog for own, _ in resolved],
                            has_labels=conn.source.labelled())
    bound_at = time.perf_counter()
    try:
        profile = reader.profile  # after binding, so that a mistake costs no pass over the data
    except DiagQLError:
        # Without a sample or a prediction read, any of the layers' models' profiles gives
        # the items and groups (the labels are the data's): one that loads stands in.
        own = [model for model, _ in resolved if model is not entry]
        if not own or not isinstance(statement.source, ast.Full) or reads_predictions(statement):
            raise
        entry = reader = own[0]
        profile = entry.profile
    profiled_at = time.perf_counter()
    if not profile.has_labels:
        require_labels(statement)
    sample, sample_seconds = _draw(entry, bound.sampler, statement.source)  # the sampling model's
    planned_at = time.perf_counter()
    plan = plan_query(bound, profile, None if sample is None else sample.indices,
                      None if sample is None else with_model(sample.spec, drawn_on), None,
                      rows_from_profile=False)
    plan = _named(plan, _names(conn), explainer=explain_similarity)
    return plan, {"bind": bound_at - started, "profile": profiled_at - bound_at,
                  "sample": sample_seconds, "plan": time.perf_counter() - planned_at}


def _named(plan, names, **changes):
    """The plan, and its baseline's (whose WHERE a message may write too), with the
    connection's class names."""
    baseline = None if plan.baseline is None else replace(plan.baseline, class_names=names)
    return replace(plan, class_names=names, baseline=baseline, **changes)


def _names(conn) -> tuple | None:
    """The classes' names a plan writes its WHERE by (EXPLAIN, messages), if they have any."""
    names = getattr(conn, "class_names", None)
    return tuple(names) if names else None


def reads_predictions(query: ast.Query) -> bool:
    """Whether a query depends on its model's predictions (WHERE on predicted, confidence or
    correctness; GROUP BY predicted or correct), not just on the data's labels."""
    fields = {getattr(node, "field", None) for node in
              (ast.walk(query.where) if query.where is not None else ())}
    flags = query.where is not None and any(isinstance(node, ast.Flag)
                                            for node in ast.walk(query.where))
    return flags or bool(fields & {"predicted", "confidence"}) or \
        query.group_by in ("predicted", "correct")


def _query(conn, query: ast.Query) -> Result:
    if query.across is not None:
        from diagql.session.across import across_checkpoints

        return across_checkpoints(conn, query, answer_query)
    result = answer_query(conn, query)
    result.class_names = conn.class_names
    return name_model(conn, result, result.plan.query.layer.model)


def answer_query(conn, query: ast.Query) -> Result:
    """A query's Result on the model its layer names (its labels without the model's name)."""
    plan, timings = planned(conn, query)
    if query.until is not None:
        from diagql.session.growth import grow

        result = grow(conn, plan, timings, sources(conn, query))
        record_speedup(result)
        _note_batch_dependence(conn, plan, result)
        return result
    result = conn.on(plan.query.layer.model).runner().answer(plan)
    result.timings.update(timings)
    record_speedup(result)
    _note_batch_dependence(conn, plan, result)
    return result


def _note_batch_dependence(conn, plan, result: Result) -> None:
    """A note on an answer whose pass ran some items only, batched among themselves, of a
    model whose outputs depend on the batch (model/repeatable.py): its WHERE's exact answer
    had read "exact" beside an eval loop's up to 4.6 away (sweep SS7, BatchNorm with batch
    statistics), with the warning said once per session."""
    if plan.from_profile or (not plan.approximate and plan.query.where is None) or \
            not conn.on(plan.query.layer.model).catalog.batch_dependent:
        return
    which = "sampled matching items" if plan.approximate else "matching items"
    result.notes.append(f"the model's outputs depend on the batch: this pass ran the {which} "
                        f"batched among themselves, so a pass over all the data in its order "
                        f"gives them other values")


def _similarity(conn, statement: ast.Similarity) -> Result:
    from diagql.engine.similarity import answer_similarity

    if statement.across is not None:
        from diagql.session.similarity_across import similarity_across

        return similarity_across(conn, statement, _similarity)
    _check_plot(statement)
    plan, timings = planned(conn, statement)
    runners: dict = {}  # two checkpoints in one pass each get a copy of the model
    for model in dict.fromkeys(ref.model for ref in plan.bound.query.layers):
        runners[model] = conn.on(model).runner(tuple(r.model for r in runners.values()))
    # Every layer's model has its runner: the default model's own, where it is a checkpoint
    # not named, had loaded its weights into the copy another's runner held.
    result = answer_similarity(next(iter(runners.values())), plan, runners)
    result.class_names = conn.class_names
    models = list(runners)
    if models == [models[0]] and models[0] != conn.current.name:
        # One model's layers, not the default model's: named with it (ep1.fc2), as its
        # query's neurons are (several models' layers are named by layer_labels already).
        result = name_model(conn, result, models[0])
    if len(models) > 1 and reads_predictions(statement):
        result.notes.append(f"WHERE and GROUP BY read {models[0]}'s predictions (the first "
                            f"layer's model's)")
    result.timings.update(timings)
    record_speedup(result)
    return _plotted(result, statement)


def _check_plot(statement) -> None:
    """Refuse a PLOT file that cannot be written before any work is done."""
    if statement.plot is not None:
        from diagql.results.plots import check_target

        check_target(statement.plot.value, statement.plot.span)


def _plotted(result: Result, statement) -> Result:
    """The result, its PLOT drawn (SIMILARITY's heat map, TOPK k INPUTS' grid)."""
    if statement.plot is not None:
        from diagql.results.plots import write_noted

        write_noted(result, statement.plot.value)
    return result


def _drawn_now(rows: list, timings: dict) -> list:
    """EXPLAIN's rows with the time its sample's draw took, where planning drew it: a
    1,000-class maxmargin draw had taken 13.7 s of an EXPLAIN whose cost line said 0.0003 s
    (sweep SS6)."""
    seconds = timings.get("sample", 0.0)
    if seconds < 0.01:
        return rows
    return [(step, f"{text} (drawn now, in {seconds:.2g} s; kept for the statements after)"
             if step == "sample" else text) for step, text in rows]


def _explain(conn, statement: ast.Explain) -> Result:
    if isinstance(statement.query, ast.TopInputs):
        from diagql.session.inputs import explain_top_inputs

        return explain_top_inputs(conn, statement)
    if isinstance(statement.query, ast.Similarity):
        plan, timings = planned(conn, statement.query)
        rows = _drawn_now(plan.explain(), timings)
        if statement.query.across is not None:
            from diagql.session.similarity_across import explain_across

            rows.append(explain_across(conn, statement.query))
        return Result(kind="explain", statement=statement.text,
                      title=f"plan: {statement.query.text}", columns=["step", "detail"],
                      rows=rows, plan=plan)
    plan, timings = planned(conn, statement.query)
    rows = _drawn_now(plan.explain(), timings)
    try:  # what running it would answer: the profile already knows when nothing matches
        require_matches(plan)
    except ExecutionError as exc:
        rows.append(("refused", f"running it fails: {exc.message}"))
    entry = conn.on(plan.query.layer.model)
    if plan.approximate and not plan.from_profile:
        detail, cached = _cache_detail(entry.activations, plan)
        rows.insert([step for step, _ in rows].index("forward"), ("cache", detail))
        if cached:  # it had still listed the pass and its cost beside "no forward pass"
            rows = [(step, "none: every item's rows are cached (above)" if step == "forward"
                     else "no forward pass: the cached rows are reduced" if step == "cost"
                     else text) for step, text in rows]
    if len(conn.models) > 1:
        rows.insert(0, ("model", f"{entry.name} ({type(entry.architecture()).__name__})"))
    if statement.query.across is not None:
        from diagql.session.across import checkpoint_names
        from diagql.session.similarity_across import own_filter

        names = checkpoint_names(conn, entry, statement.query.across.span
                                 or statement.query.layer.span)
        rows.append(("across", f"this plan once per model of {', '.join(names)}, one "
                               f"checkpoint's weights loaded at a time"
                               f"{own_filter(statement.query, entry.name)}"))
    return Result(kind="explain", statement=statement.text, title=f"plan: {statement.query.text}",
                  columns=["step", "detail"], rows=rows, plan=plan)


def _cache_detail(store, plan: Plan) -> tuple[str, bool]:
    """EXPLAIN's cache row, and whether every item's rows are cached."""
    layer, view, items = plan.bound.layer, plan.bound.view, plan.items
    held = store.held(view, items)
    if held == len(items):
        return (f"all {held:,} items' activations of {layer.name} are cached: no forward "
                f"pass"), True
    if store.fits(view, items):
        return (f"{held:,} of {len(items):,} items' activations of {layer.name} are cached; the "
                f"other {len(items) - held:,} go through the model and are kept"), False
    return (f"{len(items):,} items' activations of {layer.name} exceed the activation cache's "
            f"memory budget: streamed, not kept"), False


def _set(conn, statement: ast.SetStatement) -> Result:
    name = statement.name
    if name not in Settings.names():
        where = statement.name_span or statement.span
        raise BindError(f"unknown setting {name!r}{did_you_mean(name, Settings.names())} "
                        f"(settings are {', '.join(Settings.names())})",
                        line=where.line, column=where.column, end_column=where.end_column)
    try:
        value = conn.settings.coerce(name, statement.value, statement.written)
        if name == "model":
            if value.lower() == "default" and value not in conn.models:  # as SHOW SETTINGS says
                value = FINAL if any(entry.is_checkpoint for entry in conn.models.values()) \
                    else next(iter(conn.models), None)
            value = conn.on(value, statement.value_span).name
            conn.settings.latent = conn.models[value].latent  # SET latent is per model
        if name == "latent" and conn.models:
            return _set_latent(conn, statement, value)
    except BindError as exc:
        raise exc.at(statement.value_span)
    if name == "latent" and value != conn.settings.latent:
        conn.forget_latent_space()
    if name == "batch_size" and value != conn.settings.batch_size:
        batch_size_changed(conn)
    setattr(conn.settings, name, value)
    return Result(kind="set", statement=statement.text, columns=["setting", "value"],
                  rows=[(name, "default" if value is None else value)])


def _set_latent(conn, statement: ast.SetStatement, value: str | None) -> Result:
    """SET latent = L: the latent layer of L's model (``wide.fc2``: wide's), the default
    model's for an unqualified name or for ``default``."""
    entry, shown = conn.current, value
    if value is not None:
        entry, ref = conn.resolve(ast.LayerRef(value, span=statement.value_span))
        # The profile reads the latent through this view: refused now, not at the next query
        # (a layer whose shape changes with the batch has no fixed latent).
        bind_view(ast.Query("avg", "neurons", ref), bind_layer(ref, entry.catalog))
        value = ref.name
    if value != entry.latent:
        entry.forget_latent_space()
        entry.latent = value
    if entry is conn.current:
        conn.settings.latent = value
    return Result(kind="set", statement=statement.text, columns=["setting", "value"],
                  rows=[("latent", "default" if shown is None else shown)])


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

    _check_plot(statement)
    return _plotted(run_top_inputs(conn, statement), statement)


def _clear_cache(conn, statement: ast.ClearCache) -> Result:
    from diagql.session.show import clear_cache

    return clear_cache(conn, statement)


# SHOW needs a model for LAYERS and PROFILE only; those ask for it themselves.
HANDLERS: dict[type, Handler] = {
    ast.Query: Handler(_query, needs_model=True),
    ast.Similarity: Handler(_similarity, needs_model=True),
    ast.Explain: Handler(_explain, needs_model=True),
    ast.Evaluate: Handler(_evaluate, needs_model=True),
    ast.Describe: Handler(_describe, needs_model=True),
    ast.SetStatement: Handler(_set, needs_model=False),
    ast.Show: Handler(_show, needs_model=False),
    ast.ClearCache: Handler(_clear_cache, needs_model=False),
    ast.TopInputs: Handler(_top_inputs, needs_model=True),
}
