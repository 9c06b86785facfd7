"""Reduced aggregate states to a Result: values, neuron labels, estimates and the comparison
with an exact baseline."""
from __future__ import annotations

import dataclasses
import math
import time
import weakref

import numpy as np

from diagql.engine import estimate
from diagql.engine.aggregates import rank
from diagql.engine.groups import key_order, shown_keys
from diagql.engine.nonfinite import refuse
from diagql.engine.planner import Plan, span_place
from diagql.errors import NoMatchError
from diagql.language.ast import predicate_text
from diagql.results import metrics
from diagql.results.result import Estimate, Provenance, Result


def require_matches(plan: Plan) -> None:
    """An exact answer over no items is an error, and so is a sample's when no item of the
    data matches (the profile knows it: "no matching items in the sample" would blame the
    sample); a sample that merely missed the matching items is an empty answer (and its
    baseline, if any, must match something)."""
    exact = plan.baseline if plan.approximate else plan
    if exact is not None and len(exact.items) == 0:
        raise NoMatchError(no_match_message(exact), **where_place(plan.query))
    if plan.approximate and sum(plan.population.values()) == 0:
        raise NoMatchError(no_match_message(plan), **where_place(plan.query))
    if plan.nonfinite is not None:  # a SIMILARITY's plan has none
        refuse(plan.nonfinite, plan.bound.view.layer.name, sum(plan.population.values()),
               plan.query.aggregate, sampled=plan.approximate)


def where_place(statement) -> dict:
    """The error's place: the WHERE's predicate, so that a script's error says which statement
    and the caret underlines what matched nothing."""
    return span_place(getattr(getattr(statement, "where", None), "span", None))


def assemble(plan: Plan, states: dict, baseline_states: dict | None, timings: dict) -> Result:
    """The Result of reduced states, with its timings, compared with its baseline's when there
    is one (the comparison reads the timings for the speed-up)."""
    result = build_result(plan, states)
    result.timings.update(timings)
    if baseline_states is not None:
        result.baseline = build_result(plan.baseline, baseline_states)
        compare(plan, result, result.baseline)
    note_exact_baseline(plan, result)
    return result


EXACT_BASELINE = ("no baseline: this answer is exact already (WITH BASELINE compares a "
                  "sample's answer with the exact one)")


def note_exact_baseline(plan: Plan, result: Result) -> None:
    """WITH BASELINE on an exact answer (USING FULL, or exact chosen by AUTO or a growth that
    found exact cheaper) has nothing to compare: say so rather than drop the clause silently."""
    if getattr(plan.query, "baseline", False) and not plan.approximate:
        result.notes.append(EXACT_BASELINE)


def no_match_message(plan: Plan) -> str:
    where = predicate_text(plan.query.where, plan.class_names) \
        if plan.query.where is not None else "the query"
    return f"no items match WHERE {where} (0 of {plan.n_data:,} items)"


def build_result(plan: Plan, states: dict) -> Result:
    query = plan.query
    # A sample's assisted fit pools one slope over all its groups (engine/regression.py).
    fits = {}
    if plan.approximate and plan.estimator == "assisted" and (
            plan.covariate_means is not None or plan.winner_shares is not None):
        fits = estimate.fit(states, plan.population, plan.covariate_means, plan.prediction,
                            plan.winner_shares, plan.widening, plan.recheck)
    # A uniform sample's mean answers where the fit's check widened its errors past the mean's.
    refused = estimate.refused(fits, states, plan.population) if fits and \
        getattr(plan.bound.sampler, "uniform", False) and query.aggregate != "argmax" else {}
    fits = {key: f for key, f in fits.items() if key not in refused}
    if query.group_by is None:
        return _refusing(_answer(plan, states.get(None), None, fits.get(None)), refused, None)
    # TOPK's P(in top-k) of every group from one fit of their priors (engine/deconvolution.py).
    started = time.perf_counter()
    priors = estimate.topk_priors(states, plan.population, fits) if plan.approximate and \
        query.aggregate == "topk" and query.order == "mean" else {}
    fitted_priors = time.perf_counter() - started
    result = _single(plan, None, sum(plan.population.values()))
    result.groups = {key: _refusing(_answer(plan, states.get(key), key, fits.get(key),
                                            priors.get(key)), refused, key)
                     for key in shown_keys(states, plan.population, plan.approximate)}
    result.n_items = sum(g.n_items for g in result.groups.values())
    if plan.approximate:
        result.timings["estimate"] = fitted_priors + sum(g.timings.get("estimate", 0.0)
                                                         for g in result.groups.values())
    return result


def _refusing(result: Result, refused: dict, key) -> Result:
    """The answer, its estimate noting the fit's widening where the sample mean answers
    instead (``estimate.refused``)."""
    if key in refused and result.estimate is not None:
        result.estimate = dataclasses.replace(result.estimate, fit_refused=refused[key])
    return result


def _answer(plan: Plan, state, key, fitted, prior=None) -> Result:
    """One group's answer (``key``; None: the only one); ``prior``: its P(in top-k)'s."""
    population = plan.population[key]
    if plan.approximate and (state is None or state.count == 0):
        return _unsampled(plan, population, key)
    return _single(plan, state, population, fitted, key, prior)


def _single(plan: Plan, state, population: int, fitted=None, key=None, prior=None) -> Result:
    query, layer = plan.query, plan.bound.layer
    provenance = Provenance(plan.n_data, plan.sampler_spec, plan.n_sample, query.group_by,
                            query.order, choice=plan.choice or None,
                            matching=population if plan.approximate else None)
    result = Result(kind=query.aggregate, statement=query.text, layer=layer.name, unit=query.unit,
                    provenance=provenance, plan=plan)
    held = _held(plan, key) if population else None
    n = 0 if state is None else state.count
    if n == 0 and held is None:
        return result
    if held is not None:  # every matching item's row is the profile's: exact, however few
        values = held
    elif fitted is not None and n != population:  # the assisted estimator's answer instead
        # of the sample's own; a sample of every matching item gives the exact mean itself (the
        # fit's, δ = 0, had differed from it in the last bit, outside its own 0-wide interval)
        values = estimate.shares(fitted) if query.aggregate == "argmax" else \
            _in_range(fitted.mean, plan)
    else:
        values = state.finalize()
    if query.aggregate == "topk":
        result.dense = values
        neurons = rank(values, query.k)
        values = values[neurons]
    else:
        neurons = np.arange(len(values))
    if result.approximate:
        started = time.perf_counter()
        result.estimate = estimate.held(
            held, n, population, neurons, query.k if query.aggregate == "topk" else None,
            plan.prediction.held_rounding()) \
            if held is not None else _bounded(
                _estimate(plan, state, population, neurons, fitted, prior), plan)
        result.timings["estimate"] = time.perf_counter() - started
    result.neurons = neurons
    result.values = values
    result.labels = _labels(plan, neurons)
    # The items the answer is computed from: a held or counted answer's, every matching item
    # (a count of the sampled ones had given groups 0 items beside their exact means: OO3).
    exact = held is not None or getattr(fitted, "exact", False)
    result.n_items = population if exact else n
    return result


# The last plan's labels of its view's every neuron (``_labels``), by a weak reference: the
# plan is not kept alive for them.
_EVERY_LABEL: list = [lambda: None, []]


def _labels(plan: Plan, neurons: np.ndarray) -> list[str]:
    """The neurons' labels; an AVG's or ARGMAX's every neuron's made once a plan, for all its
    groups: 131,072 labels of a conv map per group took 11 of a 14.7 s GROUP BY over 94
    classes (a sweep, benchmarks/README.md, "twenty-fourth session")."""
    if len(neurons) < 2 or not np.array_equal(neurons, np.arange(len(neurons))):
        return plan.bound.view.labels(neurons)
    if _EVERY_LABEL[0]() is not plan or len(_EVERY_LABEL[1]) != len(neurons):
        _EVERY_LABEL[:] = [weakref.ref(plan), plan.bound.view.labels(neurons)]
    return _EVERY_LABEL[1]


def _unsampled(plan: Plan, population: int, key) -> Result:
    """A group with matching items of which the sample holds none: an ARGMAX whose shares
    the profile counts from every item's winner, or a mean of a view whose every row the
    profile holds (``_held``), is exact all the same (README: "whatever the sample");
    anything else has no answer."""
    result = _single(plan, None, population, key=key)
    if len(result.values):
        return result
    shares = _counted(plan, key) if population else None
    if shares is not None:
        result.neurons = np.arange(len(shares))
        result.values = shares
        result.labels = _labels(plan, result.neurons)
        result.n_items = population  # counted from every matching item's winner
        result.estimate = estimate.counted(shares, population)
        return result
    reason = f"no matching item sampled ({population:,} in the data)"
    result.estimate = dataclasses.replace(estimate.unavailable(reason), population=population)
    return result


def _held(plan: Plan, key) -> np.ndarray | None:
    """A group's exact means (AVG, TOPK BY MEAN) when the assisted plan predicts each item
    by its own row, which the profile holds for every item (the latent, the logits:
    engine/covariates.py, ``_held``; a block its directions span: ``Chosen.exact``); None
    otherwise."""
    prediction, means = plan.prediction, plan.covariate_means
    if not plan.approximate or plan.estimator != "assisted" or prediction is None \
            or means is None or key not in means or plan.query.aggregate == "argmax":
        return None
    return prediction.held_mean(means[key])


def _counted(plan: Plan, key) -> np.ndarray | None:
    """A group's exact ARGMAX shares, when the assisted plan counts them from the profile."""
    if not plan.approximate or plan.estimator != "assisted" or plan.winner_shares is None:
        return None
    return plan.winner_shares.get(key)


# The range of a mean of these modules' outputs, whatever their arguments (not Hardtanh's,
# whose bounds are arguments): a dead ReLU's rule-of-three interval read [-0.0158, 0.0158],
# a bound no ReLU reaches, and a regression's prediction of a ReLU's mean from a gmm sample
# -0.085, where the exact mean is 0.42 (a sweep, benchmarks/README.md, "twenty-fourth
# session").
RANGES = {"ReLU": (0.0, math.inf), "ReLU6": (0.0, 6.0), "Sigmoid": (0.0, 1.0),
          "Softplus": (0.0, math.inf), "Softmax": (0.0, 1.0), "Hardsigmoid": (0.0, 1.0),
          "Tanh": (-1.0, 1.0), "Softsign": (-1.0, 1.0)}


def _in_range(means: np.ndarray, plan: Plan) -> np.ndarray:
    """An assisted fit's means within the range its layer's module can give: the mean of
    values in a range is in it, so the clipped answer is never further from the truth."""
    low_high = RANGES.get(plan.bound.view.layer.type_name)
    return means if low_high is None else np.clip(means, *low_high)


def _bounded(found: Estimate, plan: Plan) -> Estimate:
    """An AVG's or TOPK's intervals within the range its layer's module can give (a ReLU's
    means are not negative); an ARGMAX's shares are bounded already."""
    low_high = RANGES.get(plan.bound.view.layer.type_name)
    if low_high is None or found.ci_low is None or plan.query.aggregate == "argmax":
        return found
    return dataclasses.replace(found, ci_low=np.clip(found.ci_low, *low_high),
                               ci_high=np.clip(found.ci_high, *low_high))


def _estimate(plan: Plan, state, population: int, neurons: np.ndarray, fitted,
              prior=None) -> Estimate:
    query, sampler = plan.query, plan.bound.sampler
    if plan.unchecked:
        return estimate.unavailable(plan.unchecked)
    reliable = getattr(sampler, "uniform", False)
    if query.aggregate == "argmax":
        return estimate.for_argmax(state, population, reliable, fitted)
    if query.aggregate == "topk" and query.order == "max":
        return estimate.for_whole_max(state, population, neurons) or estimate.unavailable(
            "a sample's maximum is biased low and has no sampling distribution to estimate "
            "from; use BY MEAN or a baseline")
    return estimate.for_mean(state, population, neurons,
                             query.k if query.aggregate == "topk" else None, reliable, fitted,
                             prior)


def compare(plan: Plan, approx: Result, exact: Result) -> None:
    """Attach the paper's metric for this aggregate, per group and overall (``plan`` is the
    approximate answer's, for the groups the sample missed)."""
    metric = metrics.OF_AGGREGATE[approx.kind]
    name = metric.key
    if exact.groups is not None:
        approx.groups = approx.groups or {}
        for key, exact_group in exact.groups.items():
            # A group the sample missed: the empty answer _single gives a group without items.
            group = approx.groups.setdefault(key, _single(plan, None, 0))
            group.baseline = exact_group
            group.metrics[name] = _metric(metric, group, exact_group)
        approx.groups = dict(sorted(approx.groups.items(), key=lambda kv: key_order(kv[0])))
        approx.metrics[name] = float(np.mean([g.metrics[name] for g in approx.groups.values()
                                              if g.baseline is not None]))
    else:
        approx.metrics[name] = _metric(metric, approx, exact)


# What a sample query costs the statement that asks it (its accuracy estimate included); the
# profile is not in it: it is paid once per model and data, by the first statement of either
# kind, and reported on its own.
SAMPLE_SIDE = ("bind", "sample", "plan", "query", "estimate")


def record_speedup(result: Result) -> None:
    """WITH BASELINE's speed-up, once the statement's timings are complete: the exact pass
    against everything the sample cost (binding, drawing the sample, planning, its pass, its
    accuracy estimate)."""
    full_s = result.timings.get("baseline")
    if full_s is None or "query" not in result.timings:
        return
    sample_s = sum(result.timings.get(step, 0.0) for step in SAMPLE_SIDE)
    result.timings["sample_side"] = sample_s
    if sample_s > 0:
        result.metrics["speedup"] = full_s / sample_s


def _metric(metric: metrics.Metric, approx: Result, exact: Result) -> float:
    if not len(approx.values):  # no answer (none sampled); an ARGMAX counted has one
        return metric.worst
    return metric.score(getattr(approx, metric.compares), getattr(exact, metric.compares))
