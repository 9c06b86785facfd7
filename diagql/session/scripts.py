"""Running a script: statement by statement, consecutive queries sharing one forward pass.

Each statement gets its own Result or its own DiagQLError, and the run goes on: the CLI's
``--keep-going`` and the REPL decide whether to stop (docs/ARCHITECTURE.md, "scripts").
"""
from __future__ import annotations

import time
from typing import Iterator

from diagql.errors import DiagQLError
from diagql.language import ast
from diagql.language.parser import parse_piece, split_statements
from diagql.results.result import Result
from diagql.session.changes import stepped, watching
from diagql.session.class_names import checked, resolved
from diagql.session.models import name_model
from diagql.session.statements import planned, run_statement


def run_timed(conn, statement: ast.Statement, source: str, parsed: float) -> Result:
    """Run one parsed statement; its Result carries the parse and total seconds. A DiagQLError
    is raised with the source text attached, so that it can point into it."""
    started = time.perf_counter()
    try:
        with watching(conn):  # what changed in place since the last (session/changes.py)
            result = run_statement(conn, statement)
    except DiagQLError as exc:
        raise exc.with_source(source)  # its cause kept: --debug shows it
    result.timings["parse"] = parsed
    result.timings["total"] = parsed + time.perf_counter() - started
    return result


def run_script(conn, script: str) -> Iterator[Result | DiagQLError]:
    """Every statement's Result or DiagQLError, in order."""
    queries: list[tuple[ast.Query, float]] = []  # waiting to share a pass, with parse seconds
    pieces = split_statements(script)
    # Where a failing statement is, is worth saying in a script of several (a lone statement,
    # -e's or the REPL's, is its own place, and the refusals for want of a model stay one line).
    placed = len(pieces) > 1
    for piece in pieces:
        started = time.perf_counter()
        try:
            statement = resolved(parse_piece(piece, script), checked(conn))
        except DiagQLError as exc:
            yield from _run_queries(conn, queries, script, placed)
            if getattr(exc, "statement", None) is None:  # --format json's record names it
                exc.statement = piece.statement_text() or None
            yield exc.with_source(script)
            continue
        parsed = time.perf_counter() - started
        # A growing query runs rounds of its own, and ACROSS CHECKPOINTS its own passes, so
        # neither shares a pass.
        if isinstance(statement, ast.Query) and statement.across is None and statement.until is None:
            queries.append((statement, parsed))
            continue
        yield from _run_queries(conn, queries, script, placed)
        yield _outcome(conn, statement, script, parsed, placed)
    yield from _run_queries(conn, queries, script, placed)


def _outcome(conn, statement, script: str, parsed: float, placed: bool) -> Result | DiagQLError:
    try:
        return run_timed(conn, statement, script, parsed)
    except DiagQLError as exc:
        return _placed(exc, statement, script, placed)


def _placed(exc: DiagQLError, statement, script: str, placed: bool) -> DiagQLError:
    """A script's error points at its statement when the raiser knew no finer place ('GROUP
    BY class needs the true labels'), so that the file:line says which statement failed."""
    exc.with_source(script)
    exc.statement = getattr(statement, "text", "") or None  # --format json's record names it
    return exc.at(statement.span) if placed else exc


def _run_queries(conn, queries: list, script: str,
                 placed: bool) -> Iterator[Result | DiagQLError]:
    """Answer the waiting queries (emptying the list): one alone as usual, several together
    in one forward pass over the union of their items."""
    waiting, queries[:] = list(queries), []
    if len(waiting) == 1:
        yield _outcome(conn, waiting[0][0], script, waiting[0][1], placed)
        return
    # What changed in place since the last (session/changes.py), the lock released between
    # answers.
    yield from stepped(conn, _shared_pass(conn, waiting, script, placed))


def _shared_pass(conn, waiting: list, script: str, placed: bool) -> Iterator:
    """Each waiting query's Result or DiagQLError, in order, from one pass per model. Each is
    yielded as soon as it and those before it are answered: a query the profile answers does
    not wait for a later query's pass (nor is it lost when that pass is interrupted)."""
    outcomes: list[Result | DiagQLError | None] = []
    plans: dict[int, tuple] = {}  # position -> (plan, timings) of the queries that planned
    for statement, _ in waiting:
        try:
            plan, timings = planned(conn, statement)
        except DiagQLError as exc:
            outcomes.append(_placed(exc, statement, script, placed))
            continue
        plans[len(outcomes)] = (plan, timings)
        outcomes.append(None)
    by_model: dict[str, list] = {}  # one pass per model, over its queries' items
    for position, (plan, _) in plans.items():
        if not plan.from_profile:
            by_model.setdefault(plan.query.layer.model, []).append(position)
    for position in range(len(waiting)):
        if outcomes[position] is None:
            plan = plans[position][0]
            model = plan.query.layer.model
            group = [position] if plan.from_profile else by_model.pop(model)
            _answer(conn, model, group, plans, waiting, outcomes, script, placed)
        yield outcomes[position]


def _alone(conn, model: str, plan) -> Result | DiagQLError:
    """One statement's answer in a pass of its own, or the error that pass raised."""
    try:
        return conn.on(model).runner().answer_many([plan])[0]
    except DiagQLError as exc:
        return exc


def _answer(conn, model: str, group: list, plans: dict, waiting: list, outcomes: list,
            script: str, placed: bool) -> None:
    """Answer the queries at ``group``'s positions, all of ``model``, in one pass, into
    ``outcomes``."""
    started = time.perf_counter()
    shared = False
    try:
        answers = conn.on(model).runner().answer_many([plans[p][0] for p in group])
    except DiagQLError as exc:  # the pass itself failed (the model's forward raised)
        answers, shared = [exc] * len(group), True
        if len(group) > 1:  # each alone: its own answer, or its own error at its place
            answers, shared = [_alone(conn, model, plans[p][0]) for p in group], False
    seconds = time.perf_counter() - started
    for position, answer in zip(group, answers):
        if isinstance(answer, Result):
            answer.timings.update(plans[position][1])
            answer.timings["parse"] = waiting[position][1]
            answer.timings["total"] = seconds
            answer.class_names = conn.class_names
            outcomes[position] = name_model(conn, answer, model)
        elif shared:  # one error for every statement of the pass: no one statement's place
            outcomes[position] = answer.with_source(script)
        else:
            outcomes[position] = _placed(answer, waiting[position][0], script, placed)
