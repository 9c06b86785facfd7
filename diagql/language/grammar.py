"""The grammar (grammar/diagql.lark) as the process's one LALR parser, and what it tells the
rest: its keywords and the terminals it accepts after a piece of text."""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # diagql/


def grammar_path() -> Path:
    """The grammar file: inside the installed package, or top-level grammar/ in a checkout."""
    for candidate in (_PACKAGE_DIR / "diagql.lark", _PACKAGE_DIR.parent / "grammar" / "diagql.lark"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("diagql.lark not found: the package is installed incompletely")


@functools.lru_cache(maxsize=1)
def get_parser():
    """The one LALR parser of the process (building it costs far more than a parse)."""
    from lark import Lark

    # Lark's cache (a file in the temp dir, keyed by a hash of the grammar text, the options
    # and Lark's version) makes building the parser 10x cheaper than analysing the grammar
    # (0.03 s against 0.3 s), which every new process — each `diagql -e` — paid. The hash
    # leaves edit_terminals out, so this module's own bytes join the text as a comment: a
    # change here is a new key. A cache that cannot be read or written is rebuilt silently.
    text = grammar_path().read_text(encoding="utf-8")
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return Lark(f"{text}\n// grammar.py {digest}\n", parser="lalr", cache=True,
                start=["start", "sampler"], propagate_positions=True, maybe_placeholders=False,
                edit_terminals=_whole_word_keywords)


def _whole_word_keywords(term) -> None:
    from lark.lexer import PatternRE

    if term.pattern.type == "str" and term.pattern.value.isalpha():
        term.pattern = PatternRE(re.escape(term.pattern.value) + r"(?!\w)", term.pattern.flags)


# A keyword's pattern once _whole_word_keywords has made it match whole words only.
_KEYWORD_PATTERN = re.compile(r"([A-Za-z]+)(?:\(\?!\\w\))?")


@functools.lru_cache(maxsize=1)
def keywords() -> dict[str, str]:
    """Keyword terminal name -> its text, e.g. ``{"TOPK": "topk"}``, in the grammar's order: the
    named all-letter terminals, the one keyword list behind error messages, completion,
    highlighting and help."""
    found = {}
    for term in get_parser().terminals:
        match = _KEYWORD_PATTERN.fullmatch(term.pattern.value)
        if term.name.isalpha() and term.name.isupper() and match:
            found[term.name] = match.group(1).lower()
    return found


def accepts(text: str, start: str = "start") -> set[str] | None:
    """The terminals the parser accepts after ``text`` (the start of one statement), or None
    when the text is already not valid (a lexing or parsing error before its end)."""
    from lark.exceptions import LarkError

    try:
        interactive = get_parser().parse_interactive(text, start=start)
        interactive.exhaust_lexer()
        return set(interactive.accepts())
    except LarkError:
        return None


@functools.lru_cache(maxsize=1)
def statement_keywords() -> tuple[str, ...]:
    """The keywords a statement may start with (``TOPK``, ``SHOW``, ...), in the grammar's order."""
    first = accepts("")
    return tuple(text.upper() for name, text in keywords().items() if name in first)
