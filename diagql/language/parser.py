"""Text to AST: statement splitting, the parse tree's transformation, and friendly errors."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterator

from diagql.errors import DiagQLError, IncompleteStatement, ParseError
from diagql.suggest import did_you_mean
from diagql.language import ast
from diagql.language.grammar import get_parser, keywords, statement_keywords
from diagql.language.transform import to_ast

# --- splitting a script into statements ----------------------------------------------------

_LONE_CR = re.compile(r"\r(?!\n)")
# A string runs to its closing quote on its line; one left open stops before the next ``;``,
# so that the statements after it are still statements (--keep-going runs them) and the open
# string is the error of its own statement only.
_SCAN = re.compile(r"""'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n;]|\\.)*|"""
                   r""""(?:[^"\\\n;]|\\.)*|--[^\n]*|;""")


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

    def statement_text(self) -> str:
        """The statement as written, its comments left out: what a failed statement's record
        names (``DiagQLError.statement``) where no statement was made of it."""
        return " ".join(_blank_comments(self.text).split())


def one_line_break(text):
    """The text with each lone carriage return (old Mac line ends, a string built with
    ``\\r``) made a newline, in place: a ``--`` comment runs to the end of its line, and it
    had run past such a line end, swallowing the statements and clauses after it (a WHERE
    dropped without a word). Python's own files read so already; other values as they are."""
    return _LONE_CR.sub("\n", text) if isinstance(text, str) and "\r" in text else text


def split_statements(text: str) -> list[Piece]:
    """Cut a script at the ``;`` that are outside strings and comments; drop empty statements."""
    if not isinstance(text, str):  # every entry point's text passes here: query(None) too
        decode = "; decode it first: .decode()" if isinstance(text, (bytes, bytearray)) else ""
        raise DiagQLError(f"a statement is text (a str), not {type(text).__name__}{decode}")
    text = one_line_break(text)
    if text.startswith("\ufeff"):  # a file's byte order mark, read as text: a blank, in place
        text = " " + text[1:]
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
    if not isinstance(text, str):  # lark's own error named its lexer's state
        raise ParseError(f"sample() takes a sampler call as text, e.g. \"stratified(0.05)\", "
                         f"not {text!r}")
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
        return to_ast(tree, offset, source)
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

    stack = [(tree, 1, 0)]  # (node, its depth, how many ANDs and ORs above it)
    while stack:
        node, depth, chained = stack.pop()
        if depth > MAX_DEPTH:
            span = offset.span(node.meta)
            # A program's long chain of ORs (class = 1 OR class = 2 ...) nests one level a
            # term: a list of values is one IN, of any length.
            hint = "hint: for a list of values, class IN (1, 5, 9) or predicted IN (...) " \
                "takes any number" if chained > MAX_DEPTH // 2 else None
            raise ParseError(f"the statement is nested too deeply (over {MAX_DEPTH} levels of "
                             f"AND, OR and NOT); split the predicate",
                             line=span.line if span else None,
                             column=span.column if span else None, source=source, hint=hint)
        chained += node.data in ("or_", "and_")
        stack.extend((child, depth + 1, chained) for child in node.children
                     if isinstance(child, Tree))


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
    "LSQB": "'['",
    "RSQB": "']'",
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
    whole = None if at_end or not isinstance(exc, UnexpectedToken) else \
        _split_number(piece.text, token.start_pos, str(token))
    if whole is not None:  # TOPK 2.5: the lexer took 2 for the whole number and left '.5'
        number_start, text = whole  # on the token's line: digits hold no line break
        line, column = offset.line_col(token.line,
                                       token.column - (token.start_pos - number_start))
        what, width, expected = f"expected a whole number, not {text!r}", len(text), ()
    if not at_end and token is not None and token.type == "CALL":
        hint = ("hint: '#n' names one call of a layer, right after its name (block.relu#2); "
                "as a value (SET latent = ...), quote it: 'block.relu#2'")
    elif isinstance(exc, UnexpectedCharacters) and what[-2:-1] in ("'", '"') and \
            what[-2] not in piece.text[exc.pos_in_stream + 1:].split("\n", 1)[0]:
        what, expected = f"unterminated quoted string: no closing {what[-2]} on its line", ()
    elif isinstance(exc, UnexpectedCharacters) and not what[-2].isascii() and \
            (what[-2].isalnum() or what[-2] == "_") and \
            _unquoted_word(piece.text, exc.pos_in_stream, "STRING" in expected):
        # A name that reads unquoted only in ASCII (dünn, 层): quoted, it is a name (sweep OO3),
        # where the lexer took its first letters for one or a quoted text may stand.
        hint = (f"hint: quote a name or value with letters beyond ASCII: "
                f'"{_unquoted_word(piece.text, exc.pos_in_stream, True)}"')
    elif not at_end and token is not None:
        hint = _clause_hint(piece, str(token), token.start_pos) or \
            _operator_hint(piece, str(token), token.start_pos)
    wanted = describe_expected(expected)
    message = f"{what}; expected {wanted}" if wanted else what
    if not at_end and isinstance(exc, UnexpectedToken) and str(token).isalpha() and \
            str(token).upper() not in keywords():
        # A misspelt keyword (SHOW LAYRES, USNG FULL) gets a suggestion, as a misspelt name does;
        # a keyword out of place (WITH BASELINE where none is taken) is no misspelling.
        names = _terminal_names()
        words = [names.get(t, t) for t in expected if not t.startswith("__")]
        message += did_you_mean(str(token).upper(), [w for w in words if w.isupper()])
    if start == "start" and (line, column) == _first_token_position(piece) and not at_end:
        *most, last = statement_keywords()
        hint = (f"hint: a statement starts with {', '.join(most)} or {last} (.help in the "
                f"REPL describes each)")
    elif hint is None and not at_end and isinstance(exc, UnexpectedToken) and \
            str(token).upper() in statement_keywords():
        hint = f"hint: a new statement starts at {str(token)!r}: end the one before it with ';'"
    error = IncompleteStatement if at_end else ParseError
    return error(message, line=line, column=column, end_column=column + width, source=source,
                 hint=hint)


def _unquoted_word(text: str, at: int, here: bool) -> str:
    """The word (letters, digits, '_', '.', '#') around ``text[at]``, where it began before
    ``at`` (the lexer took its first letters for a name) or ``here`` (a quoted text may stand
    where it begins); else ''."""
    first = at
    while first > 0 and (text[first - 1].isalnum() or text[first - 1] in "_."):
        first -= 1
    if first == at and not here:
        return ""
    last = at
    while last < len(text) and (text[last].isalnum() or text[last] in "_.#"):
        last += 1
    return text[first:last]


def _split_number(text: str, position: int, token: str) -> tuple[int, str] | None:
    """(where it starts, its text) of a number the lexer split after its whole part where a
    whole number was wanted ('2' then '.5', '1' then 'e1'); None for any other token."""
    import re

    if not re.fullmatch(r"\.\d+([eE][+-]?\d+)?|[eE][+-]?\d+", token):
        return None
    start = position
    while start > 0 and text[start - 1].isdigit():
        start -= 1
    if start == position or (start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_.")):
        return None
    return start, text[start:position + len(token)]


# Each statement's clauses in the one order the grammar takes them (EVALUATE's come in any).
_CLAUSES = {
    "query": ("TOKENS", "BY", "WHERE", "GROUP BY", "USING", "UNTIL", "WITHIN", "WITH BASELINE",
              "ACROSS CHECKPOINTS"),
    "SIMILARITY": ("ACROSS CHECKPOINTS", "BY", "WHERE", "GROUP BY", "USING", "WITH BASELINE",
                   "PLOT"),
    "TOPK k INPUTS": ("TOKENS", "WHERE", "USING", "PLOT"),
}
_CLAUSE_OF = {"TOKEN": "TOKENS", "GROUP": "GROUP BY", "WITH": "WITH BASELINE",
              "ACROSS": "ACROSS CHECKPOINTS"}


def _clause_hint(piece: Piece, word: str, position: int) -> str | None:
    """A clause keyword out of place: say it is given twice, or the order the clauses go in
    (a user writes GROUP BY before WHERE, or WHERE after USING, as SQL would not mind)."""
    word = word.upper()
    clause = _CLAUSE_OF.get(word, word)
    if clause not in _CLAUSES["query"] + _CLAUSES["SIMILARITY"]:
        return None
    words = re.findall(r"[A-Za-z_]+", _blank_comments(piece.text)[:position])
    first = [w.upper() for w in words[:3]]
    if first[:1] == ["EXPLAIN"]:
        first = [w.upper() for w in words[1:4]]
    if first[:1] in (["TOPK"], ["BOTTOMK"]) and first[1:2] == ["INPUTS"]:
        kind = "TOPK k INPUTS"
    elif first[:1] in (["TOPK"], ["AVG"], ["ARGMAX"]):
        kind = "query"
    elif first[:1] == ["SIMILARITY"]:
        kind = "SIMILARITY"
    else:
        return None
    order = " ".join(f"[{c}]" for c in _CLAUSES[kind])
    name = "a query" if kind == "query" else kind
    if clause == "PLOT" and kind == "query":
        return "hint: a query's PLOT 'file.png' follows ACROSS CHECKPOINTS (the curves over them)"
    if clause not in _CLAUSES[kind]:
        return f"hint: {name} takes no {clause}; its clauses are {order}"
    if clause in ("UNTIL", "WITHIN") and [w.upper() for w in words[-2:]] == ["USING", "FULL"]:
        # The grammar's USING FULL takes no growth: said so, not as an order (sweep SY14).
        return (f"hint: {clause} grows a sample, which USING FULL has none of: USING SAMPLE "
                f"sampler(...) {clause} ..., USING AUTO {clause} ..., or {clause} alone")
    if clause in ("WHERE", "GROUP BY", "USING", "WITH BASELINE") and \
            word in (w.upper() for w in words):
        join = "; join conditions with AND or OR" if clause == "WHERE" else ""
        return f"hint: {clause} is given once{join}"
    return f"hint: {name}'s clauses go in this order: {order}"


def _operator_hint(piece: Piece, token: str, position: int) -> str | None:
    """SQL and Python habits: 'class == 3', 'correct = true'; EXPLAIN of what it cannot."""
    before = _blank_comments(piece.text)[:position].rstrip()
    if re.match(r"\s*EXPLAIN\b", before, re.IGNORECASE) and token.upper() in (
            "EXPLAIN", "SHOW", "DESCRIBE", "SET", "CLEAR", "EVALUATE"):
        return ("hint: EXPLAIN shows the plan of a query (TOPK, AVG or ARGMAX over NEURONS or "
                "CHANNELS), of a SIMILARITY or of TOPK k INPUTS")
    if token == "[" and re.search(r"(\bIN|\bSIMILARITY|,)\s*[\w.]+$", before, re.IGNORECASE):
        return ("hint: a layer inside a list or dict is named with dots, as module names are "
                "(blocks.0, stages.dense_1: SHOW LAYERS lists them)")
    setting = re.match(r"\s*SET\s+(\w+)\s*=\s*", before, re.IGNORECASE)
    if setting:  # SET latent = 0.relu#2: a layer name is no number or word
        value = piece.text[setting.end():].split(";")[0].strip().replace("'", "")
        return (f"hint: a value other than one number or word is written in quotes: SET "
                f"{setting.group(1)} = '{value}'")
    if token == "=" and before.endswith("="):
        return "hint: compare with one '=': class = 3"
    if token in ("=", "!=", "<>") and re.search(r"\b(in)?correct$", before, re.IGNORECASE):
        return "hint: correct and incorrect stand alone: WHERE incorrect, WHERE NOT correct"
    if re.search(r"\b(class|predicted)\s*(=|!=|<>|IN\s*\((\s*[-+.\w]+\s*,)*)\s*$", before,
                 re.IGNORECASE) and re.match(r"['\"A-Za-z_]", token):
        return ("hint: class and predicted compare class indices (class = 3), or class names "
                "in quotes (class = 'cat') where the data or the model names its classes")
    return None


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
