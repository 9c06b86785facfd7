"""The typed syntax tree of DiagQL: frozen dataclasses built by the parser, read by the binder."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Iterator, Sequence, Union


@dataclass(frozen=True)
class Span:
    """Where a node sits in the original text (1-based line/column, end column exclusive)."""

    line: int
    column: int
    end_line: int
    end_column: int
    start_pos: int
    end_pos: int


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False)


# --- predicates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    """``class = 3``, ``confidence < 0.6``: a profile field compared with a number."""

    field: str  # "class" | "predicted" | "confidence"
    op: str  # "=", "!=", "<", "<=", ">", ">="
    value: float | str  # a class's name until the session resolves it (class = 'cat')
    span: Span | None = _span()


@dataclass(frozen=True)
class Member:
    """``class IN (3, 5)`` and ``class NOT IN (3, 5)``."""

    field: str
    values: tuple[float | str, ...]  # names resolved by the session, as Compare's
    negated: bool = False
    span: Span | None = _span()


@dataclass(frozen=True)
class Flag:
    """``correct`` or ``incorrect``: the model's prediction against the true label."""

    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class And:
    left: "Predicate"
    right: "Predicate"
    span: Span | None = _span()


@dataclass(frozen=True)
class Or:
    left: "Predicate"
    right: "Predicate"
    span: Span | None = _span()


@dataclass(frozen=True)
class Not:
    operand: "Predicate"
    span: Span | None = _span()


Predicate = Union[Compare, Member, Flag, And, Or, Not]


def predicate_text(pred: Predicate, names: Sequence[str] | None = None) -> str:
    """The predicate as canonical DiagQL text (for plans and messages), with parentheses only
    where the tree needs them: parsing the text gives the same tree back. ``names``: the
    classes' names, which a class or prediction is written by (``class = 'cat'``) where the
    statement's names were resolved to indices."""
    if names is not None and any(str(name).strip().lstrip("-").isdigit() for name in names):
        names = None  # classes named "1", "0": class = '1' would read as class 1
    if isinstance(pred, And):  # AND and OR group to the left: a right operand like them is wrapped
        return f"{_wrap(pred.left, Or, names)} AND {_wrap(pred.right, (And, Or), names)}"
    if isinstance(pred, Or):
        return f"{predicate_text(pred.left, names)} OR {_wrap(pred.right, Or, names)}"
    if isinstance(pred, Not):
        return f"NOT {_wrap(pred.operand, (And, Or), names)}"
    if isinstance(pred, Flag):
        return pred.name
    named = names if pred.field in ("class", "predicted") else None
    if isinstance(pred, Member):
        values = ", ".join(_num(v, named) for v in pred.values)
        return f"{pred.field} {'NOT IN' if pred.negated else 'IN'} ({values})"
    if pred.op not in ("=", "!="):  # class < 3 orders indices: no name stands for it
        named = None
    return f"{pred.field} {pred.op} {_num(pred.value, named)}"


def _wrap(pred: Predicate, kinds, names) -> str:
    text = predicate_text(pred, names)
    return f"({text})" if isinstance(pred, kinds) else text


def _num(value, names: Sequence[str] | None = None) -> str:
    if names is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and float(value).is_integer() and 0 <= value < len(names):
        value = names[int(value)]
    if isinstance(value, str):  # a class name
        return repr(value)
    if isinstance(value, int):  # exact, and an int beyond the range of floats cannot overflow
        return str(value)
    return str(int(value)) if value.is_integer() else repr(value)


# --- query parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRef:
    """A layer named by its qualified module name (``layer3.1.conv2``, ``features.0``, ``3``),
    and for a module that runs several times per forward pass, which call (``relu#2``: 1-based;
    None: the module as a whole)."""

    name: str
    quoted: bool = False
    call: int | None = None
    span: Span | None = _span()
    # The model whose layer it is, once the session has resolved a leading model name
    # (``wide.layer3.1.conv2``: model "wide", name "layer3.1.conv2"); None until then.
    model: str | None = None

    def text(self) -> str:
        """The reference as written unquoted (``block.relu#2``), for messages."""
        return self.name if self.call is None else f"{self.name}#{self.call}"


@dataclass(frozen=True)
class Arg:
    """One argument of a sampler call; ``name`` is None for a positional argument."""

    name: str | None
    value: object
    span: Span | None = _span()


@dataclass(frozen=True)
class SamplerCall:
    """``USING SAMPLE name(size, key=value, ...)``."""

    name: str
    args: tuple[Arg, ...] = ()
    span: Span | None = _span()


@dataclass(frozen=True)
class Full:
    """``USING FULL``: every matching item, exactly."""

    span: Span | None = _span()


@dataclass(frozen=True)
class Target:
    """``precision >= 0.9``: a bound on the answer's own estimate (``UNTIL``)."""

    metric: str  # "precision" | "cosine" | "js" | "width"
    op: str  # ">=", ">", "<=", "<"
    value: float
    span: Span | None = _span()

    def text(self) -> str:
        return f"{self.metric} {self.op} {_num(self.value)}"


@dataclass(frozen=True)
class Until:
    """``UNTIL target [WITHIN s SECONDS]`` or ``WITHIN s SECONDS``: grow the sample until the
    target is met, the time is spent, or the exact answer is cheaper."""

    target: Target | None = None
    seconds: float | None = None
    span: Span | None = _span()
    seconds_span: Span | None = _span()


@dataclass(frozen=True)
class Auto:
    """``USING AUTO``: exact when that costs about as little as a sample, else the default
    sampler; with ``until``, a sample grown to a target."""

    span: Span | None = _span()


@dataclass(frozen=True)
class Tokens:
    """``TOKENS MEAN | TOKENS MAX | TOKENS ALL | TOKEN n`` after a sequence layer: how an
    item's tokens become one vector (the mean or max over its real tokens, its n-th real
    token with -1 the last, or every (position, unit) for ALL)."""

    mode: str  # "mean" | "max" | "all" | "token"
    position: int | None = None  # TOKEN n
    span: Span | None = _span()

    def text(self) -> str:
        return f"TOKEN {self.position}" if self.mode == "token" else f"TOKENS {self.mode.upper()}"


# --- statements ---------------------------------------------------------------------------


AGGREGATES = ("topk", "avg", "argmax")  # what a Query computes; its Result has the same kind


@dataclass(frozen=True)
class Query:
    """An aggregate over one layer's neurons (or channels) across the matching items."""

    aggregate: str  # one of AGGREGATES
    unit: str  # "neurons" | "channels"
    layer: LayerRef
    k: int | None = None
    k_span: Span | None = _span()
    order: str = "mean"  # TOPK ranks by "mean" or "max"
    where: Predicate | None = None
    group_by: str | None = None  # "class" | "predicted" | "correct"
    group_by_span: Span | None = _span()
    source: Full | SamplerCall | Auto = Full()
    baseline: bool = False
    tokens: Tokens | None = None  # a sequence layer's reduction; None: its default (MEAN)
    span: Span | None = _span()
    text: str = field(default="", compare=False)
    across: "Across | None" = None  # ACROSS CHECKPOINTS: one answer per checkpoint
    until: Until | None = None  # an error-bounded query: grow the sample until ...


@dataclass(frozen=True)
class Across:
    """``ACROSS CHECKPOINTS [PLOT 'file.png']``: the statement once per checkpoint of the
    connection's model (and the final model), answers side by side, curves drawn to a file."""

    plot: "Literal | None" = None
    span: Span | None = _span()


MEASURES = ("cka",)  # what SIMILARITY ... BY may name; CKA is the default


@dataclass(frozen=True)
class Similarity:
    """``SIMILARITY L1, L2 [, L3 ...] [BY measure] ...``: how similar the layers'
    representations of the matching items are (linear CKA), for two layers one value, for more
    every pair's (a matrix, rows and columns in the order given)."""

    layers: tuple[LayerRef, ...]
    tokens: tuple[Tokens | None, ...]  # each layer's TOKENS clause (None: its default view)
    measure: str = "cka"
    measure_span: Span | None = _span()
    where: Predicate | None = None
    group_by: str | None = None
    group_by_span: Span | None = _span()
    source: Full | SamplerCall = Full()
    baseline: bool = False
    plot: Literal | None = None  # PLOT 'file.png': the heat map
    span: Span | None = _span()
    text: str = field(default="", compare=False)
    # ACROSS CHECKPOINTS (one layer): each checkpoint's layer against the final model's; its
    # plot is the statement's PLOT (the curves), ``plot`` above is then None.
    across: Across | None = None


@dataclass(frozen=True)
class Explain:
    query: Query | Similarity | TopInputs
    span: Span | None = _span()
    text: str = field(default="", compare=False)


@dataclass(frozen=True)
class Show:
    what: str  # "layers" | "samplers" | "profile" | "settings" | "cache" | "models"
    span: Span | None = _span()
    text: str = field(default="", compare=False)


@dataclass(frozen=True)
class Describe:
    layer: LayerRef
    span: Span | None = _span()
    text: str = field(default="", compare=False)


@dataclass(frozen=True)
class SetStatement:
    name: str
    value: object
    span: Span | None = _span()
    value_span: Span | None = _span()
    name_span: Span | None = _span()
    text: str = field(default="", compare=False)
    # The value as written: a layer named by a number (SET latent = 0.10, an nn.Sequential's
    # eleventh module) is its text, not the float 0.1's.
    written: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ClearCache:
    """``CLEAR CACHE``: remove every entry of the disk cache (this session keeps its memory)."""

    span: Span | None = _span()
    text: str = field(default="", compare=False)


@dataclass(frozen=True)
class Literal:
    """A number or string written in a statement, with where it is (for errors that point)."""

    value: object
    span: Span | None = _span()


@dataclass(frozen=True)
class Sweep:
    """``SWEEP j IN (0.1, 0.5, 0.9)``: one evaluation per value of a sampler parameter."""

    param: str
    values: tuple[Literal, ...]
    span: Span | None = _span()  # the parameter's name


@dataclass(frozen=True)
class Evaluate:
    """``EVALUATE SAMPLERS s1, s2 AT 0.05, 0.1 [K 10] [LAYERS l1, l2] [SEEDS 5] [SWEEP j IN (...)]
    [PLOT 'file.png']`` (clauses in any order): the paper's S1/S2/S3 workload benchmark. Empty
    tuples and None are clauses left out (every sampler, the default sizes, K 10, the default
    layers, 5 seeds)."""

    samplers: tuple[SamplerCall, ...] = ()
    sizes: tuple[Literal, ...] = ()
    ks: tuple[Literal, ...] = ()
    layers: tuple[LayerRef, ...] = ()
    seeds: Literal | None = None
    sweep: Sweep | None = None
    plot: Literal | None = None
    span: Span | None = _span()
    text: str = field(default="", compare=False)


@dataclass(frozen=True)
class NeuronRef:
    """One neuron as result labels write it: ``conv2[5,3,3]``, ``fc1[17]``, ``enc[3]``,
    ``enc[4,3]`` (TOKENS ALL), ``relu#2[3]``; with ``channel`` (``FOR CHANNEL conv2[5]``) a
    channel, whose activation is its mean over the rest of the item's output."""

    layer: LayerRef
    index: tuple[int, ...]
    channel: bool = False
    span: Span | None = _span()  # the whole reference
    index_span: Span | None = _span()  # from the first index to the closing bracket

    def text(self) -> str:
        return f"{self.layer.text()}[{','.join(map(str, self.index))}]"


@dataclass(frozen=True)
class TopInputs:
    """``TOPK k INPUTS FOR conv2[5,3,3] [TOKENS ...] [WHERE p] [USING ...]``: the k items with
    the highest activation of one neuron (``largest`` False: BOTTOMK, the lowest)."""

    k: int
    neuron: NeuronRef
    largest: bool = True
    k_span: Span | None = _span()
    tokens: Tokens | None = None
    where: Predicate | None = None
    source: Full | SamplerCall = Full()
    span: Span | None = _span()
    text: str = field(default="", compare=False)
    plot: Literal | None = None  # PLOT 'file.png': the items' grid

    @property
    def layer(self) -> LayerRef:
        return self.neuron.layer

    @property
    def unit(self) -> str:
        """What the neuron's index counts, as a Query's unit (the binder's views read it)."""
        return "channels" if self.neuron.channel else "neurons"


Statement = Union[Query, Similarity, Explain, Show, Describe, SetStatement, ClearCache, Evaluate,
                  TopInputs]


def children(node) -> Iterator[object]:
    """The nodes directly under ``node``, in source order (spans and plain values are not nodes)."""
    for item in fields(node):
        value = getattr(node, item.name)
        for child in value if isinstance(value, tuple) else (value,):
            if is_dataclass(child) and not isinstance(child, (Span, type)):
                yield child


def walk(node) -> Iterator[object]:
    """``node`` and every node under it, depth first in source order; without recursion, so a
    predicate nested as deep as the parser allows is walked in constant stack."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(list(children(current))))
