"""The answer to a statement: arrays for programs, a table for people, dicts and frames for both.

A query's answer carries what render and programs need to know about it in its own types
(``Provenance``, ``Estimate``), so nothing here reads the engine's plan.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diagql.errors import DiagQLError
from diagql.language.ast import AGGREGATES
from diagql.results.formats import key_columns
from diagql.results.metrics import Metric

# The aggregates, which are also the kinds of a query's Result.


@dataclass(frozen=True)
class Growth:
    """How an error-bounded query (``UNTIL`` / ``WITHIN``) grew its sample, and why it stopped."""

    target: str | None  # "precision >= 0.9"; None: a time budget alone
    budget: float | None  # seconds (WITHIN), or None
    sizes: tuple[int, ...]  # the sample's items after each round
    reached: float | None  # the final round's estimate of the target's metric (worst group)
    stop: str  # one of STOPS
    seconds: float  # the whole growth, draws and passes included
    exact: bool = False  # the answer is exact: exact was cheaper, or a round held every item
    # Each round's draw joined with the rounds before (a sampler whose larger draws do not hold
    # its smaller ones, samplers.Ladder): the last round's call names fewer items than it holds.
    joined: bool = False

    def text(self) -> str:
        """One line for the table's caption and the JSON."""
        rounds = " → ".join(f"{n:,}" for n in self.sizes)
        goal = [f"until {self.target}"] if self.target else []
        if self.budget is not None:
            goal.append(f"within {self.budget:g} s")
        # Three significant digits: a cosine of 0.0003 read "reached 0.000" at three places.
        reached = f", reached {self.reached:.3g}" if self.reached is not None else ""
        end = "answered exactly" if self.exact else f"{len(self.sizes)} round" + \
            ("s" if len(self.sizes) != 1 else "")
        # No round at all: exact was cheaper than the first sample (a layer the profile holds).
        grown = f"grown {rounds} items" if self.sizes else "no sample drawn"
        if self.joined:
            grown += ", each round's draw joined with the ones before it"
        return (f"{grown} ({' '.join(goal)}): {self.stop}{reached}; {end}, "
                f"{self.seconds:.3f} s")

    def to_dict(self) -> dict:
        return {"target": self.target, "budget": self.budget, "sizes": list(self.sizes),
                "reached": self.reached, "stop": self.stop, "seconds": self.seconds,
                "exact": self.exact, "joined": self.joined}


STOPS = ("target met", "budget spent", "exact cheaper", "data exhausted")


@dataclass(frozen=True)
class Provenance:
    """Where a query's answer comes from: all items or a sample of them, and how it was asked."""

    n_data: int  # items in the data set
    sampler: str | None = None  # the sampler call, e.g. "stratified(0.05, random_state=0)"
    n_sample: int | None = None  # the sample's size; None with the sampler: every item
    group_by: str | None = None  # "class" | "predicted" | "correct"
    order: str = "mean"  # what TOPK ranks by: "mean" or "max"
    choice: str | None = None  # USING AUTO: what it chose and why
    growth: Growth | None = None  # UNTIL / WITHIN: how the sample grew and why it stopped
    # A sample's: the matching items of the whole data (the profile knows every item's
    # label), of which ``n_items`` were sampled.
    matching: int | None = None

    def __post_init__(self):
        if (self.sampler is None) != (self.n_sample is None):
            raise ValueError("a sample has both a sampler and a size, an exact answer neither")

    @property
    def approximate(self) -> bool:
        """Whether the answer comes from a sample: the one test of it for results."""
        return self.sampler is not None

    @property
    def source(self) -> str:
        return self.sampler if self.sampler is not None else "full"

    def matched(self, n_items: int) -> str:
        """What a caption says of the matching items: a sample's ``n_items`` of the data's
        (``12 of 250 matching items``), else all of them."""
        plural = "" if (self.matching or n_items) == 1 else "s"
        if self.matching not in (None, n_items):
            return f"{n_items:,} of {self.matching:,} matching item{plural}"
        return f"{n_items:,} matching item{plural}"

    def describe(self) -> str:
        """What a caption says of where the answer comes from."""
        if self.approximate:
            return f"sample {self.sampler}: {self.n_sample:,} of {self.n_data:,} items"
        return f"exact over all {self.n_data:,} items"


@dataclass(frozen=True, eq=False)
class Estimate:
    """What a sample alone says about its answer's accuracy (engine/estimate.py computes it).

    An unreliable estimate is not shown: ``reason`` says why when there is one beyond the
    sampler's (a non-uniform sampler's estimate is computed but cannot see its bias).
    """

    covers: str  # what the estimate accounts for, and what not
    reliable: bool
    level: float | None = None  # of the confidence intervals, e.g. 0.95
    n: int | None = None  # matching sampled items
    population: int | None = None  # matching items of the whole data set
    reason: str | None = None
    ci_low: np.ndarray | None = None  # per reported neuron
    ci_high: np.ndarray | None = None
    p_in_topk: np.ndarray | None = None  # TOPK: P(the neuron is in the true top-k)
    metric: Metric | None = None  # the metric whose expected value ``expected`` is
    expected: float | None = None
    # "assisted" (the answer and its estimate come from a regression on the latent: reliable
    # for every sampler) or "plain" (the sample mean: reliable for uniform samplers only)
    estimator: str | None = None
    # The answer is exact: an ARGMAX counted from the profile's winners, or a sample that
    # holds every matching item.
    exact: bool = False
    # The factor the intervals were widened by because the fit, checked on values known for
    # every item, missed them by more than its own standard errors (engine/prediction.py).
    widened: float | None = None
    # Where the sample mean answers instead of the fit (a uniform sample, ``estimator``
    # "plain"): the factor the fit's check had widened its errors by, past the mean's own.
    fit_refused: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready, the fields that are set, the expected value as "expected_<metric>"."""
        out = {"covers": self.covers, "reliable": self.reliable}
        if self.exact:
            out["exact"] = True
        for name in ("estimator", "level", "n", "population", "reason", "ci_low", "ci_high",
                     "p_in_topk", "widened", "fit_refused"):
            value = getattr(self, name)
            if value is not None:
                out[name] = _jsonable(value)
        if self.metric is not None:
            out[self.metric.estimate_key] = _jsonable(self.expected)
        return out


@dataclass(frozen=True, eq=False)
class RankedItems:
    """What a TOPK k INPUTS answer says about each item it ranks (in its order): the true
    label (None for data without labels), the model's prediction and confidence, and what
    the item looks like (an image array (H, W) or (H, W, 3), a list of tokens, or None)."""

    neuron: str  # the neuron's label, e.g. conv2[5,3,3]
    largest: bool  # TOPK (True) or BOTTOMK
    labels: np.ndarray | None
    predictions: np.ndarray
    confidence: np.ndarray
    previews: tuple = ()
    how: str = ""  # how the answer was found (the index, items read), for the caption

    def records(self, items: np.ndarray, values: np.ndarray, names=None) -> list[dict]:
        rows = []
        for j, (item, value) in enumerate(zip(items.tolist(), values.tolist())):
            row = {"rank": j + 1, "item": item, "value": value,
                   **key_columns("label", None if self.labels is None else int(self.labels[j]),
                                 names),
                   **key_columns("predicted", int(self.predictions[j]), names),
                   "confidence": float(self.confidence[j])}
            preview = self.previews[j] if j < len(self.previews) else None
            if isinstance(preview, list):
                row["tokens"] = " ".join(preview)
            rows.append(row)
        return rows


@dataclass(eq=False)
class Result:
    """One statement's answer.

    Query results (``kind`` one of ``AGGREGATES``) fill ``neurons`` (flat C-order indices:
    rank order for TOPK, every neuron in index order otherwise), ``labels``, ``values`` (the
    ranking aggregate, the means, or the fraction of items whose maximal neuron it is) and
    ``provenance``. SIMILARITY (``kind`` ``similarity``) fills ``labels`` (its layers),
    ``matrix``, ``value`` (two layers), ``provenance`` and for a sample ``estimate`` (its
    ``ci_low``/``ci_high`` are matrices too). Other statements (``kind`` ``table``, ``set``,
    ``explain``, ``evaluation``) fill ``columns`` and ``rows``.
    """

    kind: str
    statement: str = ""
    layer: str | None = None
    unit: str | None = None
    neurons: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    labels: list[str] = field(default_factory=list)
    values: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    n_items: int = 0
    groups: dict[Any, Result] | None = None
    estimate: Estimate | None = None  # a sample's answer only
    baseline: Result | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    provenance: Provenance | None = None  # a query's answer only
    # The engine's plan (EVALUATE: its bound statement), for programs; nothing in results/
    # reads it, so that results stay below the engine.
    plan: Any = field(default=None, repr=False)
    title: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # TOPK keeps its aggregate for every neuron, so the exact value of any neuron can be shown.
    dense: np.ndarray | None = field(default=None, repr=False)
    # ACROSS CHECKPOINTS (kind "across"): each model's own Result by name, in training order,
    # and each row of the answer as numbers over them (what its plot draws).
    checkpoints: dict[str, Result] | None = None
    series: dict[str, list[float]] | None = field(default=None, repr=False)
    # An across table's rows turned (its answer's rows down, a column per model), which the
    # table shows where its own layout is too wide (results/render.py); JSON keeps
    # ``columns`` and ``rows``, and records (CSV, pandas) are each model's own.
    turned: tuple | None = field(default=None, repr=False)
    # SIMILARITY (``labels`` are its layers as given, ``unit`` its measure): every pair's CKA,
    # rows and columns in the order given, and for two layers ``value``, their CKA.
    matrix: np.ndarray | None = None
    value: float | None = None
    # TOPK k INPUTS (kind "inputs"): the dataset indices of the items ranked, best first,
    # their activations in ``values``, the neuron in ``neurons``/``labels``, the rest here.
    items: np.ndarray | None = None
    ranked: RankedItems | None = field(default=None, repr=False)
    # The classes' names, when known (connect's classes=, the data's, the model's): GROUP BY
    # class or predicted shows them beside the indices that key ``groups``.
    class_names: list[str] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        """Pickled (and copied) as its data: the engine's plan, which holds closures and the
        profile's arrays, stays behind (a sampled answer's had failed to pickle)."""
        return {**self.__dict__, "plan": None}

    @property
    def is_query(self) -> bool:
        return self.kind in AGGREGATES

    @property
    def approximate(self) -> bool:
        return self.provenance is not None and self.provenance.approximate

    @property
    def source(self) -> str:
        """What the answer is over: "full", or the sampler call ("stratified(0.05, ...)")."""
        return self.provenance.source if self.provenance is not None else "full"

    def __len__(self) -> int:
        if self.groups is not None:  # its groups (it had been 0: SW9)
            return len(self.groups)
        if self.kind == "similarity" or self.items is not None:  # its layers, its items
            return len(self.labels if self.items is None else self.items)
        return len(self.neurons) if self.is_query else len(self.rows)

    def __bool__(self) -> bool:  # a result is an answer, also one of no rows (GROUP BY's)
        return True

    def value_of(self, neuron: int) -> float | None:
        """This result's aggregate for one neuron, by its flat index (TOPK knows it for
        neurons outside its top-k); None for one it does not hold. A GROUP BY result's
        values are its groups': ``result.groups[key].value_of(n)``."""
        _check_neuron(self, neuron)
        if self.dense is not None:
            return float(self.dense[neuron])
        hits = np.flatnonzero(self.neurons == neuron)
        return float(self.values[hits[0]]) if len(hits) else None

    # --- conversions -------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain JSON-ready data (lists, floats, strings)."""
        if self.kind == "similarity":
            return self._similarity_dict()
        if self.ranked is not None:
            return {"kind": self.kind, "statement": self.statement, "layer": self.layer,
                    "neuron": self.ranked.neuron, "source": self.source,
                    "n_items": self.n_items, "items": self.records(),
                    "timings": {k: float(v) for k, v in self.timings.items()},
                    "notes": list(self.notes)}
        if not self.is_query:
            out = {"kind": self.kind, "statement": self.statement, "title": self.title,
                   "columns": list(self.columns), "rows": [list(map(_plain, r)) for r in self.rows],
                   "notes": list(self.notes)}
            if self.kind == "evaluation":  # a benchmark: how long it took is part of the answer
                out.update(n_items=self.n_items,
                           timings={k: float(v) for k, v in self.timings.items()})
            if self.checkpoints is not None:
                out["checkpoints"] = {name: answer.to_dict()
                                      for name, answer in self.checkpoints.items()}
            return out
        out = {
            "kind": self.kind, "statement": self.statement, "layer": self.layer,
            "unit": self.unit, "source": self.source, "n_items": self.n_items,
            "neurons": self.neurons.tolist(), "labels": list(self.labels),
            "values": [_number_or_none(v) for v in self.values],
            "metrics": {k: _number_or_none(v) for k, v in self.metrics.items()},
            "timings": {k: float(v) for k, v in self.timings.items()},
            "estimate": self.estimate.to_dict() if self.estimate is not None else None,
            "notes": list(self.notes),
        }
        provenance = self.provenance
        if provenance is not None and provenance.choice is not None:
            out["choice"] = provenance.choice
        if provenance is not None and provenance.growth is not None:
            out["growth"] = provenance.growth.to_dict()
        if provenance is not None and provenance.matching is not None:
            out["matching_in_data"] = provenance.matching
        return self._with_parts(out)

    def _with_parts(self, out: dict) -> dict:
        """``out`` with the groups' and the baseline's own dicts, where there are."""
        if self.groups is not None:
            out["groups"] = [{"group": _plain(key), **group.to_dict()}
                             for key, group in self.groups.items()]
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_dict()
        return out

    def _similarity_dict(self) -> dict:
        out = {"kind": self.kind, "statement": self.statement, "layers": list(self.labels),
               "measure": self.unit, "source": self.source, "n_items": self.n_items,
               "value": _number_or_none(self.value),
               "matrix": None if self.matrix is None else
               [[_number_or_none(v) for v in row] for row in self.matrix.tolist()],
               "metrics": {k: _number_or_none(v) for k, v in self.metrics.items()},
               "timings": {k: float(v) for k, v in self.timings.items()},
               "estimate": self.estimate.to_dict() if self.estimate is not None else None,
               "notes": list(self.notes)}
        return self._with_parts(out)

    def parts(self) -> list[Result]:
        """Each group's result, or this one without GROUP BY."""
        return list(self.groups.values()) if self.groups is not None else [self]

    def records(self) -> list[dict]:
        """One flat row per (group, neuron): what CSV and pandas show."""
        if self.kind == "similarity":
            return _similarity_records(self)
        if self.ranked is not None:
            return self.ranked.records(self.items, self.values, self.class_names)
        if self.checkpoints is not None:
            # ACROSS: each model's own rows, under its name, whatever the table's layout (its
            # cells held a TOPK's "neuron value", a sample's "cka=0.47 [0.39, 0.56]" and an
            # undefined CKA's dash as text, and turned at 12 keys: sweep OO3).
            # A model without an answer (nothing matched, its weights did not load) keeps a
            # row of its own, its values empty, as a group the sample drew none of does.
            return [{"checkpoint": name, **record} for name, answer in self.checkpoints.items()
                    for record in (answer.records() or [{}])]
        if not self.is_query:
            return [dict(zip(self.columns, map(_plain, row))) for row in self.rows]
        if self.groups is not None:
            group_by = (self.provenance.group_by if self.provenance is not None else None) \
                or "group"
            # A group the sample drew none of keeps a row of its own, its values empty.
            return [{**key_columns(group_by, _plain(key), self.class_names), **rec}
                    for key, group in self.groups.items() for rec in (group.records() or [{}])]
        exact = self.baseline.value_of if self.baseline is not None else None
        # A sample's estimate per neuron, as its table shows it (an unreliable one is not).
        est = self.estimate if self.estimate is not None and self.estimate.reliable else None
        spread = {name: getattr(est, name) for name in ("ci_low", "ci_high", "p_in_topk")
                  if est is not None and getattr(est, name) is not None
                  and len(getattr(est, name)) == len(self.neurons)}
        rows = []
        for position, (neuron, label, value) in enumerate(
                zip(self.neurons.tolist(), self.labels, self.values.tolist())):
            row = {"neuron": neuron, "label": label, "value": value}
            if self.kind == "topk":
                row = {"rank": position + 1, **row}
            row.update((name, float(array[position])) for name, array in spread.items())
            if exact is not None:
                row["exact_value"] = exact(neuron)
            rows.append(row)
        return rows

    def to_pandas(self):
        """A DataFrame with one row per neuron (and group); needs pandas installed."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from exc
        from diagql.results.formats import frame_of

        return frame_of(pd, self.records())

    # --- display -------------------------------------------------------------------------

    def __rich__(self):
        from diagql.results.render import renderable

        return renderable(self)

    def __str__(self) -> str:
        from diagql.results.render import to_text

        return to_text(self)

    def __repr__(self) -> str:
        if self.kind == "similarity":
            what = f"{self.value:.4f}" if self.value is not None else f"{len(self.labels)} layers"
            return f"<Result similarity {', '.join(self.labels)}: {what}, {self.source}>"
        if self.ranked is not None:
            return (f"<Result {self.kind} of {self.ranked.neuron}: {len(self.items)} items of "
                    f"{self.n_items} matching, {self.source}>")
        if not self.is_query:
            return f"<Result {self.kind}: {len(self.rows)} rows>"
        if self.groups is not None:  # the values are the groups'
            each = {len(group.neurons) for group in self.groups.values()}
            count = f"{each.pop()} values each" if len(each) == 1 else "values"
            return (f"<Result {self.kind} {self.unit} in {self.layer}: {len(self.groups)} groups "
                    f"by {self.provenance.group_by}, {count}, over {self.n_items} items, "
                    f"{self.source}>")
        return (f"<Result {self.kind} {self.unit} in {self.layer}: {len(self.neurons)} values "
                f"over {self.n_items} items, {self.source}>")

    def _repr_html_(self) -> str:
        from diagql.results.render import to_html

        return to_html(self)

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        """IPython in a terminal shows the table, as print() does: it had shown the repr
        (sweep MM2), which a notebook's HTML hid."""
        printer.text(repr(self) if cycle else str(self))


def _similarity_records(result: Result) -> list[dict]:
    """One row per pair of layers, each once in the order given; a reliable interval (SY4)."""
    if result.groups is not None:
        group_by = result.provenance.group_by if result.provenance is not None else "group"
        # A group the sample drew none of keeps a row of its own, its values empty.
        return [{**key_columns(group_by, _plain(key), result.class_names), **rec}
                for key, group in result.groups.items() for rec in (group.records() or [{}])]
    if result.matrix is None:
        return []
    rows = []
    estimate = result.estimate
    exact = result.baseline.matrix if result.baseline is not None else None
    for i, j in zip(*np.triu_indices(len(result.labels), 1)):
        row = {"layer_x": result.labels[i], "layer_y": result.labels[j],
               result.unit or "value": _number_or_none(result.matrix[i, j])}
        if estimate is not None and estimate.reliable and estimate.ci_low is not None:
            row["ci_low"] = _number_or_none(estimate.ci_low[i, j])
            row["ci_high"] = _number_or_none(estimate.ci_high[i, j])
        if exact is not None:
            row["exact"] = _number_or_none(exact[i, j])
        rows.append(row)
    return rows


def _check_neuron(result: Result, neuron) -> None:
    """Refuse what ``value_of`` cannot read: no int, a GROUP BY's whole result (its values
    are its groups'), a neuron past the layer (index -1 had read a TOPK's last neuron, and
    said None for an AVG's)."""
    if isinstance(neuron, bool) or not isinstance(neuron, (int, np.integer)):
        raise DiagQLError(f"value_of takes a neuron's flat index (an int), not {neuron!r}")
    if result.groups is not None:
        raise DiagQLError("a GROUP BY result holds its values per group: "
                          "result.groups[key].value_of(neuron)")
    if result.items is not None:  # it had read the first item's activation (SW9)
        raise DiagQLError(f"a TOPK INPUTS result holds items' activations of "
                          f"{', '.join(result.labels)}: result.values[i] is item "
                          f"result.items[i]'s; AVG NEURONS IN {result.layer} gives its mean")
    # TOPK's dense aggregate, or an AVG's or ARGMAX's values: one per neuron of the layer.
    width = len(result.dense) if result.dense is not None else \
        len(result.values) if result.kind in ("avg", "argmax") else None
    if width and not 0 <= neuron < width:  # an empty answer (a group the sample missed): None
        raise DiagQLError(f"{result.layer} has neurons 0 to {width - 1}, not {neuron}")


def _jsonable(value):
    """An array or numpy scalar as a list or Python number; NaN (undefined: a CKA of a
    constant layer's interval) as None, which strict JSON takes."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return np.where(np.isfinite(value), value, None).tolist()
        return value.tolist()
    value = _plain(value)
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number_or_none(value) -> float | None:
    """A float for JSON, None for NaN (undefined) or a missing value."""
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return value
