"""EVALUATE SAMPLERS, bound: every sampler configuration, layer, k and seed checked against the
model, the data and the registry before any sample is drawn or any pass runs."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from diagql import samplers
from diagql.errors import BindError
from diagql.language import ast
from diagql.language.binder import _error, bind_layer, bind_sampler
from diagql.model.layers import LayerInfo

DEFAULT_SIZES = (0.05, 0.1, 0.2)
DEFAULT_K = 10
DEFAULT_SEEDS = 5
SWEEPABLE = "j"  # the boundary share of gmm and maxmargin (the paper's Figure 6)



@dataclass(frozen=True)
class Candidate:
    """One sampler configuration: a call at one size (and one j of a sweep), drawn per seed."""

    label: str  # the call as written, less its size: "gmm(covariance='spherical')"
    cls: type
    params: dict  # every parameter but random_state (size included, when the sampler has one)
    size: float | int | None  # as written; None for a sampler whose size is its own (ebtree)
    j: float | None  # the j it runs with; None when the sampler has no j
    span: object = None  # the call's place in the statement, for a draw's refusal

    def sampler(self, seed: int) -> samplers.Sampler:
        return self.cls(**self.params, random_state=seed)


@dataclass(frozen=True)
class BoundEvaluation:
    statement: ast.Evaluate
    candidates: list[Candidate]
    layers: list[LayerInfo]
    ks: list[int]
    seeds: list[int]  # the random_state of each repetition
    plot: str | None


def bind_evaluate(statement: ast.Evaluate, conn) -> BoundEvaluation:
    """Check every name and value of the statement before any sample or forward pass."""
    n_items = len(conn.source)
    layers = _bind_layers(statement.layers, conn)
    ks = _bind_ks(statement, layers)
    seeds = _whole(statement.seeds, "SEEDS", 1) if statement.seeds is not None else DEFAULT_SEEDS
    calls = statement.samplers or tuple(ast.SamplerCall(name) for name in samplers.REGISTRY)
    classes = [_sampler_class(call) for call in calls]
    sizes = _bind_sizes(statement.sizes, n_items)
    js = _bind_sweep(statement.sweep, classes)
    candidates: list[Candidate] = []
    seen: set[tuple] = set()
    for call, cls in zip(calls, classes):
        for candidate in _bind_call(call, cls, sizes, js, n_items, conn.settings.seed):
            key = (cls.name, tuple(sorted(candidate.params.items())))
            if key in seen:
                raise _error(f"{_describe(candidate)} is listed twice", call.span)
            seen.add(key)
            candidates.append(candidate)
    plot = None
    if statement.plot is not None:
        from diagql.results.plots import check_target

        check_target(statement.plot.value, statement.plot.span)
        plot = statement.plot.value
    first = conn.settings.seed
    return BoundEvaluation(statement, candidates, layers, ks,
                           list(range(first, first + seeds)), plot)


def default_layers(conn) -> list[str]:
    """The model's top-level blocks that hold parameters (conv1, conv2, fc1, fc2, fc3 in the demo)."""
    names = []
    for name, module in conn.model.named_children():
        # Only children a query can read: one whose output holds no tensor would refuse the
        # whole statement, though the user named no layer.
        if any(True for _ in module.parameters()) and name in conn.catalog and \
                conn.catalog[name].calls == 1 and conn.catalog[name].shape is not None:
            names.append(name)
    return names or conn.layers


def _bind_layers(refs: tuple[ast.LayerRef, ...], conn) -> list[LayerInfo]:
    if not refs:
        names = default_layers(conn)
        if not names:  # every module never runs, runs several times or returns no tensor
            raise _error("the model has no layer EVALUATE can read: no submodule runs once per "
                         "forward pass and returns a tensor (SHOW LAYERS)", None)
        return [bind_layer(ast.LayerRef(name), conn.catalog) for name in names]
    layers: list[LayerInfo] = []
    for ref in refs:
        if len(getattr(conn, "models", ())) > 1:  # a model's name may lead (``wide.fc2``)
            entry, ref = conn.resolve(ref)
            if entry is not conn.current:
                raise _error(f"EVALUATE SAMPLERS scores the default model's layers "
                             f"({conn.current.name}'s), not {entry.name}'s: SET model = "
                             f"{entry.name} first", ref.span)
        layer = bind_layer(ref, conn.catalog)
        if layer in layers:
            raise _error(f"layer {layer.name!r} is listed twice", ref.span)
        layers.append(layer)
    return layers


def _bind_ks(statement: ast.Evaluate, layers: list[LayerInfo]) -> list[int]:
    # A layer's top k of k neurons is all of them, which every sample gets right: a sweep's
    # 4-wide head scored S1 1.000 for every sampler at the default k, then 4. Below the
    # widest layer, at least one is scored on a real choice.
    if not statement.ks:
        return [max(1, min(DEFAULT_K, max(layer.neurons for layer in layers) - 1))]
    widest = max(layers, key=lambda layer: layer.neurons)
    ks: list[int] = []
    for literal in statement.ks:
        k = _whole(literal, "K", 1)
        if k >= widest.neurons > 1:
            than = "more neurons than" if k > widest.neurons else "as many neurons as"
            raise _error(f"K {k} is {than} any evaluated layer has (the widest, "
                         f"{widest.name!r}, has {widest.neurons:,}): a top {k} of them would be "
                         f"every neuron, which every sample gets right", literal.span)
        if k in ks:
            raise _error(f"K {k} is listed twice", literal.span)
        ks.append(k)
    return ks


def _whole(literal: ast.Literal, what: str, least: int) -> int:
    value = literal.value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _error(f"{what} takes whole numbers, not {value!r}", literal.span)
    if value < least:
        raise _error(f"{what} must be at least {least}, not {value}", literal.span)
    return int(value)


def _bind_sizes(literals: tuple[ast.Literal, ...], n_items: int) -> list[ast.Literal] | None:
    """The AT sizes (each checked as a sample size), or None when there is no AT clause."""
    if not literals:
        return None
    counts: dict[int, ast.Literal] = {}
    for literal in literals:
        try:
            count = samplers.resolve_size(literal.value, n_items)
        except BindError as exc:
            raise _error(exc.message, literal.span) from None
        if count in counts:
            raise _error(f"size {literal.value} repeats {counts[count].value} (both are "
                         f"{count:,} of the {n_items:,} items)", literal.span)
        counts[count] = literal
    return list(literals)


def _bind_sweep(sweep: ast.Sweep | None, classes: list) -> list[ast.Literal] | None:
    if sweep is None:
        return None
    if sweep.param != SWEEPABLE:
        raise _error(f"SWEEP can vary j (the boundary share of gmm and maxmargin), not "
                     f"{sweep.param!r}; the size is swept by AT, k by K and seeds by SEEDS",
                     sweep.span)
    if not any(_has_param(cls, SWEEPABLE) for cls in classes):
        with_j = [n for n, cls in samplers.REGISTRY.items() if _has_param(cls, SWEEPABLE)]
        raise _error(f"none of the samplers has a parameter j to sweep (those that do: "
                     f"{', '.join(with_j)})", sweep.span)
    seen: list = []
    for literal in sweep.values:
        if literal.value in seen:
            raise _error(f"j = {literal.value} is listed twice", literal.span)
        seen.append(literal.value)
    return list(sweep.values)


def _has_param(cls, param: str) -> bool:
    return param in {p.name for p in cls.params()}


def _sampler_class(call: ast.SamplerCall):
    try:
        return samplers.sampler_class(call.name)
    except BindError as exc:
        raise _error(exc.message, call.span, exc.hint) from None


def _bind_call(call: ast.SamplerCall, cls, sizes, js, n_items: int,
               seed: int) -> list[Candidate]:
    """The call's configurations (one per size and swept j), each checked by the binder."""
    names = {p.name for p in cls.params()}
    own_size = None
    rest = []
    first_positional = next((arg for arg in call.args if arg.name is None), None)
    for arg in call.args:
        if arg.name == "random_state":
            raise _error("random_state is chosen by SEEDS (seeds n, n+1, ... from SET seed = n); "
                         "leave it out here", arg.span)
        if "size" in names and (arg.name == "size" or arg is first_positional):
            if sizes is not None:
                raise _error(f"the sizes come from AT; leave the size out of {call.name}(...) "
                             f"(or drop AT to evaluate this call at its own size)", arg.span)
            own_size = ast.Literal(arg.value, span=arg.span)
            continue
        if arg.name == "model":
            raise _error("EVALUATE SAMPLERS draws every sample on the profile of the model it "
                         "evaluates (the default one: SET model = name); leave model= out",
                         arg.span)
        if arg.name == SWEEPABLE and js is not None:
            raise _error("j is varied by SWEEP j IN (...); leave it out here", arg.span)
        rest.append(arg)
    if "size" not in names:
        size_list = [None]
    elif own_size is not None:
        size_list = [own_size]
    else:
        size_list = sizes or [ast.Literal(s) for s in DEFAULT_SIZES]
    j_list = js if js is not None and SWEEPABLE in names else [None]
    found = []
    for size in size_list:
        for j in j_list:
            args = list(rest)
            if size is not None:
                args.insert(0, ast.Arg("size", size.value, span=size.span or call.span))
            if j is not None:
                args.append(ast.Arg(SWEEPABLE, j.value, span=j.span))
            sampler = bind_sampler(ast.SamplerCall(call.name, tuple(args), span=call.span),
                                   seed, n_items)
            params = {k: v for k, v in sampler.get_params().items() if k != "random_state"}
            found.append(Candidate(_label(cls, params, {arg.name for arg in rest}), cls, params,
                                   params.get("size"), params.get(SWEEPABLE), call.span))
    return found


def _label(cls, params: dict, written: set) -> str:
    """The sampler's name with the parameters the call names (size has its own column, and so
    has a swept j), in the sampler's order: ``gmm(covariance='full')`` stays as written."""
    shown = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items()
             if k in written]
    return f"{cls.name}({', '.join(shown)})" if shown else cls.name


def _describe(candidate: Candidate) -> str:
    parts = [candidate.label]
    if candidate.size is not None:
        parts.append(f"at size {candidate.size}")
    if candidate.j is not None:
        parts.append(f"with j = {candidate.j}")
    return " ".join(parts)


