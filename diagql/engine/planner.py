"""Bound query to plan: which items go through the model, in which groups, with which hooks.

Predicates are evaluated on the profile here, so only matching items ever reach the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from diagql.engine import extrapolation
from diagql.engine.covariates import Covariates, for_view, once_per_profile
from diagql.engine.groups import group_values
from diagql.engine.leverage import row_weights
from diagql.engine.nonfinite import NonFinite
from diagql.engine.prediction import BlockPrediction, fit_rows
from diagql.engine.regression import directions as pooled_directions
from diagql.engine.ridge import RIDGE
from diagql.errors import ExecutionError
from diagql.language import ast
from diagql.language.ast import predicate_text
from diagql.language.binder import BoundQuery
from diagql.model.auxiliaries import Rebuilt
from diagql.model.hooks import SOME_BATCHES
from diagql.model.profile import Profile
from diagql.model.views import CHANNELS_LAST


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
    explainer: Callable | None = None  # what writes a plan's EXPLAIN rows, when not ``explain``
    covariates: Covariates | None = None
    covariate_means: dict | None = None
    # The view's block projections, when the profile kept them (engine/prediction.py), and
    # what the estimator fits on, for EXPLAIN.
    prediction: BlockPrediction | None = None
    estimator_text: str = ""
    neighbour: str | None = None  # the block whose leading projections the fit also takes
    feeder: str | None = None  # and the block before it, when the view is inside it
    # An ARGMAX's exact shares per group key, when the profile knows every item's winner of
    # the view (``winner_shares``): the assisted answer, with no error.
    winner_shares: dict | None = None
    # Each group key's factor the extrapolation check widens a mean's standard errors by
    # (None, or 1.0: it found the fit honest; engine/extrapolation.py), at RIDGE; and the
    # same check of a fit at another ridge (engine/ridge.py: the fit's rows may choose one).
    widening: dict | None = None
    recheck: Callable[[float], dict] | None = None
    # A mean's pooled slope directions (p × d, engine/regression.py: Pooled): what its pass
    # streams the values against on every sampled row, one direction per group at most.
    directions: np.ndarray | None = None
    # A mean's fit rows among ``items`` (engine/prediction.py: fit_rows; None: every one) and
    # each item's leverage weights (n × 4, nonzero on the fit rows' latent outliers:
    # engine/leverage.py), made once here for every Reducer of the plan.
    fit: np.ndarray | None = None
    leverage: np.ndarray | None = None
    # Every item's rows of the view, when the profile holds them (the latent or the logits; a
    # sample's, rebuilt from block directions that span the view): the plan reads its items'
    # rows there and runs no forward pass. What they are, for EXPLAIN.
    profile_rows: np.ndarray | Rebuilt | None = None
    profile_what: str = ""
    # Every item's winner of the view, when the profile pass kept them (model/winners.py) and
    # the query is an ARGMAX: its states are counted from them, with no forward pass.
    profile_winners: np.ndarray | None = None
    # The matching items whose rows of the view hold NaN or inf, as the profile pass's winners
    # mark them: refused before any pass (engine/answers.py, require_matches), a sample's too,
    # which would otherwise answer as if they were not there.
    nonfinite: NonFinite | None = None
    choice: str = ""  # USING AUTO: what it chose and why (or how an UNTIL query grows)
    # Why the sample's estimate is not given though the answer is (another model's layer under
    # a sampler that draws unevenly on this one's profile: session/statements.py).
    unchecked: str = ""
    # The classes' names, which EXPLAIN and messages write a WHERE's classes by (None: indices).
    class_names: tuple | None = None

    @property
    def query(self) -> ast.Query:
        return self.bound.query

    @property
    def approximate(self) -> bool:
        """Whether the plan answers from a sample (the one test of it for plans)."""
        return self.n_sample is not None

    @property
    def from_profile(self) -> bool:
        """Whether the plan reads the profile instead of running the model."""
        return self.profile_rows is not None or self.profile_winners is not None

    def estimated_seconds(self) -> float:
        if self.from_profile:
            return 0.0
        return len(self.items) * self.seconds_per_item

    def __repr__(self) -> str:
        """What EXPLAIN shows, one step a line (its dataclass repr, the profile's arrays and
        the covariates in it, had run to 7-14 KB)."""
        return "\n".join([f"<Plan of {self.query.text or type(self.query).__name__}:",
                          *(f"  {step}: {detail}" for step, detail in self.explain())]) + ">"

    def explain(self) -> list[tuple[str, str]]:
        """EXPLAIN's (step, detail) rows in the order they run; a SIMILARITY's are its
        ``explainer``'s (engine/similarity.py, a later module: planner.py cannot import it)."""
        if self.explainer is not None:
            return self.explainer(self)
        return self._query_rows()

    def _query_rows(self) -> list[tuple[str, str]]:
        """(step, detail) rows, top to bottom in the order they run."""
        q = self.query
        # UNTIL / WITHIN's choice is how the sample grows, USING AUTO's or not (it had been
        # labelled "auto" under USING SAMPLE random: sweep SX7).
        grows = getattr(q, "until", None) is not None
        rows = [("grow" if grows else "auto", self.choice)] if self.choice else []
        if not self.approximate:
            rows.append(("scan", f"all {self.n_data:,} items (USING FULL)"))
        else:
            rows.append(("sample", f"{self.sampler_spec}: {self.n_sample:,} of {self.n_data:,} "
                                   f"items, drawn in the latent space"))
        where = "WHERE " + predicate_text(q.where, self.class_names) if q.where is not None \
            else "no predicate"
        rows.append(("filter", f"{where} on the profile → {len(self.items):,} items"))
        layer, view = self.bound.layer, self.bound.view
        unit = "channel means" if q.unit == "channels" else "neurons"
        axis = f", batch axis {layer.batch_axis}" if layer.batch_axis else ""
        hook = f"{layer.name} ({layer.shape_text()}{axis}); the pass stops once it has run"
        if layer.call:  # one call of a module that runs several times per pass
            hook = (f"{layer.module}, read at its call {layer.call} of {layer.calls} "
                    f"({layer.shape_text()}{axis}); the pass stops once that call has run")
        if isinstance(self.profile_rows, Rebuilt):  # no rows compared: their directions span
            rows.append(("forward", f"none: the {held_rows(view)} are {self.profile_what}, "
                                    f"for {len(self.items):,} items"))
        elif self.profile_rows is not None:
            rows.append(("forward", f"none: the {held_rows(view)} are {self.profile_what} "
                                    f"(equal for every item, as the profile pass checked), read "
                                    f"from the profile for {len(self.items):,} items"))
        elif self.profile_winners is not None:
            which = ("channel with the largest mean" if view.channels
                     else "maximally activated neuron")
            rows.append(("forward", f"none: every item's winner of {layer.name} (its {which}) "
                                    f"is kept by the profile pass, read for "
                                    f"{len(self.items):,} items"))
        else:
            rows.append(("forward", f"{len(self.items):,} items in batches, hook on {hook}"))
        rows.append(("per item", f"{view.text() + ': ' if view.text() else ''}"
                                 f"{view.describe()} → {self.bound.n_neurons:,} {unit}"))
        agg = {"topk": f"top-{q.k} by {q.order}", "avg": "mean per neuron",
               "argmax": "histogram of each item's maximal "
                         + ("channel" if q.unit == "channels" else "neuron")}[q.aggregate]
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
               rows_from_profile: bool = True, unran: tuple | None = None) -> Plan:
    """The plan of a bound query on ``profile``. ``rows_from_profile``: whether the profile's
    latent and logit rows are the query's model's own (docs/ARCHITECTURE.md, "Several
    models"), so that a query on those layers may read them instead of running the model.
    ``unran``: the layers of the query's model that did not run in some batch of a profile
    pass, where known (None: ``profile``'s, when it is the model's own)."""
    query = bound.query
    if unran is None:
        unran = profile.unran if rows_from_profile else ()
    if unran and bound.view.layer.name in unran:
        # A sample's batches hold other items together than a pass's: it had answered on
        # values the model computed only beside longer items (a cell stepped over padding).
        raise ExecutionError(f"layer {bound.view.layer.name!r} did not run in every batch "
                             f"of the profile pass as it ran in DiagQL's probe: "
                             f"{SOME_BATCHES}", **span_place(query.layer.span))
    rows = profile.rows_of(bound.view.held_key) if rows_from_profile else None  # SIMILARITY
    winners = profile_winners(bound, profile) if rows_from_profile and rows is None else None
    mask = predicate_mask(query.where, profile)
    matching = np.flatnonzero(mask)
    keys = group_values(query.group_by, profile)
    if keys is None:
        population = {None: len(matching)}
    else:
        values, counts = np.unique(keys[matching], return_counts=True)
        population = dict(zip(values.tolist(), counts.tolist()))
    bad = _nonfinite(profile.winners_of(bound.view), matching, bound.view.neurons) \
        if rows_from_profile else None
    full = _plan(bound, profile, rows, matching, keys, population, None, None, winners=winners,
                 nonfinite=bad)
    if sample is None:
        return full
    items = sample[mask[sample]]
    plan = _plan(bound, profile, rows, items, keys, population, len(sample), sampler_spec,
                 baseline=full if query.baseline else None, winners=winners, nonfinite=bad)
    if estimator is None or (query.aggregate == "topk" and query.order == "max"):
        return plan  # a maximum has no regression estimator
    if estimator == "plain":  # no covariates: the pass streams no sums it would not use
        return dataclasses.replace(plan, estimator=estimator,
                                   estimator_text="plain: the sample mean")
    chosen = for_view(profile, bound.view.key, own=rows_from_profile, before=bound.before,
                      held_key=bound.view.held_key, rebuild=bound.repeatable,
                      upstream=bound.upstream)
    text = chosen.describe(profile)
    if query.aggregate == "argmax" and rows_from_profile:  # its winners are the profile's model's
        shares = winner_shares(profile.winners_of(bound.view), matching,
                               None if keys is None else keys[matching], population,
                               bound.n_neurons)
        if shares is not None:  # counted, not fitted: no covariates to stream or to average
            return dataclasses.replace(plan, estimator=estimator,
                                       estimator_text=text + "; ARGMAX exact from every "
                                                             "item's winner",
                                       winner_shares=shares)
    z = chosen.z
    # The means, and the check's widening below, are kept per matching set: every item, or a
    # digest of the items and their group keys (None, keys of no plain numbers: not kept). A
    # hot query with a WHERE had averaged them again (at 2M items 200 ms of its 320).
    every = len(matching) == len(profile)
    subset = keys if every or keys is None else keys[matching]
    matched = "every" if every else _items_digest(matching, subset)
    # By the held key: a map's CHANNELS held as the latent has other covariates than its neurons.
    place = (id(profile), bound.view.held_key, rows_from_profile, query.group_by, matched)

    def kept(key, make):
        return make() if matched is None else once_per_profile(_MEANS, key, profile, make)

    means = kept(place, lambda: z.means(matching, subset, population))
    layer = bound.view.layer
    prediction = chosen.prediction(layer.channels if bound.view.channels else None,
                                   channels_last=layer.layout == CHANNELS_LAST)
    p = prediction.p if prediction is not None else z.width
    unique, codes = (np.array([None]), None) if plan.group_keys is None else \
        np.unique(plan.group_keys, return_inverse=True)  # as the Reducer's codes
    sums = _assisted_bytes(len(unique), p, bound.n_neurons)
    if sums > ASSISTED_MEMORY and not chosen.exact:  # a held view's answer is exact
        return dataclasses.replace(plan, estimator="plain", estimator_text=(
            f"plain: the sample mean; the assisted estimate's sums would hold "
            f"{sums / 2**30:,.1f} GiB (groups x {p} covariates x {bound.n_neurons:,} "
            f"neurons, float64), over its {ASSISTED_MEMORY / 2**30:.0f} GiB limit"))
    directions = fit = leverage = None
    if query.aggregate != "argmax":
        codes = None if codes is None else codes.reshape(-1)
        rows, population_z = z.rows(items, p), [means[k][:p] for k in unique.tolist()]
        directions = pooled_directions(rows, codes, population_z)
        fit = fit_rows(codes, len(items))
        leverage = row_weights(rows, codes, population_z, fit, RIDGE)
    widening = recheck = None
    check = None if query.aggregate == "argmax" else \
        extrapolation.check_for(profile, bound.view.layer.name, chosen)
    # A sample of every matching item answers exactly: nothing is extrapolated to check.
    if check is not None and 0 < len(items) < len(matching):
        digest = _items_digest(items, None)

        def checked_at(ridge: float) -> dict:
            # Kept with the sample too: its check averaged its columns over the matching items.
            return kept(("widening", *place, digest, check.what, ridge),
                        lambda: extrapolation.widening(check, z, items, keys, matching,
                                                       population, means, ridge))

        widening, recheck = checked_at(RIDGE), checked_at
        text += f"; checked on {check.what}: " + extrapolation.describe(widening)
    if _rebuilds(chosen, query):
        k = chosen.auxiliary.basis.shape[1]
        plan = dataclasses.replace(plan, profile_rows=Rebuilt(chosen.auxiliary),
                                   profile_what=f"rebuilt from all {k} of its principal "
                                                f"components kept by the profile pass")
    return dataclasses.replace(plan, estimator=estimator, covariates=z, covariate_means=means,
                               prediction=prediction, estimator_text=text,
                               neighbour=None if chosen.neighbour is None else
                               chosen.neighbour.layer,
                               feeder=None if chosen.feeder is None else chosen.feeder.layer,
                               widening=widening, recheck=recheck, directions=directions,
                               fit=fit, leverage=leverage)


# What a sample query's assisted sums may hold (float64): a GROUP BY's per group, covariates
# x neurons (regression.CrossSums), 8.8 GB for 100 classes of a 262,144-neuron map, had
# exhausted memory (sweep II2). Past it the query takes the plain estimator and says why.
ASSISTED_MEMORY = 2 * 2**30


def _assisted_bytes(groups: int, p: int, neurons: int) -> int:
    """The bytes of a sample's assisted sums: per group present, Σzyᵀ (p x neurons) and the
    four neuron-wide sums beside it."""
    return groups * (p + 4) * neurons * 8


# The covariates' means over every item, or a WHERE's matching items (by their digest), per
# profile, view and grouping (``plan_query``): at 100,000 items a block's 74 columns take
# 0.010 s to average, which every query paid. At most _KEPT_MEANS sets of them are kept.
_MEANS: dict = {}
_KEPT_MEANS = 256


def _items_digest(matching: np.ndarray, keys: np.ndarray | None) -> str | None:
    """A digest of a query's matching items and their group keys (None where the keys are
    not plain numbers); the memo of their means is emptied when it holds _KEPT_MEANS."""
    import xxhash

    if len(_MEANS) >= _KEPT_MEANS:
        _MEANS.clear()
    digest = xxhash.xxh3_128()
    digest.update(np.ascontiguousarray(matching, dtype=np.int64))
    if keys is not None:
        if keys.dtype.kind not in "biuf":
            return None
        digest.update(np.ascontiguousarray(keys))
        digest.update(keys.dtype.str.encode())
    return digest.hexdigest()


def winner_shares(winners: np.ndarray | None, matching: np.ndarray, keys: np.ndarray | None,
                  population: dict, width: int) -> dict | None:
    """Each group's exact ARGMAX shares of the ``width`` neurons over its matching items
    (``keys``: theirs; None: one group) from every item's winner (model/winners.py); None when
    the winners are not known."""
    if winners is None or (len(matching) and int(winners[matching].max()) >= width):
        return None  # ``width``: an item whose row held NaN or inf (model/winners.py)
    if keys is None:
        counts = np.bincount(winners[matching], minlength=width)
        return {None: counts / max(len(matching), 1)}
    groups, codes = np.unique(keys, return_inverse=True)
    codes = codes.reshape(-1)
    counts = np.bincount(codes * width + winners[matching],
                         minlength=len(groups) * width).reshape(len(groups), width)
    return {key: counts[g] / max(counts[g].sum(), 1)
            for g, key in enumerate(groups.tolist()) if key in population}


def _nonfinite(winners: np.ndarray | None, matching: np.ndarray, width: int) -> NonFinite | None:
    """The matching items whose winner is ``width``: their rows held NaN or inf."""
    if winners is None or not len(matching):
        return None
    bad = NonFinite()
    bad.add(matching, winners[matching] == width)
    return bad if bad.count else None


def _plan(bound, profile, rows, items, keys, population, n_sample, spec, baseline=None,
          winners=None, nonfinite=None) -> Plan:
    what = ""
    if rows is not None:
        what = ("the profile's logits" if rows is profile.logits
                else f"the profile's latent ({profile.latent_layer})")
    return Plan(bound, items, None if keys is None else keys[items], len(profile), n_sample, spec,
                profile.seconds_per_item(pass_layers(bound)), population, baseline,
                profile_rows=rows,
                profile_what=what, profile_winners=winners, nonfinite=nonfinite)


def span_place(span) -> dict:
    """An error's place: a part of the statement (its layer's name, its WHERE), where given."""
    if span is None:
        return {}
    return {"line": span.line, "column": span.column,
            "end_column": span.end_column if span.end_line == span.line else None}


def pass_layers(bound) -> tuple[str, ...]:
    """The layers a bound statement's pass hooks, whose share of the profile pass it costs
    (``Profile.seconds_per_item``): a query's one, a SIMILARITY's each."""
    views = getattr(bound, "views", None) or (bound.view,)
    return tuple(view.layer.name for view in views)


def profile_winners(bound: BoundQuery, profile: Profile) -> np.ndarray | None:
    """Every item's winner of the query's view (its neurons', or its channels') when the
    profile pass kept them (model/winners.py) and the query is an ARGMAX: it is then counted
    from them, with no forward pass. Only for the profile's own model (the caller's
    ``rows_from_profile``)."""
    if bound.query.aggregate != "argmax":
        return None
    return profile.winners_of(bound.view)


def _rebuilds(chosen, query: ast.Query) -> bool:
    """Whether a sample plan reads each sampled item's row rebuilt from its block's directions,
    which span the view (``Chosen.held``), as the latent's are read: no pass, and the assisted
    answer is exact. Not an ARGMAX, whose winners would follow the rebuilt rows' rounding, nor
    a maximum, which has no assisted answer."""
    return chosen.held == "spanned" and query.aggregate != "argmax" and \
        not (query.aggregate == "topk" and query.order == "max")


def rebuilt_from_profile(bound: BoundQuery, profile: Profile) -> str | None:
    """What makes an assisted sample's answer to this query of the profile's own model exact
    with no forward pass (``_rebuilds``), for USING AUTO; None when nothing does."""
    chosen = for_view(profile, bound.view.key, before=bound.before,
                      held_key=bound.view.held_key, rebuild=bound.repeatable,
                      upstream=bound.upstream)
    if not _rebuilds(chosen, bound.query):
        return None
    return (f"every item's rows of {bound.layer.name} are rebuilt from its "
            f"{chosen.auxiliary.basis.shape[1]} principal components in the profile")


def held_rows(view) -> str:
    """What of a view the profile holds (View.held_key): a map's channel means, else rows."""
    return f"{'channel means' if view.channels else 'rows'} of {view.layer.name}"


def answered_from_profile(bound: BoundQuery, profile: Profile) -> str | None:
    """What of the profile answers this query of the profile's own model exactly with no
    forward pass (for USING AUTO and UNTIL), or None."""
    if profile.rows_of(bound.view.held_key) is not None:
        return f"the {held_rows(bound.view)} are in the profile"
    if profile_winners(bound, profile) is not None:
        return f"every item's winner of {bound.layer.name} is in the profile"
    return None


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
    if pred.field == "confidence":
        # At float32's precision, as the model's own scores and torch's comparisons: a head of
        # probabilities' 0.7 (0.699999988 kept as float64) had failed confidence >= 0.7
        # (sweep SX10).
        return _OPS[pred.op](column.astype(np.float32), np.float32(pred.value))
    return _OPS[pred.op](column, pred.value)

