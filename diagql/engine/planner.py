"""Bound query to plan: which items go through the model, in which groups, with which hooks.

Predicates are evaluated on the profile here, so only matching items ever reach the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from diagql.engine.covariates import Covariates, for_view
from diagql.engine.groups import group_values
from diagql.engine.prediction import BlockPrediction
from diagql.language import ast
from diagql.language.ast import predicate_text
from diagql.language.binder import BoundQuery
from diagql.model.profile import Profile


@dataclass(frozen=True)
class Plan:
    """The work one query needs; EXPLAIN prints it."""

    bound: BoundQuery
    items: np.ndarray  # sorted item indices to evaluate
    group_keys: np.ndarray | None  # the group value of each item, for GROUP BY
    n_data: int
    n_sample: int | None  # the sample's size; None when the query runs USING FULL
    sampler_spec: str | None
    seconds_per_item: float
    population: dict  # matching items of the whole data set, per group key (None: no GROUP BY)
    baseline: "Plan | None" = None
    # A sample's answer: "assisted" (the regression estimator, engine/regression.py) or
    # "plain" (the sample mean); the covariates of every item (engine/covariates.py, joined
    # only for the rows a pass reads) and their mean over each group's matching items, which
    # the assisted estimator corrects the sample toward.
    estimator: str | None = None
    covariates: Covariates | None = None
    covariate_means: dict | None = None
    # The view's block projections, when the profile kept them (engine/prediction.py), and
    # what the estimator fits on, for EXPLAIN.
    prediction: BlockPrediction | None = None
    estimator_text: str = ""
    # Every item's rows of the view, when the profile holds them (the latent or the logits):
    # the plan reads its items' rows there and runs no forward pass. What they are, for EXPLAIN.
    profile_rows: np.ndarray | None = None
    profile_what: str = ""
    choice: str = ""  # USING AUTO: what it chose and why (or how an UNTIL query grows)

    @property
    def query(self) -> ast.Query:
        return self.bound.query

    @property
    def approximate(self) -> bool:
        """Whether the plan answers from a sample (the one test of it for plans)."""
        return self.n_sample is not None

    def estimated_seconds(self) -> float:
        if self.profile_rows is not None:
            return 0.0
        return len(self.items) * self.seconds_per_item

    def explain(self) -> list[tuple[str, str]]:
        """(step, detail) rows, top to bottom in the order they run."""
        q = self.query
        rows = [("auto", self.choice)] if self.choice else []
        if not self.approximate:
            rows.append(("scan", f"all {self.n_data:,} items (USING FULL)"))
        else:
            rows.append(("sample", f"{self.sampler_spec}: {self.n_sample:,} of {self.n_data:,} "
                                   f"items, drawn in the latent space"))
        where = "WHERE " + predicate_text(q.where) if q.where is not None else "no predicate"
        rows.append(("filter", f"{where} on the profile → {len(self.items):,} items"))
        layer, view = self.bound.layer, self.bound.view
        unit = "channel means" if q.unit == "channels" else "neurons"
        axis = f", batch axis {layer.batch_axis}" if layer.batch_axis else ""
        hook = f"{layer.name} ({layer.shape_text()}{axis}); the pass stops once it has run"
        if layer.call:  # one call of a module that runs several times per pass
            hook = (f"{layer.module}, read at its call {layer.call} of {layer.calls} "
                    f"({layer.shape_text()}{axis}); the pass stops once that call has run")
        if self.profile_rows is not None:
            rows.append(("forward", f"none: the rows of {layer.name} are {self.profile_what} "
                                    f"(equal for every item, as the profile pass checked), read "
                                    f"from the profile for {len(self.items):,} items"))
        else:
            rows.append(("forward", f"{len(self.items):,} items in batches, hook on {hook}"))
        rows.append(("per item", f"{view.text() + ': ' if view.text() else ''}"
                                 f"{view.describe()} → {self.bound.n_neurons:,} {unit}"))
        agg = {"topk": f"top-{q.k} by {q.order}", "avg": "mean per neuron",
               "argmax": "histogram of each item's maximal neuron"}[q.aggregate]
        rows.append(("aggregate", agg + (f", per {q.group_by}" if q.group_by else "")))
        if self.estimator_text:
            rows.append(("estimator", self.estimator_text))
        rows.append(("cost", f"≈ {self.estimated_seconds():.3g} s (from the profile pass)"))
        if self.baseline is not None:
            rows.append(("baseline", f"exact answer over {len(self.baseline.items):,} items, ≈ "
                                     f"{self.baseline.estimated_seconds():.3g} s"))
        elif q.baseline:
            rows.append(("baseline", "none: the answer is exact already"))
        return rows


def plan_query(bound: BoundQuery, profile: Profile, sample: np.ndarray | None,
               sampler_spec: str | None, estimator: str | None = "assisted", *,
               rows_from_profile: bool = True) -> Plan:
    """The plan of a bound query on ``profile``. ``rows_from_profile``: whether the profile's
    latent and logit rows are the query's model's own (docs/ARCHITECTURE.md, "Several
    models"), so that a query on those layers may read them instead of running the model."""
    query = bound.query
    rows = profile.rows_of(bound.view.key) if rows_from_profile else None  # SIMILARITY: False
    mask = predicate_mask(query.where, profile)
    matching = np.flatnonzero(mask)
    keys = group_values(query.group_by, profile)
    if keys is None:
        population = {None: len(matching)}
    else:
        values, counts = np.unique(keys[matching], return_counts=True)
        population = dict(zip(values.tolist(), counts.tolist()))
    full = _plan(bound, profile, rows, matching, keys, population, None, None)
    if sample is None:
        return full
    items = sample[mask[sample]]
    plan = _plan(bound, profile, rows, items, keys, population, len(sample), sampler_spec,
                 baseline=full if query.baseline else None)
    if estimator is None or (query.aggregate == "topk" and query.order == "max"):
        return plan  # a maximum has no regression estimator
    if estimator == "plain":  # no covariates: the pass streams no sums it would not use
        return dataclasses.replace(plan, estimator=estimator,
                                   estimator_text="plain: the sample mean")
    chosen = for_view(profile, bound.view.key, own=rows_from_profile)
    z = chosen.z
    means = z.means(matching, None if keys is None else keys[matching], population)
    prediction = chosen.prediction(bound.view.layer.shape[0] if bound.view.channels else None)
    text = chosen.describe(profile)
    return dataclasses.replace(plan, estimator=estimator, covariates=z, covariate_means=means,
                               prediction=prediction, estimator_text=text)


def _plan(bound, profile, rows, items, keys, population, n_sample, spec, baseline=None) -> Plan:
    what = ""
    if rows is not None:
        what = ("the profile's logits" if rows is profile.logits
                else f"the profile's latent ({profile.latent_layer})")
    return Plan(bound, items, None if keys is None else keys[items], len(profile), n_sample, spec,
                profile.seconds_per_item(), population, baseline, profile_rows=rows,
                profile_what=what)


_OPS = {"=": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal,
        ">": np.greater, ">=": np.greater_equal}


def predicate_mask(pred: ast.Predicate | None, profile: Profile) -> np.ndarray:
    """Which items satisfy the predicate, computed on the profile alone."""
    if pred is None:
        return np.ones(len(profile), dtype=bool)
    if isinstance(pred, ast.And):
        return predicate_mask(pred.left, profile) & predicate_mask(pred.right, profile)
    if isinstance(pred, ast.Or):
        return predicate_mask(pred.left, profile) | predicate_mask(pred.right, profile)
    if isinstance(pred, ast.Not):
        return ~predicate_mask(pred.operand, profile)
    if isinstance(pred, ast.Flag):
        return profile.correct if pred.name == "correct" else ~profile.correct
    column = {"class": profile.labels, "predicted": profile.predictions,
              "confidence": profile.confidence}[pred.field]
    if isinstance(pred, ast.Member):
        inside = np.isin(column, np.asarray(pred.values))
        return ~inside if pred.negated else inside
    return _OPS[pred.op](column, pred.value)

