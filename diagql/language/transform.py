"""Parse tree to AST: the Lark transformer, one method per grammar rule, and its literals."""
from __future__ import annotations

import functools
import re

from diagql.errors import IncompleteStatement, ParseError
from diagql.language import ast


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def _number(token) -> int | float:
    text = str(token)
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return float(text)


class _PredicatesAndLiterals:
    """ToAst's rules for predicates and literals (``_span`` and ``source`` are ToAst's)."""

    def compare(self, meta, children):
        field, op, value = children
        op = {"<>": "!="}.get(str(op), str(op))
        return ast.Compare(field, op, self._class_value(field, value), span=self._span(meta))

    def _class_value(self, field: str, value):
        """A number, or a class's name (a quoted string: class = 'cat'); confidence takes a
        number only."""
        if getattr(value, "type", None) != "STRING":  # a lark Token when quoted
            return _plain(value)
        if field == "confidence":
            span = self.offset.span(value)
            raise ParseError(f"unexpected {str(value)!r}; expected a number: confidence "
                             f"compares with one", line=span.line, column=span.column,
                             end_column=span.end_column, source=self.source)
        return _unquote(str(value))

    def member(self, meta, children):
        field, _in, *values = children
        return ast.Member(field, tuple(self._class_value(field, v) for v in values),
                          span=self._span(meta))

    def not_member(self, meta, children):
        field, _not, _in, *values = children
        return ast.Member(field, tuple(self._class_value(field, v) for v in values),
                          negated=True, span=self._span(meta))

    def flag(self, meta, children):
        return ast.Flag(str(children[0]).lower(), span=self._span(meta))

    def field(self, meta, children):
        return str(children[0]).lower()

    def and_(self, meta, children):
        return ast.And(children[0], children[2], span=self._span(meta))

    def or_(self, meta, children):
        return ast.Or(children[0], children[2], span=self._span(meta))

    def not_(self, meta, children):
        return ast.Not(children[1], span=self._span(meta))

    # values keep their span so SET and sampler errors can point at them
    def number(self, meta, children):
        try:
            value = _number(children[0])
        except ValueError:  # Python refuses to convert integers of over 4,300 digits
            raise self._too_long(children[0]) from None
        return _Located(value, self._span(meta))

    def _int(self, token, digits: str | None = None) -> int:
        try:
            return int(token if digits is None else digits)
        except ValueError:
            raise self._too_long(token) from None

    def _too_long(self, token) -> ParseError:
        span = self.offset.span(token)
        return ParseError(f"number with {len(str(token)):,} digits is too long", line=span.line,
                          column=span.column, end_column=span.end_column, source=self.source)

    def string(self, meta, children):
        return _Located(_unquote(str(children[0])), self._span(meta))

    def word(self, meta, children):
        return _Located(str(children[0]), self._span(meta))


def _no_until(fields: dict, statement: str, source: str) -> None:
    """The grammar shares its source clause among statements, but only a query can grow its
    sample to a target (docs/ARCHITECTURE.md, "Error-bounded queries")."""
    until = fields.get("until")
    if until is None:
        return
    span = until.span
    raise ParseError(f"{statement} takes no UNTIL or WITHIN: only a TOPK, AVG or ARGMAX query "
                     f"over neurons grows its sample to a target; use USING SAMPLE s(size)",
                     line=span.line if span else None, column=span.column if span else None,
                     end_column=span.end_column if span and span.end_line == span.line else None,
                     source=source)


@functools.lru_cache(maxsize=1)
def _build_transformer():
    from lark import Transformer, v_args

    # Lark's v_args wraps only a class's own methods, so the predicate and literal rules get a
    # Transformer class of their own, which ToAst extends.
    rules = {k: v for k, v in vars(_PredicatesAndLiterals).items() if not k.startswith("__")}
    predicates = v_args(meta=True)(type("PredicatesAndLiterals", (Transformer,), rules))

    @v_args(meta=True)
    class ToAst(predicates):
        def __init__(self, offset, source: str):
            super().__init__()
            self.offset = offset
            self.source = source

        def _span(self, meta):
            return self.offset.span(meta)

        def _text(self, meta) -> str:
            span = self._span(meta)
            return self.source[span.start_pos:span.end_pos] if span else ""

        # statements
        def query(self, meta, children):
            agg, _in, layer, *clauses = children
            fields = dict(agg)
            for clause in clauses:
                fields.update(clause)
            if "order" in fields:
                order, span = fields["order"]
                if fields["aggregate"] != "topk":
                    raise ParseError(f"BY {order.upper()} applies to TOPK only", line=span.line,
                                     column=span.column, end_column=span.end_column,
                                     source=self.source)
                fields["order"] = order
            return ast.Query(layer=layer, span=self._span(meta), text=self._text(meta), **fields)

        def similarity(self, meta, children):
            layers = [c for c in children[1:] if isinstance(c, tuple) and len(c) == 2]
            fields = {}
            for clause in children[1 + len(layers):]:
                if isinstance(clause, tuple):  # PLOT: (keyword, "plot", Literal), as EVALUATE's
                    clause = {"plot": clause[2]}
                fields.update(clause)
            if "across" in fields:  # its PLOT draws the curves over the checkpoints
                fields["across"] = ast.Across(fields.pop("plot", None), span=fields["across"])
            if len(layers) != (1 if "across" in fields else max(len(layers), 2)):
                span = self._span(meta)
                if "across" in fields and fields["across"].span is not None:
                    span = fields["across"].span  # the clause that takes one layer
                # Nothing after the one layer: more text could still make it valid (the REPL
                # waits for the next line, as for any statement cut short).
                error = IncompleteStatement if not fields else ParseError
                raise error("SIMILARITY compares two or more layers, or one layer ACROSS "
                            "CHECKPOINTS; expected ',' and another layer, or ACROSS CHECKPOINTS"
                            if "across" not in fields else
                            "SIMILARITY ... ACROSS CHECKPOINTS takes one layer (each "
                            "checkpoint's is compared with the final model's)",
                            line=span.line if span else None,
                            column=span.column if span else None, source=self.source)
            _no_until(fields, "SIMILARITY", self.source)
            return ast.Similarity(tuple(ref for ref, _ in layers),
                                  tuple(tokens for _, tokens in layers), span=self._span(meta),
                                  text=self._text(meta), **fields)

        def sim_across(self, meta, children):
            return {"across": self._span(meta)}

        def sim_layer(self, meta, children):
            ref, *tokens = children
            return ref, tokens[0]["tokens"] if tokens else None

        def measure(self, meta, children):
            return {"measure": str(children[1]).lower(),
                    "measure_span": self.offset.span(children[1])}

        def explain(self, meta, children):
            return ast.Explain(children[1], span=self._span(meta), text=self._text(meta))

        def show(self, meta, children):
            return ast.Show(str(children[1]).lower(), span=self._span(meta), text=self._text(meta))

        def clear_cache(self, meta, children):
            return ast.ClearCache(span=self._span(meta), text=self._text(meta))

        def describe(self, meta, children):
            return ast.Describe(children[1], span=self._span(meta), text=self._text(meta))

        def evaluate(self, meta, children):
            fields = {}
            for keyword, name, value in children[2:]:
                if name in fields:
                    span = self.offset.span(keyword)
                    raise ParseError(f"{str(keyword).upper()} is given twice", line=span.line,
                                     column=span.column, end_column=span.end_column,
                                     source=self.source)
                fields[name] = value
            return ast.Evaluate(span=self._span(meta), text=self._text(meta), **fields)

        def inputs(self, meta, children):
            keyword, k, _inputs, _for, *rest = children
            channel = bool(rest) and getattr(rest[0], "type", None) == "CHANNEL"
            neuron, *clauses = rest[1:] if channel else rest
            fields = {}
            for clause in clauses:  # PLOT: (keyword, "plot", Literal), as EVALUATE's
                fields.update({"plot": clause[2]} if isinstance(clause, tuple) else clause)
            _no_until(fields, f"{str(keyword).upper()} k INPUTS", self.source)
            neuron = ast.NeuronRef(neuron.layer, neuron.index, channel, span=neuron.span,
                                   index_span=neuron.index_span)
            return ast.TopInputs(self._int(k), neuron, str(keyword).lower() == "topk",
                                 k_span=self.offset.span(k), span=self._span(meta),
                                 text=self._text(meta), **fields)

        def neuron(self, meta, children):
            layer, *index = children
            start = self.offset.span(index[0])
            end = self._span(meta)
            # From the first index to the closing bracket (the caret of an index error; the
            # '[' itself may sit on a line before it).
            bracket = ast.Span(start.line, start.column, end.end_line, end.end_column,
                               start.start_pos, end.end_pos)
            return ast.NeuronRef(layer, tuple(self._int(i) for i in index), span=end,
                                 index_span=bracket)

        # EVALUATE's clauses: each gives (its keyword token, the Evaluate field, the value)
        def sampler_list(self, meta, children):
            return None, "samplers", tuple(children)

        def at(self, meta, children):
            return children[0], "sizes", tuple(self._literal(v) for v in children[1:])

        def top_k(self, meta, children):
            return children[0], "ks", tuple(self._literal(v) for v in children[1:])

        def eval_layers(self, meta, children):
            return children[0], "layers", tuple(children[1:])

        def seeds(self, meta, children):
            return children[0], "seeds", self._literal(children[1])

        def sweep(self, meta, children):
            keyword, name, _in, *values = children
            return keyword, "sweep", ast.Sweep(str(name).lower(),
                                               tuple(self._literal(v) for v in values),
                                               span=self.offset.span(name))

        def plot(self, meta, children):
            token = children[1]
            return children[0], "plot", ast.Literal(_unquote(str(token)),
                                                    span=self.offset.span(token))

        def _literal(self, value) -> ast.Literal:
            return ast.Literal(_plain(value), span=getattr(value, "_span", None))

        def set_stmt(self, meta, children):
            _, name, _, value = children
            value_span = getattr(value, "_span", None)
            written = self.source[value_span.start_pos:value_span.end_pos] if value_span \
                else None
            return ast.SetStatement(str(name).lower(), _plain(value), span=self._span(meta),
                                    value_span=value_span, name_span=self.offset.span(name),
                                    text=self._text(meta), written=written)

        # aggregates: each returns the Query fields it decides
        def topk(self, meta, children):
            return {"aggregate": "topk", "k": self._int(children[1]), "unit": children[2],
                    "k_span": self.offset.span(children[1])}

        def avg(self, meta, children):
            return {"aggregate": "avg", "unit": children[1]}

        def argmax(self, meta, children):
            return {"aggregate": "argmax", "unit": children[1]}

        def unit(self, meta, children):
            return str(children[0]).lower()

        def order(self, meta, children):
            return {"order": (str(children[1]).lower(), self._span(meta))}

        def tokens(self, meta, children):
            keyword, value = children
            if str(keyword).lower() == "tokens":
                return {"tokens": ast.Tokens(str(value).lower(), span=self._span(meta))}
            position, span = _plain(value), value._span
            if not isinstance(position, int):
                raise ParseError("TOKEN takes a whole number: 0 for the first token, -1 for "
                                 "the last", line=span.line, column=span.column,
                                 end_column=span.end_column, source=self.source)
            return {"tokens": ast.Tokens("token", position, span=self._span(meta))}

        def layer(self, meta, children):
            token, *call = children
            quoted = token.type == "STRING"
            name = _unquote(str(token)) if quoted else str(token)
            span, number = self._span(meta), None
            if call and call[0] == "#":
                raise ParseError(f"'#' takes a call number: {name}#1 is the module's first call",
                                 line=span.line, column=span.column, end_column=span.end_column,
                                 source=self.source)
            if call:
                number = self._int(call[0], call[0][1:])
            return ast.LayerRef(name, quoted, number, span=span)

        # clauses
        def where(self, meta, children):
            return {"where": children[1]}

        def group_by(self, meta, children):
            return {"group_by": str(children[2]).lower(), "group_by_span": self._span(meta)}

        def full(self, meta, children):
            return {"source": ast.Full(span=self._span(meta))}

        def sample(self, meta, children):
            return {"source": children[2], **dict(children[3:])}

        def auto(self, meta, children):
            until = [c for c in children if isinstance(c, tuple)]
            return {"source": ast.Auto(span=self._span(meta)), **dict(until)}

        def until(self, meta, children):
            target = children[1] if isinstance(children[1], ast.Target) else None
            seconds = [c for c in children if isinstance(c, _Located)]
            span = None
            if seconds:
                span = seconds[0]._span
                if not seconds[0].value > 0:
                    raise ParseError("WITHIN takes a positive number of seconds", line=span.line,
                                     column=span.column, end_column=span.end_column,
                                     source=self.source)
            return ("until", ast.Until(target, float(_plain(seconds[0])) if seconds else None,
                                       span=self._span(meta), seconds_span=span))

        def target(self, meta, children):
            name, op, value = children
            return ast.Target(str(name).lower(), {"<>": "!="}.get(str(op), str(op)),
                              _plain(value), span=self._span(meta))

        def baseline(self, meta, children):
            return {"baseline": True}

        def across(self, meta, children):
            plot = children[2][2] if len(children) > 2 else None
            return {"across": ast.Across(plot, span=self._span(meta))}

        def sampler(self, meta, children):
            name, *args = children
            return ast.SamplerCall(str(name).lower(), tuple(args), span=self._span(meta))

        def positional(self, meta, children):
            return ast.Arg(None, _plain(children[0]), span=self._span(meta))

        def keyword(self, meta, children):
            return ast.Arg(str(children[0]).lower(), _plain(children[2]), span=self._span(meta))

        # predicates
    return ToAst


class _Located:
    """A literal value with its span, unwrapped by ``_plain`` once it reaches the AST."""

    __slots__ = ("value", "_span")

    def __init__(self, value, span):
        self.value = value
        self._span = span


def _plain(value):
    return value.value if isinstance(value, _Located) else value


def to_ast(tree, offset, source: str):
    """The AST of a parse tree; ``offset`` maps the piece's positions to the script's."""
    return _build_transformer()(offset, source).transform(tree)
