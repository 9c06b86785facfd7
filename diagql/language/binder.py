"""AST to bound query: names resolved against the model, the label set and the sampler registry."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Sequence


from diagql import samplers
from diagql.errors import BindError, warn
from diagql.language import ast, layer_names
from diagql.model.hooks import call_name
from diagql.model.layers import NO_MASK, UNFIT_MASK, LayerCatalog, LayerInfo
from diagql.model.views import SEQUENCE, View
from diagql.suggest import did_you_mean, name_list


@dataclass(frozen=True)
class BoundQuery:
    """A query whose names all exist: the layer, its neuron count and the sampler instance."""

    query: ast.Query
    layer: LayerInfo
    n_neurons: int  # neurons, or channels for CHANNELS
    sampler: samplers.Sampler | None
    view: View  # how the hook turns the layer's output into one row per item
    # The model's queryable layers before this one, in registration order: where the
    # estimator finds the nearest block to a layer in none (engine/covariates.py).
    before: tuple[str, ...] = ()
    # Whether the profile pass's rows are any pass's (LayerCatalog.repeatable): only then are
    # rows rebuilt from a block's projections exact (engine/covariates.py, "spanned").
    repeatable: bool = True
    # The modules its input was made from, nearest first (LayerCatalog.upstream).
    upstream: tuple[str, ...] = ()


def _error(message: str, span: ast.Span | None, hint: str | None = None) -> BindError:
    return BindError(message, hint=hint).at(span)


def qualify_layer(ref: ast.LayerRef, models: Sequence[str], default: str,
                  catalog_of: Callable[[str], LayerCatalog]) -> ast.LayerRef:
    """The reference with its model set: a leading component that names one of several models
    (``wide.layer3.1.conv2``) is that model's, anything else the default model's. A quoted
    name is never split. When the default model also has a module of the whole name, the
    reference is refused as ambiguous, saying how to write each reading."""
    if ref.model is not None:
        return ref
    head, dot, rest = ref.name.partition(".")
    if not (ref.quoted or dot) and ref.name in models and len(models) > 1 \
            and not _has(ref, catalog_of(default)):  # 'AVG NEURONS IN wide': a model alone
        names = catalog_of(ref.name).running_names()
        raise _error(f"{ref.name!r} is a model, not a layer: name one of its layers, "
                     f"{ref.name}.{_written(names[-1])} for instance", ref.span,
                     hint=f"{ref.name}'s layers are {name_list(names)}")
    if ref.quoted or not dot or head not in models or len(models) < 2:
        if len(models) > 1 and not _has(ref, catalog_of(default)):
            _elsewhere(ref, models, default, catalog_of)
        return replace(ref, model=default)
    mine = _has(ref, catalog_of(default))
    if mine and _has(replace(ref, name=rest), catalog_of(head)):
        raise _error(f"layer {ref.text()!r} is ambiguous: model {head!r} has a layer "
                     f"{_written(rest)!r} and the default model {default!r} has a module "
                     f"{ref.name!r}", ref.span,
                     hint=f"write {default}.{ref.text()} or '{ref.name}' for {default}'s module; "
                          f"for {head}'s layer, SET model = {head} and name it {rest}")
    if mine:
        return replace(ref, model=default)
    return replace(ref, name=rest, model=head)


def _elsewhere(ref: ast.LayerRef, models: Sequence[str], default: str,
               catalog_of: Callable[[str], LayerCatalog]) -> None:
    """With several models, a layer the default model lacks: refused naming the models that
    have it, or saying that a dotted name's head is no model (else the default model's unknown
    layer error, with its suggestions, follows)."""
    others = [name for name in models if name != default and _has(ref, catalog_of(name))]
    if others:
        raise _error(f"the default model {default!r} has no layer {ref.text()!r}; "
                     + " and ".join(f"model {name!r} has one: {name}.{_written(ref.text())}"
                                    for name in others), ref.span,
                     hint=f"or SET model = {others[0]}")
    head, dot, _ = ref.name.partition(".")
    layers = catalog_of(default).running_names()
    if dot and not ref.quoted and not any(head == layer.split(".")[0] for layer in layers) \
            and not did_you_mean(ref.name, layers):  # a misspelt layer is suggested below
        raise _error(f"unknown layer {ref.text()!r}: {head!r} is neither a model nor a module "
                     f"of the default model {default!r}{did_you_mean(head, models)}", ref.span,
                     hint=f"models are {', '.join(models)} (SHOW MODELS)")


def _has(ref: ast.LayerRef, catalog: LayerCatalog) -> bool:
    return ref.name in catalog or ref.name in catalog.aliases or \
        (ref.call is not None and ref.text() in catalog)


def lookup_layer(ref: ast.LayerRef, catalog: LayerCatalog) -> LayerInfo:
    """The catalog entry a reference names, whether or not it can be queried: a module (by
    its name, or a call's name such as ``block.relu#2`` given as text), or ``ref.call``'s
    call of a module. Unknown names and call numbers the module does not have are errors.
    A module's second name (``catalog.aliases``) names it as its first does."""
    if ref.name not in catalog and ref.name in catalog.aliases:
        ref = _first_name(ref, catalog)
    if ref.call is None:
        layer = catalog.by_name.get(ref.name)
        if layer is None:
            raise _unknown(ref.name, ref.span, catalog)
        return layer
    module = catalog.module(ref.name)
    if module is None:
        # An unquoted 'x#2' is a module's own name when one is really named so.
        layer = catalog.module(ref.text()) if not ref.quoted else None
        if layer is None:
            raise _unknown(ref.name, ref.span, catalog, modules=True)
        return layer
    if module.calls == 1:
        # "In DiagQL's probe": a loop whose length follows the batch may run it more often
        # in a pass's batches, which the profile pass refuses it for (sweep SS1).
        raise _error(f"layer {ref.name!r} runs once per forward pass (in DiagQL's probe), so "
                     f"it takes no call number; name it {_written(ref.name)}", ref.span)
    if module.calls == 0:
        return module
    if not 1 <= ref.call <= module.calls:
        what = "calls are numbered from 1" if ref.call < 1 else f"it has no call {ref.call}"
        raise _error(f"layer {ref.name!r} runs {module.calls} times per forward pass and "
                     f"{what}; name one call: {calls_text(ref.name, module.calls)}", ref.span)
    # A module whose number of calls changes with the batch has no entries per call.
    return catalog.call(ref.name, ref.call) or module


def _first_name(ref: ast.LayerRef, catalog: LayerCatalog) -> ast.LayerRef:
    """A reference by a module's second name, as its first name writes it: the same module,
    whose calls are numbered over the forward pass whichever name reached it."""
    return replace(ref, name=catalog.aliases[ref.name])


def bind_layer(ref: ast.LayerRef, catalog: LayerCatalog) -> LayerInfo:
    """The layer a query reads: it runs, it is one activation per item (a call of a module
    that runs several times), and DiagQL can read it per item."""
    layer = lookup_layer(ref, catalog)
    name = layer.name
    if layer.shared and ref.name in catalog.aliases and ref.name not in catalog:
        raise _error(f"layer {ref.name!r} is the module {name!r} under another name, and it "
                     f"runs {layer.calls} times per forward pass (under either name); name one "
                     f"call: {calls_text(name, layer.calls)}", ref.span)
    parent = catalog.module(name.rpartition(".")[0]) if "." in name else None
    if layer.calls == 0 and not layer.refused and parent is not None and parent.calls and \
            parent.type_name == "MultiheadAttention":
        # It reads out_proj's weights itself (the sweep SS7 had been told of branches and
        # experts).
        raise _error(f"layer {name!r} does not run in the model's forward pass: "
                     f"nn.MultiheadAttention {parent.name!r} uses its weights without calling "
                     f"it; query {parent.name!r}, its output", ref.span)
    members = layer_names.members(name, catalog) if layer.calls == 0 and not layer.refused \
        else []
    if layer.calls == 0 and (members or layer.type_name in layer_names.CONTAINERS):
        what = f"is an nn.{layer.type_name}, a container with no forward of its own: it " \
            f"never runs" if layer.type_name in layer_names.CONTAINERS else \
            "does not run in the model's forward pass: the model calls its members, not it"
        raise _error(f"layer {name!r} {what}" + (f"; query one of its members: "
                                                 f"{name_list(members)}" if members else ""),
                     ref.span)
    if layer.calls == 0:
        raise _error(f"layer {name!r} cannot be queried: {layer.refused}" if layer.refused else
                     f"layer {name!r} does not run in the model's forward pass (not for "
                     f"DiagQL's probes, batches of its first 1, 2 and 3 items: a module that "
                     f"runs only for some items or batches, one branch of an if on the data or "
                     f"an expert a router picks, has no activation for every item)", ref.span)
    if layer.shared and catalog.calls_of(name):
        raise _error(f"layer {name!r} runs {layer.calls} times per forward pass; name one "
                     f"call: {calls_text(name, layer.calls)}", ref.span)
    if layer.shape is None:
        raise _error(f"layer {name!r} cannot be queried: "
                     f"{layer.refused or 'it returns no tensor'}", ref.span)
    return layer


def _unknown(name: str, span, catalog: LayerCatalog, modules: bool = False) -> BindError:
    """Did-you-mean among what could stand there: modules before a call number, else layers."""
    names = [layer.name for layer in catalog.layers if (layer.shape is not None or layer.shared)
             and not (modules and layer.call)]
    suggestion = layer_names.suggestion(name, names)
    return _error(f"unknown layer {name!r}{suggestion}", span,
                  hint=f"layers are {name_list(catalog.running_names())}")


def _written(name: str) -> str:
    """A module's name as a query writes it: bare when the grammar's LAYER_NAME takes it."""
    return name if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.]*", name) else repr(name)


def calls_text(module: str, calls: int) -> str:
    """A module's calls, for messages: ``block.relu#1 or block.relu#2``, or for many calls
    ``m#1, m#2, … or m#12``."""
    names = [call_name(_written(module), n) for n in range(1, calls + 1)]
    if calls > 4:
        names = [*names[:2], "…", names[-1]]
    return ", ".join(names[:-1]) + " or " + names[-1]


def bind_query(query: ast.Query, catalog: LayerCatalog, *, n_classes: int,
               seed: int | None, n_items: int, has_labels: bool = True) -> BoundQuery:
    layer = bind_layer(query.layer, catalog)
    view = bind_view(query, layer)
    n_neurons = view.neurons
    if query.aggregate == "topk" and not 1 <= query.k <= n_neurons:
        raise _error(f"TOPK {query.k} asks for more {query.unit} than layer {layer.name!r} has "
                     f"({n_neurons})" if query.k > n_neurons else "TOPK needs k of at least 1",
                     query.k_span or query.span)
    sampler = bind_items(query, n_classes=n_classes, seed=seed, n_items=n_items,
                         has_labels=has_labels)
    if query.until is not None:
        bind_until(query, sampler)
    return BoundQuery(query, layer, n_neurons, sampler, view, layers_before(catalog, layer.name),
                      catalog.repeatable, catalog.upstream(layer.name))


def bind_items(statement, *, n_classes: int, seed: int | None, n_items: int,
               has_labels: bool) -> samplers.Sampler | None:
    """Which items a query, SIMILARITY or TOPK INPUTS statement reads: labels required where
    it needs them (first: labels missing is the first thing wrong, before class values), its
    WHERE checked against the classes, and its sampler bound (None: every matching item)."""
    if not has_labels:
        require_labels(statement)
    if statement.where is not None:
        _check_predicate(statement.where, n_classes)
    if isinstance(statement.source, ast.SamplerCall):
        return bind_sampler(statement.source, seed, n_items)
    return None


def layers_before(catalog: LayerCatalog, name: str) -> tuple[str, ...]:
    """The catalog's queryable layers registered before ``name`` (none when it is unlisted)."""
    names = catalog.running_names()
    return tuple(names[:names.index(name)]) if name in names else ()


# UNTIL's targets: the aggregate whose estimate reports each, and the direction it improves in.
TARGETS = {"precision": ("topk", "higher", (0.0, 1.0)), "cosine": ("avg", "lower", (0.0, 2.0)),
           "width": ("avg", "lower", (0.0, None)), "js": ("argmax", "lower", (0.0, 1.0))}
_TARGET_OF = {"topk": "precision >= 0.9", "avg": "cosine <= 0.01 or width <= 0.05",
              "argmax": "js <= 0.05"}


def bind_until(query: ast.Query, sampler: samplers.Sampler | None) -> None:
    """An error-bounded query's target must be one its aggregate's estimate reports, in the
    direction it improves, and its sampler must be able to grow."""
    target = query.until.target
    if sampler is not None and not hasattr(sampler, "size"):
        raise _error(f"sampler {sampler.name!r} draws a set of its own size, so it cannot grow "
                     f"until a target; use another sampler", query.source.span)
    if target is None:
        return
    known = TARGETS.get(target.metric)
    if known is None:
        raise _error(f"unknown target {target.metric!r}{did_you_mean(target.metric, TARGETS)}; "
                     f"{query.aggregate.upper()} takes {_TARGET_OF[query.aggregate]}", target.span)
    aggregate, better, (low, high) = known
    if aggregate != query.aggregate:
        raise _error(f"{target.metric} is not estimated for {query.aggregate.upper()}; it takes "
                     f"{_TARGET_OF[query.aggregate]}", target.span)
    if query.aggregate == "topk" and query.order == "max":
        raise _error("a sample's maximum has no estimate to grow towards; UNTIL precision needs "
                     "TOPK ... BY MEAN (WITHIN n SECONDS alone works)", target.span)
    wanted = (">=", ">") if better == "higher" else ("<=", "<")
    if target.op not in wanted:
        raise _error(f"{target.metric} is better {better}, so its target is "
                     f"{'a lower' if better == 'higher' else 'an upper'} bound: write "
                     f"{target.metric} {wanted[0]} {_num_text(target.value)}", target.span)
    if not (_finite(target.value) and target.value > low and (high is None or target.value
                                                                <= high)):
        where = f"in ({low:g}, {high:g}]" if high is not None else "above 0"
        raise _error(f"{target.metric} target {target.value} is not {where}", target.span)


def _num_text(value) -> str:
    return f"{value:g}" if _finite(value) else str(value)


@dataclass(frozen=True)
class BoundSimilarity:
    """A SIMILARITY statement whose layers all exist: each layer's view (one row per item: the
    output flattened, or a sequence's reduced tokens) in the order given, and the sampler."""

    query: ast.Similarity
    layers: tuple[LayerInfo, ...]
    views: tuple[View, ...]
    sampler: samplers.Sampler | None


def bind_similarity(statement: ast.Similarity, catalog: LayerCatalog, *, n_classes: int,
                    seed: int | None, n_items: int,
                    catalogs: Sequence[LayerCatalog] | None = None,
                    has_labels: bool = True) -> BoundSimilarity:
    """``catalogs``: each layer's model's catalog when the layers name several models."""
    if isinstance(statement.source, ast.Auto):
        raise _error("SIMILARITY takes USING FULL or USING SAMPLE s(...), not USING AUTO",
                     statement.source.span)
    if statement.measure not in ast.MEASURES:
        raise _error(f"unknown similarity measure {statement.measure!r}"
                     f"{did_you_mean(statement.measure, ast.MEASURES)}; measures are "
                     f"{', '.join(ast.MEASURES)}", statement.measure_span or statement.span)
    layers, views = [], []
    for ref, tokens, own in zip(statement.layers, statement.tokens,
                                catalogs or [catalog] * len(statement.layers)):
        layer = bind_layer(ref, own)
        layers.append(layer)
        # An item's representation is the row its view makes, as an AVG NEURONS query's.
        views.append(bind_view(ast.Query("avg", "neurons", ref, tokens=tokens), layer,
                               channels=False))
    sampler = bind_items(statement, n_classes=n_classes, seed=seed, n_items=n_items,
                         has_labels=has_labels)
    return BoundSimilarity(statement, tuple(layers), tuple(views), sampler)


def bind_view(query: ast.Query, layer: LayerInfo, channels: bool = True) -> View:
    """How the query sees the layer: a sequence's tokens reduced as its TOKENS clause says
    (the mean over real tokens by default), a flat layer's neurons or channels; ``channels``:
    whether the statement takes CHANNELS (SIMILARITY does not), for a refusal's hint."""
    tokens, name = query.tokens, layer.name
    if layer.layout == SEQUENCE:
        if query.unit == "channels":
            raise _error(f"layer {name!r} is a sequence ({layer.shape_text()}), whose neurons "
                         f"are its {layer.shape[1]} hidden units; CHANNELS applies to conv maps, "
                         f"so use NEURONS (with TOKENS MEAN, TOKENS MAX, TOKEN n or TOKENS ALL)",
                         query.layer.span)
        if layer.batch_padded and layer.mask == NO_MASK:
            warn(f"layer {name!r}: its sequence length changes with the batch "
                 f"(padded to each batch's longest item) and no padding mask reaches "
                 f"it, so its padding counts as tokens, and an item's answer depends "
                 f"on which items share its batch; give the model the padding mask (an "
                 f"attention_mask input, a key_padding_mask), pack the sequences, or "
                 f"pad every item to one length")
        elif layer.form == "tensor" and layer.mask.startswith(UNFIT_MASK):
            # An audio encoder's frames beside a mask of its samples: padding, where the data
            # has any, counts (0.36-0.78 off on a Wav2Vec2 of padded clips), unsaid.
            warn(f"layer {name!r}: {layer.mask.removeprefix('every position: ')}; "
                 f"where items are padded, its padding counts as tokens (TOKENS MEAN, "
                 f"TOKENS MAX, TOKEN -1); query a layer of the mask's length, or pad no item")
        if tokens is None:
            return View(layer)
        length = layer.shape[0]
        if tokens.mode == "all" and (layer.varies or layer.form != "tensor"):
            why = "padded to each batch's longest item" if layer.form == "tensor" else \
                f"its sequences come {'packed' if layer.form == 'packed' else 'nested'}"
            # torch's TransformerEncoder nests its layers' outputs (each item its own length)
            # in eval mode with a padding mask, however the items were padded.
            nested = "" if layer.form != "nested" else \
                " (or build the TransformerEncoder with enable_nested_tensor=False)"
            raise _error(f"TOKENS ALL needs one sequence length, but the length of layer "
                         f"{name!r} changes with the batch ({why}); use TOKENS MEAN, TOKENS MAX "
                         f"or TOKEN n{nested}", tokens.span)
        if tokens.mode == "token" and not layer.varies and not -length <= tokens.position < length:
            raise _error(f"{tokens.text()} is past the {length} positions of layer {name!r}",
                         tokens.span)
        return View(layer, tokens.mode, tokens.position)
    if tokens is not None:
        raise _error(f"{tokens.text()} applies to sequence layers (batch, sequence, hidden), but "
                     f"layer {name!r} is not one: each item's output is {layer.shape_text()}",
                     tokens.span)
    if query.unit == "channels":
        if layer.channels is None:
            raise _error(f"layer {name!r} has output shape {layer.shape_text()}: CHANNELS "
                         f"needs a layer with channels (a conv map); use NEURONS (TOPK k "
                         f"INPUTS: leave out CHANNEL)", query.layer.span)
        if layer.varies:  # a Conv1d over text padded per batch: its padded positions count
            warn(f"layer {name!r}: its length changes with the batch (padded to "
                 f"each batch's longest item), so each channel's mean counts the padded "
                 f"positions, and an item's answer depends on which items share its "
                 f"batch; pad every item to one length")
    elif layer.varies:
        raise _error(f"the output shape of layer {name!r} changes with the batch, so its "
                     f"neurons are not fixed" + ("; CHANNELS averages each channel"
                                                 if layer.channels and channels else ""),
                     query.layer.span)
    return View(layer, channels=query.unit == "channels")


def bind_sampler(call: ast.SamplerCall, seed: int | None, n_items: int) -> samplers.Sampler:
    positional = [a for a in call.args if a.name is None]
    keywords = {}
    for arg in call.args:
        if arg.name is not None:
            if arg.name in keywords:
                raise _error(f"parameter {arg.name!r} is given twice", arg.span)
            keywords[arg.name] = arg.value
    if len(positional) > 1:
        try:  # name this sampler's own parameters (random has no j to suggest)
            names = [p.name for p in samplers.sampler_class(call.name).params()]
        except BindError as exc:
            raise _error(exc.message, call.span, exc.hint) from None
        others = ", ".join(f"{name}=..." for name in names if name != "size")
        if "size" in names:
            raise _error(f"sampler {call.name!r} takes one positional argument (the size); name "
                         f"the others: {others}", positional[1].span)
        raise _error(f"sampler {call.name!r} takes no positional argument; name them: {others}",
                     positional[0].span)
    if positional:
        if "size" in keywords:
            raise _error("size is given twice", positional[0].span)
        keywords["size"] = positional[0].value
    try:
        sampler = samplers.build(call.name, keywords, seed=seed)
        sampler.validate(n_items)
    except BindError as exc:
        if exc.line is not None:
            raise
        # Underline the argument at fault (a positional size is keyed as "size").
        spans = {arg.name or "size": arg.span for arg in call.args}
        raise _error(exc.message, spans.get(exc.param) or call.span, exc.hint) from None
    return sampler


def _check_predicate(pred: ast.Predicate, n_classes: int) -> None:
    for node in ast.walk(pred):
        if isinstance(node, ast.Compare) and node.field in ("class", "predicted") \
                and node.op in ("=", "!="):
            _check_class(node.field, node.value, n_classes, node.span)
        elif isinstance(node, ast.Compare) and not _finite(node.value):
            raise _error(f"{node.field} is compared with a number beyond the range of floats",
                         node.span)
        elif isinstance(node, ast.Member):
            if node.field == "confidence":
                raise _error("IN compares exact values, which suits class and predicted, not "
                             "confidence; use < or >", node.span)
            for value in node.values:
                _check_class(node.field, value, n_classes, node.span)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _check_class(field: str, value, n_classes: int, span) -> None:
    if _finite(value) and value != int(value):  # 3.5 lies inside 0..9: say what is wrong
        raise _error(f"{field} takes a whole number (a class 0..{n_classes - 1}), not {value}",
                     span)
    if not _finite(value) or not 0 <= value < n_classes:
        raise _error(f"{field} {value} is outside the label set 0..{n_classes - 1} "
                     f"(the model has {n_classes} classes)", span)


NO_LABELS = ("the data has none (its items are bare x, or y is None, or no key of its mappings "
             "holds labels: name it with label_key=... / --label-key; or every label is -1, as "
             "a test split's)")


def sampler_needs_labels(name: str) -> str:
    return (f"sampler {name!r} draws by the true labels, but {NO_LABELS}; use one that does "
            f"not, such as random")


def require_labels(query: ast.Query | ast.TopInputs) -> None:
    """For data without labels: refuse a query that reads the true labels (the others, over
    predictions and confidence, are answered)."""
    def reads_labels(node) -> bool:
        return isinstance(node, ast.Flag) or getattr(node, "field", None) == "class"

    use = None if query.where is None else next(filter(reads_labels, ast.walk(query.where)), None)
    if use is not None:
        raise _error(f"WHERE {ast.predicate_text(use)} needs the true labels, but {NO_LABELS}; "
                     f"filter on predicted or confidence instead", use.span)
    group_by = getattr(query, "group_by", None)  # TOPK k INPUTS has no GROUP BY
    if group_by in ("class", "correct"):
        raise _error(f"GROUP BY {group_by} needs the true labels, but {NO_LABELS}; "
                     f"GROUP BY predicted works", getattr(query, "group_by_span", None))
    if isinstance(query.source, ast.SamplerCall) and \
            samplers.sampler_class(query.source.name).needs_labels:
        raise _error(sampler_needs_labels(query.source.name), query.source.span)
