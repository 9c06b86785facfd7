"""Syntax highlighting for the REPL: token classes from the grammar's own lexer and terminals."""
from __future__ import annotations

from typing import Iterator

from prompt_toolkit.lexers import Lexer
from prompt_toolkit.styles import Style

from diagql.language.grammar import get_parser, keywords

STYLE = Style.from_dict({
    "keyword": "ansibrightblue bold",
    "number": "ansicyan",
    "string": "ansigreen",
    "name": "",
    "operator": "ansiyellow",
    "comment": "ansibrightblack italic",
    "error": "ansired",
    "meta": "ansimagenta",
})

# A layer's call number (block.relu#2) reads as the number it is.
_CLASSES = {"INT": "number", "NUMBER": "number", "CALL": "number", "STRING": "string",
            "COMMENT": "comment", "EQ": "operator", "CMP": "operator"}


def tokens(text: str) -> Iterator[tuple[str, str]]:
    """(class, text) pieces covering ``text`` exactly; a character the lexer rejects is
    marked ``error`` and lexing goes on after it."""
    from lark.exceptions import LarkError

    words = {kw for kw in keywords().values()}
    position = 0
    while position < len(text):
        rest = text[position:]
        consumed = 0
        try:
            for token in get_parser().lex(rest, dont_ignore=True):
                start = token.start_pos
                if start > consumed:
                    yield "", rest[consumed:start]
                yield _class(token, words), token.value
                consumed = token.end_pos
        except LarkError as exc:
            bad = max(getattr(exc, "pos_in_stream", consumed) or consumed, consumed)
            if bad > consumed:
                yield "", rest[consumed:bad]
            # The character the lexer rejects (e.g. an unterminated quote); lexing goes on after it.
            char = rest[bad:bad + 1]
            yield ("" if char == ";" else "error"), char  # ';' separates statements
            consumed = bad + 1
        else:
            if consumed < len(rest):
                yield "", rest[consumed:]
                consumed = len(rest)
        position += consumed


def _class(token, words: set[str]) -> str:
    if token.type in _CLASSES:
        return _CLASSES[token.type]
    if token.type in ("LAYER_NAME", "NAME") or token.type in keywords():
        if token.value.lower() in words:
            return "keyword"
        return "number" if token.value.isdigit() else "name"
    return ""


class DiagQLLexer(Lexer):
    """prompt_toolkit lexer: keywords, numbers, strings, names, operators, comments."""

    def lex_document(self, document):
        lines: list[list[tuple[str, str]]] = [[]]
        text = document.text
        if text.lstrip().startswith("."):
            pieces = [("meta", text)]
        else:
            pieces = list(tokens(text))
        for cls, piece in pieces:
            style = f"class:{cls}" if cls else ""
            for i, part in enumerate(piece.split("\n")):
                if i:
                    lines.append([])
                if part:
                    lines[-1].append((style, part))

        def get_line(number: int):
            return lines[number] if number < len(lines) else []

        return get_line
