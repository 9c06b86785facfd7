"""Text to AST: statement splitting, the parse tree's transformation, and friendly errors."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterator

from diagql.errors import IncompleteStatement, ParseError
from diagql.language import ast
from diagql.language.grammar import get_parser, keywords, statement_keywords

# --- splitting a script into statements ----------------------------------------------------

_SCAN = re.compile(r"""'(?:[^'\\\n]|\\.)*'?|"(?:[^"\\\n]|\\.)*"?|--[^\n]*|;""")


def _blank_comments(text: str) -> str:
    """The text with each comment (not a '--' inside a string) replaced by spaces."""
    return _SCAN.sub(lambda m: " " * len(m.group()) if m.group().startswith("--") else m.group(), text)


@dataclass(frozen=True)
class Piece:
    """One statement's text and where it starts in the script."""

    text: str
    start_pos: int
    line: int
    column: int
    terminated: bool  # ended by ';' (the REPL runs a statement once it is terminated)


def split_statements(text: str) -> list[Piece]:
    """Cut a script at the ``;`` that are outside strings and comments; drop empty statements."""
    pieces: list[Piece] = []
    start, line, line_start = 0, 1, 0

    def add(end: int, terminated: bool) -> None:
        chunk = text[start:end]
        if _blank_comments(chunk).strip():
            before = text[line_start:start]
            pieces.append(Piece(chunk, start, line, len(before) + 1, terminated))

    for match in _SCAN.finditer(text):
        if match.group() != ";":
            continue
        add(match.start(), True)
        # Advance the line counter to the new start so each piece knows its position.
        newlines = text.count("\n", start, match.end())
        if newlines:
            line += newlines
            line_start = text.rfind("\n", 0, match.end()) + 1
        start = match.end()
    add(len(text), False)
    return pieces


# --- parsing --------------------------------------------------------------------------------


def parse(text: str) -> ast.Statement:
    """Parse exactly one statement (a trailing ``;`` is allowed)."""
    statements = list(iter_statements(text))
    if not statements:
        raise ParseError("empty statement: nothing to run", line=1, column=1, source=text)
    if len(statements) > 1:
        second = statements[1].span
        raise ParseError("expected one statement, found several; use execute() for scripts",
                         line=second.line, column=second.column, source=text)
    return statements[0]


def parse_script(text: str) -> list[ast.Statement]:
    """Parse every statement of a script, raising at the first one that is not valid."""
    return list(iter_statements(text))


def iter_statements(text: str) -> Iterator[ast.Statement]:
    """Parse statement by statement, so callers can run the valid prefix of a script."""
    for piece in split_statements(text):
        yield parse_piece(piece, text)


def parse_sampler(text: str) -> ast.SamplerCall:
    """Parse a bare sampler call such as ``stratified(0.05)`` (for ``Connection.sample``)."""
    return parse_piece(Piece(text, 0, 1, 1, False), text, start="sampler")


def parse_piece(piece: Piece, source: str, start: str = "start") -> ast.Statement:
    from lark.exceptions import UnexpectedInput, VisitError

    offset = _Offset(piece)
    try:
        tree = get_parser().parse(piece.text, start=start)
    except UnexpectedInput as exc:
        raise _friendly(exc, piece, offset, source, start) from None
    _check_depth(tree, offset, source)
    try:
        return _ToAst(offset, source).transform(tree)
    except VisitError as exc:  # errors raised inside the transformer arrive wrapped
        if isinstance(exc.orig_exc, ParseError):
            raise exc.orig_exc from None
        raise


# Deeper predicates (NOT NOT ..., or hundreds of ANDs in a row) would exhaust Python's stack in
# the recursive passes that follow; parentheses alone do not count (the grammar inlines them).
MAX_DEPTH = 200


def _check_depth(tree, offset: "_Offset", source: str) -> None:
    """Refuse a tree deeper than MAX_DEPTH, measured without recursion."""
    from lark import Tree

    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            span = offset.span(node.meta)
            raise ParseError(f"the statement is nested too deeply (over {MAX_DEPTH} levels of "
                             f"AND, OR and NOT); split the predicate",
                             line=span.line if span else None,
                             column=span.column if span else None, source=source)
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))


class _Offset:
    """Maps positions within a piece to positions within the whole script."""

    def __init__(self, piece: Piece):
        self.piece = piece

    def line_col(self, line: int, column: int) -> tuple[int, int]:
        if line == 1:
            return self.piece.line, self.piece.column + column - 1
        return self.piece.line + line - 1, column

    def span(self, item) -> ast.Span | None:
        if getattr(item, "empty", False) or getattr(item, "line", None) is None:
            return None
        line, column = self.line_col(item.line, item.column)
        end_line, end_column = self.line_col(item.end_line, item.end_column)
        return ast.Span(line, column, end_line, end_column,
                        self.piece.start_pos + item.start_pos, self.piece.start_pos + item.end_pos)


# --- friendly error messages -----------------------------------------------------------------

_DESCRIBE_TERMINAL = {
    "$END": "end of statement",
    "INT": "a whole number",
    "NUMBER": "a number",
    "LAYER_NAME": "a layer name",
    "NAME": "a name",
    "STRING": "a quoted string",
    "CMP": "a comparison (<, <=, >, >=, !=)",
    "EQ": "'='",
    "LPAR": "'('",
    "RPAR": "')'",
    "COMMA": "','",
    "CALL": "a call number ('#2')",
}


@functools.lru_cache(maxsize=None)
def _terminal_names() -> dict[str, str]:
    """Display names for terminals: keywords print as themselves."""
    return {**{name: name for name in keywords()}, **_DESCRIBE_TERMINAL}


def describe_expected(expected) -> str:
    names = _terminal_names()
    if "NUMBER" in expected:  # a whole number is a number: say it once
        expected = set(expected) - {"INT"}
    shown = sorted({names.get(t, t) for t in expected if not t.startswith("__")},
                   key=lambda s: (not s.isupper(), s))
    if not shown:
        return ""
    if len(shown) == 1:
        return shown[0]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def _friendly(exc, piece: Piece, offset: _Offset, source: str, start: str) -> ParseError:
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

    expected = _acceptable(exc, piece, start)
    token, hint = getattr(exc, "token", None), None
    at_end = isinstance(exc, UnexpectedEOF) or (token is not None and token.type == "$END")
    if at_end:
        line, column = _end_of(piece)
        what, width = "unexpected end of statement", 1
    elif isinstance(exc, UnexpectedCharacters):
        line, column = offset.line_col(exc.line, exc.column)
        char = piece.text[exc.pos_in_stream] if exc.pos_in_stream < len(piece.text) else ""
        what, width = f"unexpected character {char!r}", 1
    else:
        assert isinstance(exc, UnexpectedToken)
        line, column = offset.line_col(token.line, token.column)
        what, width = f"unexpected {str(token)!r}", max(len(str(token)), 1)
    if not at_end and token is not None and token.type == "CALL":
        hint = ("hint: '#n' names one call of a layer, right after its name (block.relu#2); "
                "as a value (SET latent = ...), quote it: 'block.relu#2'")
    wanted = describe_expected(expected)
    message = f"{what}; expected {wanted}" if wanted else what
    if start == "start" and (line, column) == _first_token_position(piece) and not at_end:
        *most, last = statement_keywords()
        hint = f"hint: a statement starts with {', '.join(most)} or {last}"
    error = IncompleteStatement if at_end else ParseError
    return error(message, line=line, column=column, end_column=column + width, source=source,
                 hint=hint)


def _acceptable(exc, piece: Piece, start: str) -> set[str]:
    """Terminals the parser would take at the error (with end of statement where it fits)."""
    from lark.exceptions import UnexpectedCharacters

    if isinstance(exc, UnexpectedCharacters):
        # The lexer failed, so ask the parser what it would accept just before that character.
        try:
            interactive = get_parser().parse_interactive(piece.text[:exc.pos_in_stream], start=start)
            interactive.exhaust_lexer()
            return set(interactive.accepts())
        except Exception:  # noqa: BLE001 - a failing re-parse only costs the expected list
            return set(exc.allowed or ())
    return set(getattr(exc, "accepts", None) or getattr(exc, "expected", None) or ())


def _end_of(piece: Piece) -> tuple[int, int]:
    """Just past the last character of the statement (LALR reports the last token instead)."""
    body = _blank_comments(piece.text).rstrip()
    before = body.rsplit("\n", 1)
    line = piece.line + body.count("\n")
    column = len(before[-1]) + (piece.column if line == piece.line else 0) + (1 if line != piece.line else 0)
    return line, column


def _first_token_position(piece: Piece) -> tuple[int, int]:
    body = _blank_comments(piece.text)
    stripped = len(body) - len(body.lstrip())
    lead = body[:stripped]
    line = piece.line + lead.count("\n")
    if "\n" in lead:
        return line, len(lead) - lead.rfind("\n")
    return line, piece.column + stripped


# --- parse tree to AST ------------------------------------------------------------------------


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def _number(token) -> int | float:
    text = str(token)
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return float(text)


@functools.lru_cache(maxsize=1)
def _build_transformer():
    from lark import Transformer, v_args

    @v_args(meta=True)
    class ToAst(Transformer):
        def __init__(self, offset: _Offset, source: str):
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
            return ast.SetStatement(str(name).lower(), _plain(value), span=self._span(meta),
                                    value_span=value_span, name_span=self.offset.span(name),
                                    text=self._text(meta))

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
            return {"group_by": str(children[2]).lower()}

        def full(self, meta, children):
            return {"source": ast.Full(span=self._span(meta))}

        def sample(self, meta, children):
            return {"source": children[2]}

        def baseline(self, meta, children):
            return {"baseline": True}

        def sampler(self, meta, children):
            name, *args = children
            return ast.SamplerCall(str(name).lower(), tuple(args), span=self._span(meta))

        def positional(self, meta, children):
            return ast.Arg(None, _plain(children[0]), span=self._span(meta))

        def keyword(self, meta, children):
            return ast.Arg(str(children[0]).lower(), _plain(children[2]), span=self._span(meta))

        # predicates
        def compare(self, meta, children):
            field, op, value = children
            op = {"<>": "!="}.get(str(op), str(op))
            return ast.Compare(field, op, _plain(value), span=self._span(meta))

        def member(self, meta, children):
            field, _in, *values = children
            return ast.Member(field, tuple(_plain(v) for v in values), span=self._span(meta))

        def not_member(self, meta, children):
            field, _not, _in, *values = children
            return ast.Member(field, tuple(_plain(v) for v in values), negated=True,
                              span=self._span(meta))

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

    return ToAst


class _Located:
    """A literal value with its span, unwrapped by ``_plain`` once it reaches the AST."""

    __slots__ = ("value", "_span")

    def __init__(self, value, span):
        self.value = value
        self._span = span


def _plain(value):
    return value.value if isinstance(value, _Located) else value


def _ToAst(offset: _Offset, source: str):
    return _build_transformer()(offset, source)
