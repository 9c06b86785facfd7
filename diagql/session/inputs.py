"""TOPK k INPUTS statements: binding, WHERE and the sample on the profile, the layer's inputs
index (from memory, else the disk cache, else built by the first exact query's pass) and the
Result with each item's label, prediction, confidence and look (docs/ARCHITECTURE.md,
"Top inputs")."""
from __future__ import annotations

import json
import time
import weakref
from collections import OrderedDict
from dataclasses import replace

import numpy as np

from diagql.engine import aggregates, executor, inputs_index, top_inputs
from diagql.engine.answers import where_place
from diagql.engine.inputs_index import InputsIndex
from diagql.engine.planner import predicate_mask
from diagql.engine.top_inputs import Answer
from diagql.errors import NoMatchError
from diagql.language import ast
from diagql.language.bind_inputs import BoundInputs, bind_inputs
from diagql.language.binder import require_labels
from diagql.model import hooks, views
from diagql.model.data import dataset_indices
from diagql.model.previews import previews
from diagql.results.result import Provenance, RankedItems, Result
from diagql.session.models import name_model, sampling_source, with_model
from diagql.storage.fingerprint import cache_key, source_digest

KEPT = 4  # indexes held in memory per connection, least recently used out first
_MEMORY: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()
# Per model, the seconds that exact queries on each view have spent in passes that built no
# index: a view's index is built once they reach its cost ("Top inputs" in ARCHITECTURE.md).
_SPENT: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def run_top_inputs(conn, query: ast.TopInputs) -> Result:
    """The answer on the model that the neuron's layer names (``wide.fc2[3]``): its catalog,
    profile, runner and inputs indexes (held per model)."""
    entry, query, sampling, drawn_on = _resolved(conn, query)
    result = _top_inputs(entry, query, getattr(conn, "tokenizer", None), sampling, drawn_on,
                         conn.class_names)
    result.class_names = conn.class_names
    return name_model(conn, result, query.neuron.layer.model)


def _resolved(conn, query: ast.TopInputs) -> tuple:
    """(the neuron's model, the query with its layer and sampler resolved, the model the
    sample is drawn on, its name in the sample's spec). The sample is drawn on the default
    model's profile, or the sampler's model='base''s, as a query's is (README, "Several
    models"); WHERE reads the neuron's model's predictions."""
    entry, layer = conn.resolve(query.neuron.layer)
    source, sampling, drawn_on = sampling_source(conn, query.source)
    return (entry, replace(query, neuron=replace(query.neuron, layer=layer), source=source),
            sampling, drawn_on)


def _bind(conn, query: ast.TopInputs) -> BoundInputs:
    with conn.naming():
        return bind_inputs(query, conn.catalog, n_classes=conn.n_classes,
                           seed=conn.settings.seed, n_items=len(conn.source),
                           has_labels=conn.source.labelled())


def _matching(query: ast.TopInputs, profile, bound: BoundInputs, sampling) -> tuple:
    """(the items a query ranks, as a mask over every item: WHERE on the profile, within the
    sample; the sample, or None; how many items of the data match). Nothing of the data
    matching: no sample is drawn for it."""
    if not profile.has_labels:
        require_labels(query)
    allowed = predicate_mask(query.where, profile)
    matching = int(allowed.sum())
    sample = None
    if matching and bound.sampler is not None:
        sample, _ = sampling.artifacts.get_sample(bound.sampler)
        inside = np.zeros(len(allowed), dtype=bool)
        inside[sample.indices] = True
        allowed = allowed & inside
    return allowed, sample, matching


def _unbuilt(conn, index: InputsIndex | None, sample, bound: BoundInputs) -> str | None:
    """None when the query's pass builds the view's inputs index: an exact query without one,
    on a view no wider than MAX_NEURONS, where building costs no more than CHEAP_BUILD_SECONDS,
    a pass over every item, or what exact queries on the view have spent in passes so far
    (a 50,257-token output's index cost 13 s beside a 0.3 s pass). Else why not ("" where
    no pass could build it)."""
    neurons, n = bound.view.neurons, len(conn.source)
    if index is not None or sample is not None:
        return ""
    if neurons > inputs_index.MAX_NEURONS:
        return f"its {neurons:,} neurons are too many for an inputs index"
    build = inputs_index.build_seconds(neurons, n)
    one_pass = n * conn.profile.seconds_per_item((bound.view.layer.name,))
    spent = _SPENT.get(conn, {}).get(_view_key(bound), 0.0)
    if build <= max(inputs_index.CHEAP_BUILD_SECONDS, one_pass + spent):
        return None
    return (f"the inputs index of {bound.layer.name} is not built yet: ≈ {build:.2g} s, "
            f"{build / max(one_pass, 1e-9):,.0f}× a pass over all {n:,} items; exact queries "
            f"on it build it once their passes have cost as much ({spent:.2g} s so far)")


def _top_inputs(conn, query: ast.TopInputs, tokenizer, sampling,
                drawn_on: str | None, class_names=None) -> Result:
    """``conn``: the neuron's model; ``sampling``: the model whose profile the sample is
    drawn on, named ``drawn_on`` in the sample's spec (None: the default model);
    ``class_names``: the connection's, which a message writes the WHERE's classes by."""
    started = time.perf_counter()
    bound = _bind(conn, query)
    bound_at = time.perf_counter()
    profile = conn.profile
    profiled_at = time.perf_counter()
    allowed, sample, matching = _matching(query, profile, bound, sampling)
    if not allowed.any():
        where = ast.predicate_text(query.where, class_names) \
            if query.where is not None else "the query"
        if sample is None:
            message = f"no items match WHERE {where} (0 of {len(allowed):,} items)"
        else:  # the data holds some: say so, and how to reach them
            message = (f"no sampled item matches WHERE {where}: none of its {matching:,} "
                       f"matching items is in the sample's {len(sample.indices):,}; USING "
                       f"FULL ranks them all, or a larger sample may hold some")
        raise NoMatchError(message, **where_place(query))
    index = _index(conn, bound)
    unbuilt = _unbuilt(conn, index, sample, bound)
    answer = top_inputs.top_inputs(conn.runner(), bound, allowed, index,
                                   build_index=unbuilt is None)
    if answer.index is not None:
        _keep(conn, bound, answer.index, answer.seconds)
    elif sample is None and not answer.used_index:
        spent = _SPENT.setdefault(conn, {})
        spent[_view_key(bound)] = spent.get(_view_key(bound), 0.0) + answer.seconds
    result = _result(conn, bound, answer, profile, allowed, sample, tokenizer, drawn_on)
    if unbuilt and index is None and bound.view.neurons <= inputs_index.MAX_NEURONS:
        result.notes.append(_unbuilt(conn, None, None, bound) or
                            f"the next exact query on {bound.layer.name} builds its inputs "
                            f"index: the queries on it have spent as much as it costs")
    result.timings.update(bind=bound_at - started, profile=profiled_at - bound_at,
                          query=answer.seconds)
    return result


def explain_top_inputs(conn, statement: ast.Explain) -> Result:
    """EXPLAIN TOPK k INPUTS ...: the items it ranks and how it would find them (from the
    layer's inputs index, by a pass that builds it, or by a pass over the matching items),
    with the pass's estimated cost; nothing goes through the model."""
    entry, query, sampling, drawn_on = _resolved(conn, statement.query)
    layer = query.neuron.layer
    bound = _bind(entry, query)
    profile = entry.profile
    rows = [("rank", f"the {query.k:,} items of {'highest' if query.largest else 'lowest'} "
                     f"{bound.label}" + (" (its mean over the channel)" if query.unit ==
                                         "channels" else "") + ", ties to the lower index")]
    where = "no predicate" if query.where is None else \
        f"WHERE {ast.predicate_text(query.where, conn.class_names)}"
    rows.append(("filter", f"{where} on the profile → "
                           f"{int(predicate_mask(query.where, profile).sum()):,} of "
                           f"{len(profile):,} items"))
    allowed, sample, _ = _matching(query, profile, bound, sampling)
    if sample is not None:
        rows.append(("sample", f"{with_model(sample.spec, drawn_on)}: "
                               f"{len(sample.indices):,} items, {int(allowed.sum()):,} of "
                               f"them matching (the sample's top items, not the data's)"))
    index = _index(entry, bound)
    k = min(query.k, int(allowed.sum()))
    found = index.lookup(bound.neuron, k, allowed, query.largest) \
        if index is not None and k > 0 else None
    if found is not None:
        read = len(found.read)
        how = (f"from the inputs index of {layer.name}, held: " +
               ("no item read" if read == 0 else
                f"{read:,} items it cannot order read through the model"))
    elif (unbuilt := _unbuilt(entry, index, sample, bound)) is None:
        read = len(allowed)
        how = (f"one pass over all {read:,} items, hooking {layer.name}, which builds its "
               f"inputs index for later queries")
    else:
        read = int(allowed.sum())
        how = f"{read:,} items through the model, hooking {layer.name}" + (
            f" ({unbuilt})" if unbuilt else "")
    rows.append(("read", how))
    per_item = profile.seconds_per_item((layer.name,))
    rows.append(("cost", f"≈ {read * per_item:.3g} s (from the profile pass)"
                 if read else "no forward pass"))
    return Result(kind="explain", statement=statement.text, title=f"plan: {query.text}",
                  columns=["step", "detail"], rows=rows)


def _result(conn, bound: BoundInputs, answer: Answer, profile, allowed, sample,
            tokenizer, drawn_on: str | None = None) -> Result:
    query, items = bound.query, answer.items
    # With several models the neuron is named with its model (wide.fc2[3]), as name_model
    # names the Result's labels.
    prefix = f"{conn.name}." if len(conn.conn.models) > 1 else ""
    provenance = Provenance(len(profile),
                            None if sample is None else with_model(sample.spec, drawn_on),
                            None if sample is None else len(sample.indices))
    # Its reduction named beside it (TOKEN 0): the caption and the plot's title had read as
    # the mean over tokens' (sweep MM2).
    reduced = "" if query.tokens is None else f" {query.tokens.text()}"
    ranked = RankedItems(
        prefix + bound.label + reduced, query.largest,
        profile.labels[items] if profile.has_labels else None,
        profile.predictions[items], profile.confidence[items],
        previews(conn.source, items, tokenizer), _how(prefix + bound.layer.name, answer))
    result = Result(kind="inputs", statement=query.text, layer=bound.layer.name,
                    unit=query.unit, neurons=np.array([bound.neuron]), labels=[bound.label],
                    values=answer.values, n_items=int(allowed.sum()), provenance=provenance,
                    items=dataset_indices(conn.source, items), ranked=ranked)
    if len(items) < query.k:
        result.notes.append(f"only {len(items):,} items match, fewer than the {query.k:,} asked")
    values = np.asarray(answer.values, dtype=np.float64)
    if len(values) > 1 and values[0] == values[-1]:  # ranked: the first and last tie, all do
        other = "BOTTOMK" if query.largest else "TOPK"
        result.notes.append(f"all {len(values):,} tie at {values[0]:.4g} (ties go to the lower "
                            f"item index): at least {len(values):,} of the "
                            f"{int(allowed.sum()):,} matching items share it, where the "
                            f"{query.unit[:-1]} saturates (a clipped or constant input) or is "
                            f"constant; {other} shows the other end, AVG its mean")
    if isinstance(query.source, ast.Auto):
        result.notes.append("USING AUTO chose the exact answer: a sample's top items are not "
                            "the data's, and the inputs index answers later queries on this "
                            "layer without reading most items")
    if sample is not None:
        result.notes.append(_sample_note(query, len(items), int(allowed.sum()),
                                         int(predicate_mask(query.where, profile).sum()),
                                         getattr(bound.sampler, "uniform", False)))
    return result


def _how(layer: str, answer: Answer) -> str:
    if answer.used_index:
        if answer.read == 0:
            return f"from the inputs index of {layer}, no item read"
        return (f"from the inputs index of {layer}, {answer.read:,} item"
                f"{'s' if answer.read != 1 else ''} read through the model")
    if answer.index is not None:
        return (f"one pass over all {answer.read:,} items, which built the inputs index of "
                f"{layer} for later queries")
    return f"{answer.read:,} items read through the model"


def _sample_note(query: ast.TopInputs, shown: int, n: int, population: int,
                 uniform: bool) -> str:
    """What the top k of a sample says about the data: not the data's top k (its values are
    too low), but for a uniform sample the k-th value estimates the activation that about
    k·M/n of the M matching items reach."""
    end = "highest" if query.largest else "lowest"
    text = (f"the {end} {shown} of the sample's {n:,} matching items, not of all {population:,}: "
            f"the data's own top items may be missing")
    if uniform and n:
        text += (f"; the {_ordinal(shown)} value estimates the activation that the {end} "
                 f"~{shown * population / n:,.0f} matching items of the data reach")
    else:
        text += "; the sampler does not draw uniformly, so the values estimate no quantile"
    return text + " (USING FULL or no USING clause is exact)"


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st ..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n:,}{suffix}"


# --- the index: memory, disk, built ---------------------------------------------------------


def _view_key(bound: BoundInputs) -> str:
    return json.dumps([bound.view.key, bound.view.channels])


def index_key(conn, bound: BoundInputs) -> str | None:
    """The disk cache key of a view's inputs index: the model, data and settings (through the
    profile's key), the view, and the code that computes the rows and the index."""
    profile_key = conn.artifacts.profile_key()
    if profile_key is None:
        return None
    return cache_key("index", profile_key, _view_key(bound),
                     [source_digest(module) for module in (inputs_index, aggregates, executor,
                                                           hooks, views)],
                     *conn.artifacts.batch_size_key())


def _index(conn, bound: BoundInputs) -> InputsIndex | None:
    held = _MEMORY.setdefault(conn, OrderedDict())
    key = _view_key(bound)
    if key in held:
        held.move_to_end(key)
        return held[key]
    disk_key = index_key(conn, bound)
    if disk_key is None:
        return None
    n_neurons, n_items = bound.view.neurons, len(conn.source)
    index = conn.cache.load("index", disk_key,
                            lambda arrays: InputsIndex.from_arrays(arrays, n_neurons, n_items))
    if index is not None:
        _hold(held, key, index)
    return index


def _keep(conn, bound: BoundInputs, index: InputsIndex, seconds: float) -> None:
    _hold(_MEMORY.setdefault(conn, OrderedDict()), _view_key(bound), index)
    disk_key = index_key(conn, bound)
    if disk_key is not None:
        conn.cache.store("index", disk_key, index.to_arrays(), seconds=seconds,
                         meta={"layer": bound.layer.name, "view": bound.view.text(),
                               "channels": bound.view.channels, "k": index.k,
                               "codes": index.codes is not None})


def forget_indices(entry) -> None:
    """The model's indexes held in memory are stale (its weights or the data changed)."""
    _MEMORY.pop(entry, None)
    _SPENT.pop(entry, None)


def _hold(held: OrderedDict, key: str, index: InputsIndex) -> None:
    held[key] = index
    held.move_to_end(key)
    while len(held) > KEPT:
        held.popitem(last=False)

