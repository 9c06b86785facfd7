"""Error-bounded queries (``UNTIL target [WITHIN s SECONDS]``, ``WITHIN s SECONDS``): a sample
that grows, each round extending the last (``samplers.Ladder``), until its own estimate meets
the target, the time budget is spent, the exact answer is cheaper than the next round, or the
data is exhausted (docs/ARCHITECTURE.md, "Error-bounded queries"). Rows computed in a round
stay in the activation store, so each round sends only its new items through the model."""
from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import numpy as np

from diagql import samplers
from diagql.engine.planner import (
    Plan,
    answered_from_profile,
    plan_query,
    predicate_mask,
)
from diagql.errors import BindError
from diagql.language import ast
from diagql.language.binder import TARGETS, BoundQuery, bind_sampler
from diagql.progress import Progress
from diagql.results.result import Growth, Result
from diagql.session.auto import (
    ABOUT,
    FEW,
    default_sampler,
    draw_seconds,
    pass_layers,
    pass_or_draw,
    shunned,
)

# Without a size in the call, the first round is 1% of the data, at least 100 items.
START_FRACTION = 0.01
START_MIN = 100


FITS = 0.5  # WITHIN alone answers exactly when the pass's model time is at most this share


def _start(query: ast.Query, sampler: samplers.Sampler, n_items: int) -> int:
    source = query.source
    if isinstance(source, ast.SamplerCall) and any(a.name in (None, "size") for a in source.args):
        return samplers.resolve_size(sampler.size, n_items)
    return min(n_items, max(START_MIN, round(START_FRACTION * n_items)))


def first_round(conn, bound: BoundQuery, profile, src) -> tuple[BoundQuery, str, float]:
    """The bound query of the first round (no sampler: exact from the start), how the query
    will grow, for EXPLAIN, and the seconds spent drawing the default sampler's sample to
    see whether it shuns the matching items (``auto.shunned``). ``src``: the statement's
    models (``statements.Sources``)."""
    query = bound.query
    reason = answered_from_profile(bound, profile) if src.own else None
    if reason is not None:
        return dataclasses.replace(bound, sampler=None), (
            f"exact: {reason}, so the exact answer needs no forward pass"), 0.0
    sampler = _measurable(conn, bound, query, profile) or default_sampler(conn, profile)
    over = _draw_over(sampler, profile, query.until.seconds, src) if bound.sampler is None \
        else None
    if over is not None:  # random's draw is free: the time goes to the rounds
        sampler = bind_sampler(ast.SamplerCall("random"), conn.settings.seed, len(profile))
    start = _start(query, sampler, len(profile))
    mask = predicate_mask(query.where, profile)
    n_match = int(mask.sum())
    if n_match <= start:
        return dataclasses.replace(bound, sampler=None), (
            f"exact: {n_match:,} matching item{'s' if n_match != 1 else ''}, no more than "
            f"the first round's {start:,}"), 0.0
    if n_match <= FEW:  # a user's small stratified sample had grown five rounds to reach them
        return dataclasses.replace(bound, sampler=None), (
            f"exact: {n_match:,} matching items, too few to grow a sample over (a sample "
            f"holds a share of them, its estimate too wide to meet a target by, and a pass "
            f"over them all costs next to nothing)"), 0.0
    # The pass's model time, as the profile's until the query's layer.
    exact = n_match * profile.seconds_per_item(pass_layers(bound, src.own))
    if query.until.target is None and exact <= FITS * query.until.seconds:
        # WITHIN alone asks for the best answer the time allows: exact, where it fits (the
        # rounds reached it anyway, 0.66 s where it took 0.24).
        return dataclasses.replace(bound, sampler=None), (
            f"exact: a pass over the {n_match:,} matching items (≈ {exact:.2g} s of model "
            f"time) fits within the {query.until.seconds:g} s given"), 0.0
    avoided, seconds = "", 0.0
    if bound.sampler is None and over is None:
        # The default sampler's first draw (maxmargin's classifiers) may cost more than the
        # exact pass, which the rounds would then reach anyway: 0.7 s where exact took 0.08.
        cheaper, _ = pass_or_draw(conn, sampler, profile, n_match, src.sampling.artifacts,
                                  pass_layers(bound, src.own))
        if cheaper is not None:
            return dataclasses.replace(bound, sampler=None), f"exact: {cheaper}", 0.0
        avoided, seconds = shunned(conn, sampler, profile, mask, src.sampling.artifacts)
        if avoided:
            sampler = bind_sampler(ast.SamplerCall("random"), conn.settings.seed, len(profile))
            start = _start(query, sampler, len(profile))
    goal = _goal(query.until)
    return dataclasses.replace(bound, sampler=sampler.resized(start)), (
        f"grow {sampler.name} from {start:,} items, doubling, {goal}; exact once a round "
        f"would cost about as much ({n_match:,} matching items)" + (over or "") + avoided), \
        seconds


def _measurable(conn, bound: BoundQuery, query: ast.Query, profile) -> samplers.Sampler | None:
    """The sampler to grow, where a target needs its estimate and SET estimator = plain
    leaves a non-uniform sampler's without one (its sample cannot measure its own bias):
    random for DiagQL's own choice; the user's is refused. A target had been "met" on such an
    estimate while its intervals covered 45% of the exact means. None: the default's."""
    chosen = bound.sampler
    if query.until.target is None or conn.settings.estimator != "plain" or \
            getattr(chosen, "uniform", False):
        return chosen
    if chosen is None:
        return bind_sampler(ast.SamplerCall("random"), conn.settings.seed, len(profile))
    span = query.until.span
    raise BindError(
        f"UNTIL {query.until.target.text()} needs an accuracy estimate, and a {chosen.name} "
        f"sample has none under SET estimator = plain ({chosen.name} does not draw uniformly, "
        f"so its sample cannot measure its own bias): SET estimator = assisted, or grow a "
        f"random sample", **({} if span is None else {
            "line": span.line, "column": span.column,
            "end_column": span.end_column if span.end_line == span.line else None}))


def _draw_over(sampler: samplers.Sampler, profile, seconds: float | None, src) -> str | None:
    """Why the default sampler gives way to random under WITHIN: its draw alone (not drawn
    yet) would take more than FITS of the time given, where the pass does not fit either (a
    sweep's 100-class MLP: maxmargin's draw priced at 26 s, the pass at 2.6 s, under WITHIN 2
    SECONDS; exact was chosen and answered in 5.3 s). None: it fits, or no time is given."""
    if seconds is None or src.sampling.artifacts.has_sample(sampler):
        return None
    draw = draw_seconds(sampler, profile)
    if draw is None or draw <= FITS * seconds:
        return None
    return (f"; random, as drawing a {sampler.spec()} sample (≈ {draw:.2g} s) would spend the "
            f"{seconds:g} s given")


def _goal(until: ast.Until) -> str:
    parts = [f"until {until.target.text()}"] if until.target is not None else []
    if until.seconds is not None:
        parts.append(f"within {until.seconds:g} s")
    return " ".join(parts)


def grow(conn, plan: Plan, timings: dict, src) -> Result:
    """Answer an UNTIL/WITHIN query whose first round ``plan`` is (``planned`` made it);
    ``src`` names its models (``statements.Sources``)."""
    # The first round's draw (``planned``'s) is the growth's: WITHIN 0.01 SECONDS had run
    # 0.59 s past a maxmargin draw, and a 9 s gmm draw was no round's cost.
    first_draw = timings.get("sample", 0.0)
    # And its plan's time (25 ms at 20,000 items: half a WITHIN 0.05 SECONDS budget, unseen).
    started = time.perf_counter() - first_draw - timings.get("plan", 0.0)
    query, until = plan.query, plan.query.until
    runner = src.entry.runner()
    # Every round is planned as the first was: on the same profile, with the same estimator.
    options = {"estimator": conn.settings.estimator, "rows_from_profile": src.own}
    if not plan.approximate:  # exact from the start: no round could cost less
        result = runner.answer(plan)
        return _finish(result, until, (), None, "exact cheaper", started, timings, exact=True)
    profile = src.reader.profile
    quiet = dataclasses.replace(plan.bound, query=dataclasses.replace(query, baseline=False))
    sampler = plan.bound.sampler
    ladder = samplers.Ladder(sampler, lambda s: src.sampling.artifacts.get_sample(s)[0].indices)
    mask = predicate_mask(query.where, profile)
    n_match, n_items = int(mask.sum()), len(profile)
    per_item = profile.seconds_per_item(pass_layers(plan.bound, src.own))
    exact_cost = n_match * per_item  # the exact answer's pass, over the matching items
    rounds: list[Round] = []
    result, sizes, draws, reached, stop = None, [], 0.0, None, "data exhausted"
    asked = 0  # the last round's size asked of the sampler (``sizes[-1]``: what it held)
    last_round = 0.0  # the last round's seconds, draw included: the next costs at least as much
    with conn.progress.live() as show:
        if conn.progress.enabled:  # the table refines in place; no bars beneath it
            runner.progress = Progress(False)
        for n in samplers.doubling(sampler.size, n_items):
            # Exact cheaper than the next, larger round (a gmm draw, a fast model) stops the
            # growth: the next round adds n − sizes[-1] items, the last added its own share.
            if result is not None:
                added = sizes[-1] - (sizes[-2] if len(sizes) > 1 else 0)
                # A sampler that holds more than the size asked (stratified's floor a cell,
                # vas's and gmm's unions) grows by its own ratio: foreseen as n − sizes[-1],
                # a stratified round of 4,685 items was taken for 846.
                coming = max(n - sizes[-1], n * sizes[-1] / max(asked, 1) - sizes[-1])
                if last_round * coming / max(added, 1) >= exact_cost:
                    stop = _exact_or_spent(until, started, exact_cost, n_match * per_item)
                    break
            drawn_at = time.perf_counter()
            items = ladder.grow(n)
            draws += time.perf_counter() - drawn_at
            bound = dataclasses.replace(quiet, sampler=sampler.resized(n))
            round_plan = plan_query(bound, profile, items, ladder.last_spec(), **options)
            fresh = len(round_plan.items) - src.entry.activations.held(bound.view, round_plan.items)
            # Exact once the round's sample would hold about as many matching items as there
            # are (AUTO's rule): exact then costs about as much as this round, and is exact.
            if result is not None:
                spent = time.perf_counter() - started
                over = until.seconds is not None and \
                    spent + fresh * per_item + draws / len(sizes) > until.seconds
                if ABOUT * len(round_plan.items) >= n_match:
                    reason = _exact_or_spent(until, started, exact_cost, n_match * per_item)
                    if reason == "exact cheaper" or over:  # else the round fits where exact not
                        stop = reason
                        break
                elif over:
                    stop = "budget spent"
                    break
            answered_at, items_before = time.perf_counter(), runner.counters.get("items", 0)
            passed_before = runner.pass_seconds
            result = runner.answer(round_plan)
            rounds.append(Round(runner.counters.get("items", 0) - items_before,
                                runner.pass_seconds - passed_before,
                                time.perf_counter() - answered_at))
            exact_cost = exact_seconds(rounds, n_match, per_item)
            last_round = time.perf_counter() - drawn_at + (0.0 if sizes else first_draw)
            last = (bound.sampler, items, round_plan.sampler_spec)
            sizes.append(len(items))
            asked = n
            reached = _reached(result, round_plan, until.target)
            show(_progress(result, until, sizes, reached))
            if until.target is not None and reached is not None and \
                    _met(reached, until.target):
                stop = "target met"
                break
            if until.seconds is not None and time.perf_counter() - started >= until.seconds:
                stop = "budget spent"
                break
    if sizes and sizes[-1] >= n_items and stop == "budget spent":
        stop = "data exhausted"  # the last round held every item: its answer is exact
    if stop == "exact cheaper":
        exact = plan_query(dataclasses.replace(quiet, sampler=None), profile, None, None, **options)
        result = runner.answer(exact)
        return _finish(result, until, sizes, None, stop, started, timings, exact=True,
                       draws=draws, joined=_joined(ladder))
    if query.baseline:  # the last round's states are remembered: only the baseline runs
        at, items, spec = last
        result = runner.answer(plan_query(dataclasses.replace(plan.bound, sampler=at), profile,
                                          items, spec, **options))
    # A last round that held every item answered exactly, whatever stopped it (a target
    # met there had been said to be reached by an estimate: sweep SX7).
    return _finish(result, until, sizes, reached, stop, started, timings, draws=draws,
                   joined=_joined(ladder), exact=bool(sizes) and sizes[-1] >= n_items)


def _joined(ladder: samplers.Ladder) -> bool:
    """Whether the sample holds more than its last draw: the rounds' draws joined (a sampler
    whose larger draws do not hold its smaller ones; a sweep read stratified(200) holding 296
    items as a miscount)."""
    return bool(ladder.sizes) and len(ladder.order) > ladder.sizes[-1]


def _exact_or_spent(until: ast.Until, started: float, exact_cost: float,
                    profiled: float) -> str:
    """Exact is cheaper than growing on, unless it would overrun WITHIN's budget: then the
    last round's answer stands (a 1.8 s exact pass had run at 0.7 s of a 1 s budget). The
    budget is weighed against the dearer of ``exact_cost`` (``exact_seconds``: a line through
    the rounds, which rounds of 18-72 items foretold 25-100x beyond them as too cheap, and a
    1 s budget ran 1.6-3.2 s) and ``profiled``, the profile pass's rate."""
    if until.seconds is not None and \
            time.perf_counter() - started + max(exact_cost, profiled) > until.seconds:
        return "budget spent"
    return "exact cheaper"


class Round(NamedTuple):
    """One round's answer: the items it sent through the model, its pass's seconds (its
    consumers' included) and the whole answer's seconds (planning and estimating too)."""

    sent: int
    passed: float
    seconds: float


def exact_seconds(rounds: list[Round], n_match: int, per_item: float) -> float:
    """What the exact answer over ``n_match`` items would take: the least of two estimates.
    One is ``per_item``, the profile pass's model time per item (``Profile.seconds_per_item``:
    1.1-1.7x a small model's exact pass). The other is from the rounds: the least work any
    round did beside its pass (planning, estimating), plus a pass of ``n_match`` items at
    the rounds' pass cost a + b·sent, a line fitted once
    they sent clearly different counts (the largest half as many again as the smallest),
    else the last round that sent any at its own time per item (its fixed costs in it). A
    sample's pass gathers its items: 5x an exact pass's time per item on a fast model.
    Doubling sends as many items in its second round as in its first, a round whose rows
    were cached sends none, and two rounds sending 31 and 39 differ by their timing's noise:
    a slope from them had made exact look as cheap as a round (0.005-0.035 s for a 1.9 s
    pass), stopped the growth for it and overran WITHIN."""
    profiled = n_match * per_item
    sent = [r for r in rounds if r.sent > 0]
    if not sent:
        return profiled
    beside = min(max(r.seconds - r.passed, 0.0) for r in rounds)
    counts = np.array([r.sent for r in sent], dtype=np.float64)
    passed = np.array([r.passed for r in sent])
    if counts.max() >= 1.5 * counts.min():
        slope = max(float(np.polyfit(counts, passed, 1)[0]), 0.0)
        intercept = max(float(passed.mean() - slope * counts.mean()), 0.0)
        return min(profiled, beside + intercept + slope * n_match)
    return min(profiled, beside + passed[-1] / counts[-1] * n_match)


OVERRUN = 1.1  # past this share of WITHIN's budget, the answer says it ran over


def _finish(result: Result, until: ast.Until, sizes, reached, stop: str, started: float,
            timings: dict, *, exact: bool = False, draws: float = 0.0,
            joined: bool = False) -> Result:
    # WITH BASELINE's exact pass ran after the growth, inside ``started``'s clock: it is the
    # baseline's, not the sample's (the speed-up had read 0.85 for a 5.7x faster growth).
    seconds = time.perf_counter() - started - result.timings.get("baseline", 0.0)
    growth = Growth(until.target.text() if until.target is not None else None, until.seconds,
                    tuple(sizes), reached, stop, seconds, exact, joined)
    result.provenance = dataclasses.replace(result.provenance, growth=growth)
    if stop == "budget spent" and len(sizes) == 1 and seconds > until.seconds:
        # The first round always runs (there is no answer before it): say that it alone ran
        # past the budget, rather than let "budget spent" read as a budget kept.
        result.notes.append(f"WITHIN {until.seconds:g} SECONDS is less than one round: the "
                            f"first, of {sizes[0]:,} items, took {seconds:.3f} s; the answer is "
                            f"its")
    elif until.seconds is not None and seconds > OVERRUN * until.seconds:
        # A round's time is foreseen from the last one's; one that took longer ran past.
        result.notes.append(f"WITHIN {until.seconds:g} SECONDS took {seconds:.3f} s: its last "
                            f"round, of {sizes[-1] if sizes else 0:,} items, took longer than "
                            f"the time it had left" if stop != "exact cheaper" else
                            f"WITHIN {until.seconds:g} SECONDS took {seconds:.3f} s: the exact "
                            f"pass took longer than foreseen")
    profiled = timings.get("profile", 0.0)
    if until.seconds is not None and profiled > 0.1 * until.seconds:
        # The connection's first statement made the profile: once per model and data, and
        # cached, so no round's; but its wall time had read as the budget kept, unsaid.
        result.notes.append(f"the profile pass, once per model and data, took {profiled:.3g} s "
                            f"before this statement's rounds, outside WITHIN {until.seconds:g} "
                            f"SECONDS")
    result.timings.update(timings)
    result.timings["query"] = seconds - draws - timings.get("sample", 0.0) - \
        timings.get("plan", 0.0)  # the first round's plan is on WITHIN's clock
    result.timings["sample"] = timings.get("sample", 0.0) + draws
    return result


def _reached(result: Result, plan: Plan, target: ast.Target | None) -> float | None:
    """The estimate of the target's metric, the worst over groups; None while any group with
    matching items has no estimate (too few of them sampled)."""
    if target is None:
        return None
    parts = result.groups if result.groups is not None else {None: result}
    if any(key not in parts for key, count in plan.population.items() if count):
        return None
    values = []
    for part in parts.values():
        estimate = part.estimate
        if estimate is None or part.n_items == 0 or not estimate.reliable:
            return None
        if target.metric == "width":
            if estimate.ci_low is None:
                return None
            values.append(float(np.max(estimate.ci_high - estimate.ci_low)))
        elif estimate.expected is None:
            return None
        else:
            values.append(float(estimate.expected))
    higher = TARGETS[target.metric][1] == "higher"
    return min(values) if higher else max(values)


def _met(reached: float, target: ast.Target) -> bool:
    return {">=": reached >= target.value, ">": reached > target.value,
            "<=": reached <= target.value, "<": reached < target.value}[target.op]


def _progress(result: Result, until: ast.Until, sizes, reached):
    from rich.console import Group
    from rich.text import Text

    from diagql.results.render import renderable

    now = f", {until.target.metric} {reached:.3f}" if reached is not None else ""
    line = f"round {len(sizes)}: {sizes[-1]:,} items{now} ({_goal(until)})"
    return Group(renderable(result, echo=False), Text(line, style="cyan"))
