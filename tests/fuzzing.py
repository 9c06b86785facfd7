"""The mutation fuzzer behind tests/test_fuzz.py and ``python -m benchmarks.fuzz_campaign``.

Takes a corpus of valid statements (README.md's sql blocks, examples/tour.dql and a handwritten
list covering every grammar form), mutates them (token drops, swaps and duplicates, character
insertions and replacements including awkward unicode, splices, very long input, deep nesting,
huge numbers, junk) and sends each input through both ``diagql.language.parser.parse_script`` and
``Connection.run_script`` (consumed fully) on a tiny MLP over 50 random items.

The invariant: only ``DiagQLError`` subclasses come out; every error's line and column lie inside
the text; ``err.format()`` works; ``parse_script`` and ``run_script`` agree on the first syntax
error; and no input takes long (over 1 s is reported, over ``hang_s`` seconds is a failure).
Deterministic for a given seed.
"""
from __future__ import annotations

import collections
import random
import re
import signal
import sys
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from diagql.language.grammar import keywords
from diagql.language.parser import split_statements

ROOT = Path(__file__).resolve().parent.parent

# --- the corpus ---------------------------------------------------------------------------------

# The fuzz model's layers are fc1, act, fc2, out (fc2 feeds out, the final linear layer).
HANDWRITTEN = [
    "SHOW LAYERS",
    "SHOW SAMPLERS",
    "SHOW PROFILE",
    "SHOW SETTINGS",
    "SHOW MODELS",
    "show layers;",
    "DESCRIBE fc1",
    "DESCRIBE 'fc2'",
    'DESCRIBE "out"',
    "SET seed = 7",
    "SET batch_size = 16",
    "SET max_rows = 5",
    "SET format = json",
    "TOPK 3 INPUTS FOR fc2[5] WHERE incorrect USING SAMPLE random(0.5)",
    "BOTTOMK 2 INPUTS FOR CHANNEL fc1[1]",
    "SET format = 'csv'",
    "SET latent = fc1",
    "SET latent = default",
    "SET seed = 1e3",
    "TOPK 3 NEURONS IN fc1",
    "TOPK 5 NEURONS IN fc2 BY MAX",
    "TOPK 2 NEURONS IN act BY MEAN WHERE class = 3",
    "topk 4 neurons in fc1 where predicted != 2 and not correct",
    "TOPK 1 CHANNELS IN fc1",
    "AVG NEURONS IN fc1",
    "AVG NEURONS IN fc2 WHERE incorrect GROUP BY class",
    "AVG NEURONS IN out GROUP BY predicted",
    "AVG NEURONS IN act GROUP BY correct USING FULL",
    "ARGMAX NEURONS IN fc1 WHERE confidence >= 0.2",
    "ARGMAX NEURONS IN fc2 WHERE confidence < 0.9 OR class IN (1, 2, 3)",
    "ARGMAX NEURONS IN out WHERE class NOT IN (0, 9) AND (correct OR confidence <> 0.5)",
    "TOPK 3 NEURONS IN fc1 WHERE class = 1 USING SAMPLE random(0.5)",
    "TOPK 3 NEURONS IN fc1 USING SAMPLE random(20) WITH BASELINE",
    "AVG NEURONS IN fc2 USING SAMPLE stratified(0.3) WITH BASELINE",
    "AVG NEURONS IN fc2 USING SAMPLE latentgrid(0.4)",
    "AVG NEURONS IN fc1 USING SAMPLE vas(10)",
    "AVG NEURONS IN fc1 USING SAMPLE ebtree",
    "AVG NEURONS IN fc1 USING SAMPLE weighted(0.5)",
    "AVG NEURONS IN fc1 USING SAMPLE gmm(0.5, j=0.7, covariance=spherical)",
    "AVG NEURONS IN fc1 USING SAMPLE maxmargin(0.5, j=0.7, method=paper)",
    "AVG NEURONS IN fc1 USING SAMPLE maxmargin(size=0.5)",
    "AVG NEURONS IN fc1 USING SAMPLE random()",
    "AVG NEURONS IN fc1 WHERE class = 2 ACROSS CHECKPOINTS",
    "AVG NEURONS IN fc1 USING SAMPLE random(size=10, random_state=3)",
    "EXPLAIN TOPK 3 NEURONS IN fc1 WHERE NOT (class = 1 OR class = 2)",
    "EXPLAIN AVG NEURONS IN fc2 WHERE class IN (3, 5, 8) USING SAMPLE random(0.1) WITH BASELINE",
    "TOPK 3 NEURONS IN \"fc1\" WHERE confidence > -1e3 AND confidence <= +1.5",
    "TOPK 3 NEURONS IN 'a\\'b' -- a comment\n",
    "-- only a comment\nSHOW LAYERS; -- and a trailing one",
    "AVG NEURONS IN fc1 WHERE ((class = 1)) AND NOT NOT correct",
    "SHOW CACHE",
    "CLEAR CACHE",
    "EVALUATE SAMPLERS random, stratified AT 0.5 K 3 LAYERS fc1 SEEDS 1",
    "EVALUATE SAMPLERS random(0.4) LAYERS out K 2, 3 SEEDS 2",
    "EVALUATE SAMPLERS maxmargin AT 0.4, 0.5 LAYERS fc1 SEEDS 1 SWEEP j IN (0.3, 0.7)",
    "TOPK 3 NEURONS IN fc1 TOKENS MAX BY MEAN WHERE class = 1",
    "AVG NEURONS IN fc2 TOKEN -1 USING SAMPLE random(0.5)",
    "ARGMAX NEURONS IN act TOKENS ALL GROUP BY class",
    "EXPLAIN AVG NEURONS IN fc1 TOKENS MEAN",
    # Calls of a module that runs several times (the fuzz model has none: these bind-fail).
    "AVG NEURONS IN act#2",
    "TOPK 3 NEURONS IN fc1#1 WHERE class = 1 USING SAMPLE random(0.5)",
    "DESCRIBE 'fc2'#2",
    "EVALUATE SAMPLERS random AT 0.5 K 2 LAYERS fc1, act#1 SEEDS 1",
    "TOPK 2 NEURONS IN fc1 WHERE .5 > confidence",  # invalid on purpose: the field comes first
]


def _sql_blocks(text: str) -> list[str]:
    return re.findall(r"```sql\n(.*?)```", text, flags=re.S)


def corpus() -> list[str]:
    """Valid statements (one per entry, no trailing ';'), with layer names rewritten so they
    exist in the fuzz model; the originals are kept too (they bind to unknown layers)."""
    scripts = list(HANDWRITTEN)
    for path, extract in ((ROOT / "README.md", _sql_blocks),
                          (ROOT / "examples" / "tour.dql", lambda t: [t])):
        if path.is_file():
            for block in extract(path.read_text(encoding="utf-8")):
                for piece in split_statements(block):
                    scripts.append(piece.text.strip())
    rename = {"conv1": "fc1", "conv2": "fc2", "fc3": "out"}
    out = []
    for stmt in scripts:
        out.append(stmt)
        renamed = re.sub(r"\b(conv1|conv2|fc3)\b", lambda m: rename[m.group()], stmt)
        if renamed != stmt:
            out.append(renamed)
    return list(dict.fromkeys(out))


# --- the connection -------------------------------------------------------------------------------


def make_connection():
    """A tiny MLP (8 -> 16 -> 12 -> 10) over 50 random items of 10 classes, no disk cache."""
    import torch
    from torch import nn

    import diagql

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(8, 16), act=nn.ReLU(), fc2=nn.Linear(16, 12),
                                      out=nn.Linear(12, 10)))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    X = torch.randn(50, 8, generator=gen)
    y = torch.randint(0, 10, (50,), generator=gen)
    return diagql.connect(model, (X, y), cache_dir=False, progress=False)


# --- mutations --------------------------------------------------------------------------------------

TOKEN = re.compile(r"""'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|--[^\n]*|[A-Za-z0-9_.+-]+|<=|>=|!=|<>|\S""")
# Every keyword of the grammar but PLOT, which writes a file wherever a mutation points it.
KEYWORDS = [text.upper() for text in keywords().values() if text != "plot"]
VOCAB = [*KEYWORDS, "(", ")", ",", ";", "=", "<", "<>", ">=", "!=", "'", '"',
         "--", "\\", "0", "-1", "1.5", ".5", "1e3", "1e999", "-0", "+7", "fc1", "fc2", "out", "act",
         "a.b", "'q'", '"層"', "random(0.5)", "gmm(j=2)", "seed", "latent", "format", "#", "#2",
         "act#0", "fc1#99999999999999999999"]
UNICODE = ["\u0301", "\u0308\u0301", "\u202e", "\u200f", "\u202b", "\U0001F600", "\U0001F468\u200d\U0001F469",
           "\x00", "\r", "\f", "\t", "\v", "\u200b", "\u200d", "\ufeff", "\u2028", "\u2029", "\x85",
           "\u00a0", "\u3000", "層", "ǅ", "ﬁ", "İ", "\ud800", "\uffff", "\x1b[31m", "\\", "\x7f",
           "\r\n", "\n\r", "１", "٣", "𝟗"]
NEWLINES = ["\n", "\r\n", "\r", "\n\n", "\n--c\n"]


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def join(rng: random.Random, toks: list[str]) -> str:
    out = []
    for i, tok in enumerate(toks):
        if i:
            out.append(" " if rng.random() < 0.85 else rng.choice(["\n", "\t", "  ", "\r\n", "\f"]))
        out.append(tok + ("\n" if tok.startswith("--") else ""))
    return "".join(out)


class Mutator:
    """Each method takes the RNG's next draws and returns one input; ``KINDS`` weights them."""

    def __init__(self, rng: random.Random, seeds: list[str]):
        self.rng = rng
        self.seeds = seeds

    def seed_text(self) -> str:
        rng = self.rng
        n = 1 if rng.random() < 0.6 else rng.randint(2, 4)
        stmts = [rng.choice(self.seeds) for _ in range(n)]
        return ";".join(s + (rng.choice(NEWLINES) if rng.random() < 0.3 else " ") for s in stmts) \
            + (";" if rng.random() < 0.5 else "")

    def _toks(self):
        toks = tokens(self.seed_text())
        return toks or ["SHOW"]

    def token_drop(self):
        toks = self._toks()
        for _ in range(self.rng.randint(1, 3)):
            if len(toks) > 1:
                del toks[self.rng.randrange(len(toks))]
        return join(self.rng, toks)

    def token_swap(self):
        toks = self._toks()
        for _ in range(self.rng.randint(1, 2)):
            i, j = self.rng.randrange(len(toks)), self.rng.randrange(len(toks))
            toks[i], toks[j] = toks[j], toks[i]
        return join(self.rng, toks)

    def token_dup(self):
        toks = self._toks()
        for _ in range(self.rng.randint(1, 3)):
            i = self.rng.randrange(len(toks))
            toks.insert(i, toks[i])
        return join(self.rng, toks)

    def token_insert(self):
        toks = self._toks()
        for _ in range(self.rng.randint(1, 3)):
            toks.insert(self.rng.randint(0, len(toks)), self.rng.choice(VOCAB))
        return join(self.rng, toks)

    def token_replace(self):
        toks = self._toks()
        toks[self.rng.randrange(len(toks))] = self.rng.choice(VOCAB)
        return join(self.rng, toks)

    def _chars(self, pool):
        text = self.seed_text()
        for _ in range(self.rng.randint(1, 4)):
            i = self.rng.randint(0, len(text))
            ch = pool()
            if self.rng.random() < 0.5:
                text = text[:i] + ch + text[i:]
            else:
                text = text[:i] + ch + text[i + 1:]
        return text

    def char_ascii(self):
        return self._chars(lambda: chr(self.rng.randint(0, 127)))

    def char_unicode(self):
        return self._chars(lambda: self.rng.choice(UNICODE) if self.rng.random() < 0.7
                           else chr(self.rng.randint(0x80, 0x10FFFF)))

    def char_delete(self):
        text = self.seed_text()
        for _ in range(self.rng.randint(1, 3)):
            if text:
                i = self.rng.randrange(len(text))
                text = text[:i] + text[i + self.rng.randint(1, 4):]
        return text

    def case_flip(self):
        return "".join(c.swapcase() if self.rng.random() < 0.3 else c for c in self.seed_text())

    def splice(self):
        a, b = self.seed_text(), self.seed_text()
        return a[:self.rng.randint(0, len(a))] + b[self.rng.randint(0, len(b)):]

    def huge_number(self):
        toks = self._toks()
        nums = [i for i, t in enumerate(toks) if re.fullmatch(r"[+-]?[\d.]+(e[+-]?\d+)?", t, re.I)]
        big = self.rng.choice(["99999999999999999999", "1" + "0" * 400, "1e999", "-1e999", "1e-999",
                               "4294967296", "-4294967297", "18446744073709551616", "0", "-0",
                               "0.0", "1e308", "2.5", "nan", "inf", "-5", str(10 ** 4000)])
        if nums and self.rng.random() < 0.8:
            toks[self.rng.choice(nums)] = big
        else:
            toks.insert(self.rng.randint(0, len(toks)), big)
        return join(self.rng, toks)

    def nesting(self):
        depth = self.rng.choice([50, 200, 1000, 3000, 10_000])
        form = self.rng.choice(["parens", "not", "and", "or", "mixed", "unbalanced"])
        head = self.rng.choice(["TOPK 3 NEURONS IN fc1", "AVG NEURONS IN fc2", "EXPLAIN ARGMAX NEURONS IN out"])
        atom = self.rng.choice(["class = 1", "correct", "confidence < 0.5", "class IN (1, 2)"])
        if form == "parens":
            pred = "(" * depth + atom + ")" * depth
        elif form == "unbalanced":
            pred = "(" * depth + atom + ")" * (depth - self.rng.randint(-2, 2))
        elif form == "not":
            pred = "NOT " * depth + atom
        elif form in ("and", "or"):
            pred = f" {form.upper()} ".join([atom] * depth)
        else:
            pred = "(NOT " * depth + atom + ")" * depth
        return f"{head} WHERE {pred}"

    def long_input(self):
        if self.rng.random() < 0.5:  # one statement of ~100k characters
            kind = self.rng.choice(["layer", "string", "comment", "space", "number", "args"])
            n = 100_000
            if kind == "layer":
                return "TOPK 3 NEURONS IN " + "a" * n
            if kind == "string":
                return "DESCRIBE '" + "x" * n + "'"
            if kind == "comment":
                return "--" + "c" * n + "\nSHOW LAYERS"
            if kind == "space":
                return self.rng.choice([" ", "\n", "\t", "\r\n"]) * n + "SHOW LAYERS" + " " * n
            if kind == "number":
                return "TOPK " + "9" * 4000 + " NEURONS IN fc1"  # CPython's int-str limit is 4300
            return "AVG NEURONS IN fc1 USING SAMPLE random(" + ", ".join(["x=1"] * 10_000) + ")"
        # many statements: cheap ones and errors, so that the run stays short
        stmt = self.rng.choice(["SHOW SETTINGS", "SET max_rows = 3", "DESCRIBE fc1", "TOPK 3 NEURONS",
                                "DESCRIBE nope", "@", ""])
        return ";\n".join([stmt] * 10_000)

    def junk(self):
        n = self.rng.randint(0, 80)
        if self.rng.random() < 0.5:
            return "".join(chr(self.rng.randint(32, 126)) for _ in range(n))
        return "".join(self.rng.choice(VOCAB + UNICODE + [" ", "\n"]) for _ in range(n // 4))

    def valid(self):
        return self.seed_text()

    KINDS = {"token_drop": 10, "token_swap": 10, "token_dup": 8, "token_insert": 10,
             "token_replace": 10, "char_ascii": 10, "char_unicode": 10, "char_delete": 6,
             "case_flip": 3, "splice": 8, "huge_number": 6, "junk": 6, "valid": 3,
             "nesting": 0.6, "long_input": 0.2}

    def draw(self) -> tuple[str, str]:
        kinds = list(self.KINDS)
        kind = self.rng.choices(kinds, weights=[self.KINDS[k] for k in kinds])[0]
        return kind, getattr(self, kind)()


# --- the invariant ------------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm when one input runs longer than the hang limit."""


@dataclass
class Failure:
    key: str  # deduplication: exception type + location (or the violated check)
    text: str
    detail: str
    kind: str = ""


def _where(exc: BaseException) -> str:
    """The innermost frame inside diagql/ (else the innermost frame), as file:line."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/diagql/" in f.filename.replace("\\", "/")]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"


def check_error(err, text: str, stage: str) -> list[Failure]:
    """Line and column inside the text, and format() works."""
    out = []
    lines = re.split(r"\r\n?|\n", text)  # a lone carriage return ends a line too
    name = type(err).__name__
    if err.line is not None:
        if not 1 <= err.line <= len(lines):
            out.append(Failure(f"{stage}: {name} line outside the text", text,
                               f"line {err.line} of {len(lines)}: {err.message}"))
        elif err.column is not None and not 1 <= err.column <= len(lines[err.line - 1]) + 1:
            out.append(Failure(f"{stage}: {name} column outside its line", text,
                               f"{err.line}:{err.column}, line has {len(lines[err.line - 1])} "
                               f"chars: {err.message}"))
    elif err.column is not None:
        out.append(Failure(f"{stage}: {name} column without a line", text, err.message))
    try:
        formatted = err.format("f.dql")
        str(err)
        assert isinstance(formatted, str) and formatted.startswith("f.dql")
    except Exception as exc:  # noqa: BLE001 - any failure here is a finding
        out.append(Failure(f"{stage}: format() raised {type(exc).__name__} at {_where(exc)}", text,
                           traceback.format_exc(limit=-4)))
    return out


def check_input(conn, text: str, *, hang_s: float = 20.0) -> tuple[list[Failure], float]:
    """Run one input through parse_script and run_script; the failures and the seconds taken."""
    from diagql.errors import DiagQLError, ParseError
    from diagql.language.parser import parse_script
    from diagql.results.result import Result

    failures: list[Failure] = []
    first_parse_error = None

    def on_alarm(signum, frame):
        raise Hang()

    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, hang_s)
    started = time.perf_counter()
    stage = "parse_script"
    try:
        try:
            parse_script(text)
        except DiagQLError as err:
            first_parse_error = err
            if not isinstance(err, ParseError):
                failures.append(Failure(f"parse_script raised {type(err).__name__}", text, str(err)))
            failures += check_error(err, text, stage)
        except Exception as exc:  # noqa: BLE001 - the finding; run_script is still tried
            failures.append(Failure(f"{stage}: {type(exc).__name__} at {_where(exc)}", text,
                                    "".join(traceback.format_exception(exc, limit=-6))))
            first_parse_error = False  # unknown: skip the agreement check
        stage = "run_script"
        seen_parse_error = None
        for outcome in conn.run_script(text):
            if isinstance(outcome, DiagQLError):
                failures += check_error(outcome, text, stage)
                if isinstance(outcome, ParseError) and seen_parse_error is None:
                    seen_parse_error = outcome
            elif not isinstance(outcome, Result):
                failures.append(Failure(f"run_script yielded {type(outcome).__name__}", text,
                                        repr(outcome)[:200]))
            else:
                outcome.to_dict()
        a = first_parse_error and (first_parse_error.line, first_parse_error.column)
        b = seen_parse_error and (seen_parse_error.line, seen_parse_error.column)
        if first_parse_error is not False and a != b:
            failures.append(Failure("parse_script and run_script disagree on the first syntax "
                                    "error", text, f"parse_script {a}, run_script {b}"))
    except Hang:
        failures.append(Failure(f"{stage}: hang over {hang_s:.0f} s", text, ""))
    except DiagQLError as err:  # parse_script's is caught above: this one escaped run_script
        failures.append(Failure(f"{stage}: {type(err).__name__} escaped at {_where(err)}", text,
                                str(err)))
    except Exception as exc:  # noqa: BLE001 - the finding
        failures.append(Failure(f"{stage}: {type(exc).__name__} at {_where(exc)}", text,
                                "".join(traceback.format_exception(exc, limit=-6))))
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return failures, time.perf_counter() - started


def reset_if_changed(conn):
    """SET changes the session (seed, latent, batch size): start each input from the defaults."""
    from diagql.session.settings import Settings

    if conn.settings != Settings():
        return make_connection()
    return conn


# --- the campaign -----------------------------------------------------------------------------------


@dataclass
class Report:
    count: int = 0
    seconds: float = 0.0
    per_kind: collections.Counter = field(default_factory=collections.Counter)
    per_kind_seconds: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    failures: dict = field(default_factory=dict)  # key -> (count, shortest Failure)
    slow: list = field(default_factory=list)  # (seconds, kind, text prefix)


def campaign(count: int, seed: int, *, slow_s: float = 1.0, hang_s: float = 20.0,
             progress: bool = False) -> Report:
    rng = random.Random(seed)
    mutator = Mutator(rng, corpus())
    conn = make_connection()
    report = Report()
    started = time.perf_counter()
    for i in range(count):
        kind, text = mutator.draw()
        failures, seconds = check_input(conn, text, hang_s=hang_s)
        conn = reset_if_changed(conn)
        report.count += 1
        report.per_kind[kind] += 1
        report.per_kind_seconds[kind] += seconds
        report.outcomes["failed" if failures else "ok"] += 1
        if seconds > slow_s:
            report.slow.append((seconds, kind, text[:80]))
        for failure in failures:
            failure.kind = kind
            n, best = report.failures.get(failure.key, (0, failure))
            if len(failure.text) < len(best.text):
                best = failure
            report.failures[failure.key] = (n + 1, best)
        if progress and (i + 1) % 1000 == 0:
            rate = (i + 1) / (time.perf_counter() - started)
            print(f"  {i + 1:,} inputs, {rate:.0f}/s, {len(report.failures)} distinct failures",
                  file=sys.stderr, flush=True)
    report.seconds = time.perf_counter() - started
    return report
