"""ACROSS CHECKPOINTS: a statement once per checkpoint of a model and once on the final model,
one checkpoint's weights loaded at a time, the answers side by side (results/across.py).

Any statement kind can run across checkpoints: ``across_checkpoints`` takes the function that
answers the statement for one model (docs/ARCHITECTURE.md, "several models").
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from diagql.engine.nonfinite import NonFiniteActivations
from diagql.errors import BindError, NoMatchError, WeightsError
from diagql.language import ast
from diagql.results.across import across_result, write_curves
from diagql.results.plots import check_target, write_noted
from diagql.results.result import Result

NO_CHECKPOINTS = ("ACROSS CHECKPOINTS needs checkpoints of the model: connect(model, data, "
                  "checkpoints={'epoch1': 'ckpt/e1.pt', ...}) or --checkpoint NAME=PATH")


def family(conn, entry) -> list:
    """The checkpoints of ``entry``'s architecture and their final model, in training order."""
    for slot in {id(e.slot): e.slot for e in conn.models.values() if e.slot is not None}.values():
        members = [e for e in conn.models.values()
                   if e.slot is slot or (e.slot is None and e.architecture() is slot.final)]
        if entry in members:
            return members
    return []


def checkpoint_names(conn, entry, span=None) -> list[str]:
    members = family(conn, entry)
    if not members:
        error = BindError(NO_CHECKPOINTS)
        if span is not None:
            error.line, error.column, error.end_column = span.line, span.column, span.end_column
        raise error
    return [member.name for member in members]


def across_checkpoints(conn, statement, answer: Callable, *, layer: ast.LayerRef | None = None,
                       rebind: Callable | None = None):
    """The Result of ``statement`` (which has ``across``) answered by ``answer(conn, s)`` once
    per model of the checkpoint family of ``layer``'s model (default: ``statement.layer``),
    ``s`` being ``rebind(statement, model_name)`` (default: a Query reading that model's
    layer, without ACROSS). A statement that compares with the final model (SIMILARITY)
    passes its own ``rebind``."""
    layer = statement.layer if layer is None else layer
    entry, ref = conn.resolve(layer)
    # 'ep3.fc2 ACROSS CHECKPOINTS' would have read every model's, and is refused; a layer
    # named alone, the default model a checkpoint (SET model = ep3), reads them as meant.
    named = layer.model is not None or ref.name != layer.name
    if entry.is_checkpoint and named:
        error = BindError(f"ACROSS CHECKPOINTS reads the layer of every checkpoint and of the "
                          f"final model: name it without {entry.name!r} ({ref.text()})")
        if layer.span is not None:
            error.line, error.column = layer.span.line, layer.span.column
            error.end_column = layer.span.end_column
        raise error
    names = checkpoint_names(conn, entry, statement.across.span or layer.span)
    plot = statement.across.plot
    if plot is not None:
        check_target(plot.value, plot.span)  # before the passes, which a bad path would waste
    rebind = rebind or (lambda s, name: _query_on(conn, s, name))
    started = time.perf_counter()
    answers, missing = {}, 0
    for name in names:
        try:
            answers[name] = answer(conn, rebind(statement, name))
        # Its own WHERE (correct, ...) matches none of its items, its weights do not load, or
        # they make NaN (a diverged epoch, SW3): its cells are blank, the others answer.
        except (NoMatchError, WeightsError, NonFiniteActivations) as exc:
            missing += 1
            if missing == len(names):
                raise  # on no model: the query's own mistake, said once
            answers[name] = Result(kind="table", statement=statement.text, columns=[], rows=[],
                                   notes=[exc.message])
    count = len(names) - 1
    result = across_result(statement.text, answers,
                           f"{count} checkpoint{'' if count == 1 else 's'} and {names[-1]}",
                           conn.class_names)
    result.timings["total"] = time.perf_counter() - started
    if plot is not None:
        write_noted(result, plot.value, write_curves)
    return result


def _query_on(conn, query: ast.Query, model: str) -> ast.Query:
    """The query without ACROSS, reading its layer on ``model`` (``epoch1.fc2`` across
    checkpoints is each checkpoint's ``fc2``)."""
    _, ref = conn.resolve(query.layer)
    return replace(query, layer=replace(ref, model=model), across=None)
