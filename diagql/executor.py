"""Plan to Result: batched forward passes with hooks, aggregate states reduced batch by batch."""
from __future__ import annotations

import time

import numpy as np
import torch

from . import estimate, metrics
from .aggregates import rank, state_for
from .data import call_model, to_device
from .errors import ExecutionError
from .hooks import Hooks, evaluation
from .layers import neuron_labels
from .planner import Plan, predicate_text
from .result import Result


class Runner:
    """Everything a forward pass needs from the connection."""

    def __init__(self, model, source, *, device, dtype, batch_size, progress):
        self.model = model
        self.source = source
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.progress = progress

    def states(self, plan: Plan, description: str) -> dict:
        """One state per group (the key None without GROUP BY), over the plan's items."""
        query = plan.query
        n_neurons = plan.bound.n_neurons
        keys_of_items = plan.group_keys
        states: dict = {}
        batch_keys: list = [None]
        # Items whose activations hold NaN or inf: an average over them is NaN or inf and a
        # ranking is meaningless, so they are counted over the whole pass and reported.
        bad_items: list[int] = [0, -1]  # count, first item index
        batch_items: list = [None]

        def state(key):
            if key not in states:
                states[key] = state_for(query.aggregate, query.order, n_neurons)
            return states[key]

        def on_activation(output: torch.Tensor) -> None:
            # Reduce here, inside the hook: a later in-place op may overwrite `output`.
            values = output.detach().to(torch.float64)
            values = values.flatten(2).mean(dim=2) if query.unit == "channels" else values.flatten(1)
            bad = ~torch.isfinite(values).all(dim=1)
            if bool(bad.any()):
                if bad_items[0] == 0:
                    bad_items[1] = int(batch_items[0][int(bad.nonzero()[0, 0])])
                bad_items[0] += int(bad.sum())
                return
            keys = batch_keys[0]
            if keys is None:
                state(None).update(values)
                return
            for key in np.unique(keys).tolist():
                mask = torch.from_numpy(keys == key).to(values.device)
                state(key).update(values[mask])

        position = 0
        with evaluation(self.model), Hooks(self.model, {plan.bound.layer.name: on_activation}) as hooks, \
                self.progress.task(description, len(plan.items)) as advance:
            for idx, x, _ in self.source.batches(plan.items, self.batch_size):
                hooks.reset()
                batch_items[0] = idx
                if keys_of_items is not None:
                    batch_keys[0] = keys_of_items[position:position + len(idx)]
                call_model(self.model, to_device(x, self.device, self.dtype))
                hooks.check_ran()
                position += len(idx)
                advance(len(idx))
        if bad_items[0]:
            raise ExecutionError(
                f"layer {plan.bound.layer.name!r} has NaN or infinite activations for "
                f"{bad_items[0]:,} of {len(plan.items):,} items (the first is item "
                f"{bad_items[1]}); DiagQL does not average over them")
        return states

    def answer(self, plan: Plan) -> Result:
        """Run the plan (and its baseline) and assemble the Result with metrics and timings."""
        query = plan.query
        if plan.baseline is None and plan.n_sample is None and len(plan.items) == 0:
            raise ExecutionError(no_match_message(plan))
        started = time.perf_counter()
        label = "sampled items" if plan.n_sample is not None else "items"
        states = self.states(plan, f"{query.aggregate.upper()} {plan.bound.layer.name} ({label})")
        seconds = time.perf_counter() - started
        result = build_result(plan, states)
        result.timings["query"] = seconds
        if plan.baseline is not None:
            if len(plan.baseline.items) == 0:
                raise ExecutionError(no_match_message(plan.baseline))
            started = time.perf_counter()
            full_states = self.states(plan.baseline, f"{query.aggregate.upper()} "
                                                     f"{plan.bound.layer.name} (baseline)")
            result.timings["baseline"] = time.perf_counter() - started
            result.baseline = build_result(plan.baseline, full_states)
            compare(result, result.baseline)
        return result


def no_match_message(plan: Plan) -> str:
    where = predicate_text(plan.query.where) if plan.query.where is not None else "the query"
    return f"no items match WHERE {where} (0 of {plan.n_data:,} items)"


def build_result(plan: Plan, states: dict) -> Result:
    query = plan.query
    if query.group_by is None:
        return _single(plan, states.get(None), plan.population[None])
    result = _single(plan, None, 0)
    keys = sorted(states, key=lambda k: (isinstance(k, bool), k))
    result.groups = {key: _single(plan, states[key], plan.population[key]) for key in keys}
    result.n_items = sum(g.n_items for g in result.groups.values())
    return result


def _single(plan: Plan, state, population: int) -> Result:
    query, layer = plan.query, plan.bound.layer
    result = Result(kind=query.aggregate, statement=query.text, layer=layer.name, unit=query.unit,
                    source=plan.sampler_spec or "full", plan=plan)
    if state is None or state.count == 0:
        return result
    values = state.finalize()
    if query.aggregate == "topk":
        result.dense = values
        neurons = rank(values, query.k)
        values = values[neurons]
    else:
        neurons = np.arange(len(values))
    if plan.n_sample is not None:
        result.estimate = _estimate(plan, state, population, neurons)
    result.neurons = neurons
    result.values = values
    result.labels = neuron_labels(layer.name, layer.shape, neurons, query.unit == "channels")
    result.n_items = state.count
    return result


def _estimate(plan: Plan, state, population: int, neurons: np.ndarray) -> dict:
    query, sampler = plan.query, plan.bound.sampler
    reliable = getattr(sampler, "uniform", False)
    if query.aggregate == "argmax":
        return estimate.for_argmax(state, population, reliable)
    if query.aggregate == "topk" and query.order == "max":
        return estimate.unavailable("a sample's maximum is biased low and has no sampling "
                                    "distribution to estimate from; use BY MEAN or a baseline")
    return estimate.for_mean(state, population, neurons,
                             query.k if query.aggregate == "topk" else None, reliable)


def compare(approx: Result, exact: Result) -> None:
    """Attach the paper's metric for this aggregate, per group and overall."""
    name = metrics.METRIC_OF[approx.kind]
    if exact.groups is not None:
        approx.groups = approx.groups or {}
        for key, exact_group in exact.groups.items():
            # A group the sample missed: the empty answer _single gives a group without items.
            group = approx.groups.setdefault(key, _single(approx.plan, None, 0))
            group.baseline = exact_group
            group.metrics[name] = _metric(name, group, exact_group)
        approx.groups = dict(sorted(approx.groups.items(), key=lambda kv: (isinstance(kv[0], bool), kv[0])))
        approx.metrics[name] = float(np.mean([g.metrics[name] for g in approx.groups.values()
                                              if g.baseline is not None]))
    else:
        approx.metrics[name] = _metric(name, approx, exact)
    query_s, full_s = approx.timings.get("query"), approx.timings.get("baseline")
    if query_s and full_s:
        approx.metrics["speedup"] = full_s / query_s


def _metric(name: str, approx: Result, exact: Result) -> float:
    if approx.n_items == 0:
        return 0.0 if name == "precision" else 1.0
    if name == "precision":
        return metrics.precision(approx.neurons, exact.neurons)
    if name == "cosine_distance":
        return metrics.cosine_distance(approx.values, exact.values)
    return metrics.js_distance(approx.values, exact.values)
