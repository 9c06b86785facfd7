"""The REPL's completer and highlighter, driven with Documents as pgcli's tests do."""
from __future__ import annotations

import pytest
import torch
from prompt_toolkit.document import Document
from torch import nn

import diagql
from diagql.shell.completion import DiagQLCompleter, accepts, connection_layers, keywords


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.conv2 = nn.Conv2d(2, 3, 3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


@pytest.fixture(scope="module")
def completer():
    torch.manual_seed(0)
    conn = diagql.connect(Net().eval(), (torch.rand(20, 1, 8, 8), torch.arange(20) % 10),
                          cache_dir=False, progress=False)
    return DiagQLCompleter(connection_layers(conn), {".help": "help", ".mode": "format"},
                           {".mode": ("table", "json", "csv")})


def complete(completer, text, cursor=None):
    document = Document(text, len(text) if cursor is None else cursor)
    return [c.text for c in completer.get_completions(document, None)]


def test_keywords_come_from_the_grammar():
    assert keywords()["TOPK"] == "topk" and keywords()["GROUP"] == "group"
    assert "LAYER_NAME" not in keywords() and "INT" not in keywords()
    assert accepts("TOPK 3 NEURONS IN ") == {"LAYER_NAME", "STRING"}
    assert accepts("TOPK 3 ) ") is None


def test_statement_keywords_at_the_start(completer):
    assert set(complete(completer, "")) == {"ARGMAX", "AVG", "BOTTOMK", "CLEAR", "DESCRIBE",
                                            "EVALUATE", "EXPLAIN", "SET", "SHOW", "SIMILARITY",
                                            "TOPK"}
    assert complete(completer, "to") == ["topk"]
    assert complete(completer, "SHOW LAYERS; DESC") == ["DESCRIBE"]


def test_layer_after_in(completer):
    assert complete(completer, "TOPK 3 NEURONS IN c") == ["conv1", "conv2"]
    assert "head.1" in complete(completer, "TOPK 3 NEURONS IN ")
    assert complete(completer, "DESCRIBE head.") == ["head.0", "head.1"]


def test_clauses_after_a_complete_query(completer):
    offered = complete(completer, "TOPK 3 NEURONS IN conv2 ")
    assert {"WHERE", "USING", "GROUP", "WITH", "BY"} <= set(offered)
    assert "TOPK" not in offered and "conv2" not in offered
    assert complete(completer, "TOPK 3 NEURONS IN conv2 wh") == ["where"]


def test_where_fields_and_group_by_keys(completer):
    assert set(complete(completer, "AVG NEURONS IN conv2 WHERE ")) >= {"CLASS", "CORRECT", "NOT"}
    assert set(complete(completer, "AVG NEURONS IN conv2 GROUP BY ")) == {"CLASS", "CORRECT",
                                                                         "PREDICTED"}


def test_samplers_are_offered_with_show_samplers_descriptions(completer):
    """The menu had shown each class's raw docstring line, markup included, and nothing for
    four samplers (sweep S36)."""
    from diagql import samplers

    document = Document("TOPK 3 NEURONS IN conv2 USING SAMPLE ")
    offered = {c.text: c.display_meta_text for c in completer.get_completions(document, None)}
    assert offered == {name: cls.description for name, cls in samplers.REGISTRY.items()}
    assert all(offered.values())


def test_a_wrapped_line_is_padded_and_a_new_line_of_the_statement_marked():
    """A long line the terminal wraps had been drawn with "...>", as if Enter had been
    pressed inside a word (sweep S36)."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from diagql.shell.repl import CONTINUATION, make_session

    with create_pipe_input() as pipe:
        session = make_session(None, input=pipe, output=DummyOutput())
        continuation = session.prompt_continuation
        assert continuation(80, 1, 0) == CONTINUATION
        assert continuation(80, 0, 1) == " " * len(CONTINUATION)


def test_samplers_and_their_parameters(completer):
    assert complete(completer, "TOPK 3 NEURONS IN conv2 USING SAMPLE s") == ["stratified"]
    assert "maxmargin" in complete(completer, "TOPK 3 NEURONS IN conv2 USING SAMPLE ")
    offered = complete(completer, "TOPK 3 NEURONS IN conv2 USING SAMPLE maxmargin(0.05, ")
    assert "j=" in offered and "size=" not in offered
    assert complete(completer, "AVG NEURONS IN conv2 USING SAMPLE maxmargin(j=0.5, me") == ["method="]


def test_set_names_and_values(completer):
    assert {"seed", "format", "max_rows"} <= set(complete(completer, "SET "))
    assert complete(completer, "SET format = j") == ["json"]


def test_completion_in_the_middle_of_the_text(completer):
    text = "TOPK 3 NEURONS IN c WHERE correct"
    assert complete(completer, text, cursor=len("TOPK 3 NEURONS IN c")) == ["conv1", "conv2"]


def test_dot_commands(completer):
    assert complete(completer, ".h") == [".help"]
    assert complete(completer, ".mode j") == ["json"]


def test_nothing_after_a_syntax_error(completer):
    assert complete(completer, "TOPK TOPK ") == []


def test_highlighting_classes_come_from_the_grammar():
    from diagql.shell.highlight import tokens

    text = "topk 3 NEURONS IN conv2 WHERE class = 3 -- note\nUSING SAMPLE maxmargin(j='x'); 'oops"
    pieces = list(tokens(text))
    assert "".join(t for _, t in pieces) == text
    classes = {t: c for c, t in pieces}
    assert classes["topk"] == classes["WHERE"] == classes["SAMPLE"] == "keyword"
    assert classes["3"] == "number" and classes["conv2"] == "name"
    assert classes["-- note"] == "comment" and classes["'x'"] == "string"
    assert classes["="] == "operator" and classes[";"] == "" and classes["'"] == "error"
    assert classes["oops"] == "name"  # lexing goes on after the bad character


def test_lexer_splits_lines():
    from diagql.shell.highlight import DiagQLLexer

    get_line = DiagQLLexer().lex_document(Document("SHOW\n  LAYERS;"))
    assert get_line(0) == [("class:keyword", "SHOW")]
    assert get_line(1) == [("", "  "), ("class:keyword", "LAYERS"), ("", ";")]


def test_a_session_through_pipe_input(tmp_path, monkeypatch):
    """The whole REPL in-process: a statement over three lines (run at its ';'), dot commands,
    an error, then Ctrl-D."""
    import io

    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from diagql.shell.repl import make_session, run_repl
    from tests.models import digits, trained_mlp

    monkeypatch.setenv("DIAGQL_HISTORY_FILE", str(tmp_path / "history"))
    conn = diagql.connect(trained_mlp(), digits(), cache_dir=False, progress=False)
    out, err = io.StringIO(), io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text("TOPK 2 NEURONS IN head WHERE\r  class = 3\r;\r"
                       "TOPK 2 NEURONS IN haed;\r.mode csv\r.timer on\r"
                       "TOPK 1 NEURONS IN head;\r.layers\r\x04")
        session = make_session(conn, input=pipe, output=DummyOutput())
        status = run_repl(conn, Console(file=out, width=120), Console(file=err, width=120),
                          session)
    assert status == 0
    printed = out.getvalue()
    assert "head[" in printed and "matching items" in printed
    assert "TOPK" not in printed  # the prompt showed the statement: its result does not repeat it
    assert "did you mean 'head'" in err.getvalue() and "Goodbye!" in err.getvalue()
    assert "neuron,label,value" in printed and "Time: " in printed
    assert "encoder.1" in printed
    # one history entry for the whole multi-line statement
    assert "+TOPK 2 NEURONS IN head WHERE\n+  class = 3\n+;" in (tmp_path / "history").read_text()


def test_help_examples_parse():
    from diagql.language.parser import parse
    from diagql.shell.dot_commands import language_help

    text = language_help()
    assert "SHOW CACHE | LAYERS | MODELS | PROFILE | SAMPLERS | SETTINGS" in text and "maxmargin(" in text
    # every statement kind and clause of the grammar is there (UNTIL, WITHIN, INPUTS were not)
    for word in ("UNTIL", "WITHIN", "INPUTS FOR", "BOTTOMK", "EXPLAIN", "SIMILARITY", "EVALUATE",
                 "CLEAR CACHE", "ACROSS CHECKPOINTS", "WITH BASELINE", "GROUP BY", "TOKENS"):
        assert word in text, word
    for line in text.splitlines():
        if line.startswith("  ") and line.rstrip().endswith(";"):
            parse(line.strip())


@pytest.mark.parametrize("text,offered", [
    ("AVG NEURONS IN conv1 UNTIL ", ["cosine", "width"]),
    ("TOPK 2 NEURONS IN conv1 USING AUTO UNTIL ", ["precision"]),
    ("EXPLAIN ARGMAX NEURONS IN conv1 WHERE correct UNTIL ", ["js"]),
    ("SET estimator = ", ["assisted", "plain"]),
    ("SET latent = co", ["conv1", "conv2"]),
    ("SET latent = d", ["default"]),
])
def test_until_targets_and_set_values(completer, text, offered):
    """UNTIL offered nothing, though each aggregate takes its own targets; SET estimator and
    SET latent offered nothing either."""
    assert complete(completer, text) == offered


@pytest.mark.parametrize("text,absent", [
    ("TOPK 3 INPUTS FOR conv1[0,1,1] ", {"UNTIL", "WITHIN"}),
    ("SIMILARITY conv1, conv2 ", {"UNTIL", "WITHIN"}),
    ("SIMILARITY conv1, conv2 USING ", {"AUTO"}),
])
def test_no_clause_offered_that_the_statement_refuses(completer, text, absent):
    got = set(complete(completer, text))
    assert got and not got & absent
    assert {"UNTIL", "WITHIN"} <= set(complete(completer, "TOPK 3 NEURONS IN conv1 "))


def test_dot_read_takes_a_byte_order_mark_and_refuses_what_is_not_utf8(tmp_path):
    """A Latin-1 file was a UnicodeDecodeError inside the REPL; a BOM stays out of the text."""
    from diagql.shell.dot_commands import run_meta

    class Shell:
        def __init__(self):
            self.errors, self.ran = [], []

        def error(self, text):
            self.errors.append(text)

        def execute(self, text, echo=False, name=None):
            self.ran.append(text)

    marked, latin = tmp_path / "marked.dql", tmp_path / "latin.dql"
    marked.write_bytes("SHOW SETTINGS;".encode("utf-8-sig"))
    latin.write_bytes("SHOW SETTINGS; -- café".encode("latin-1"))
    shell = Shell()
    run_meta(shell, f".read {marked}")
    run_meta(shell, f".read {latin}")
    assert shell.ran == ["SHOW SETTINGS;"]
    assert shell.errors == [f"cannot read {latin}: not UTF-8 text (byte 0xe9 at offset 21)"]


def test_dot_read_names_the_file_in_its_errors(tmp_path):
    """As the command line does (file:line:col); .read had dropped the file's name."""
    import io

    from rich.console import Console

    import diagql
    from diagql.shell.dot_commands import run_meta
    from diagql.shell.repl import Shell

    script = tmp_path / "bad.dql"
    script.write_text("SET seed = 3;\nTOPK x NEURONS IN conv1;\n")
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(diagql.Connection.detached(cache_dir=False), Console(file=out, width=120),
                  Console(file=err, width=120))
    run_meta(shell, f".read {script}")
    assert err.getvalue().startswith(f"{script}:2:6: syntax error:"), err.getvalue()


def test_a_dot_command_of_no_argument_refuses_one():
    """`.layers extra` had ignored its argument."""
    from diagql.shell.dot_commands import run_meta

    class Shell:
        def __init__(self):
            self.errors = []

        def error(self, text):
            self.errors.append(text)

    shell = Shell()
    assert run_meta(shell, ".quit now") is False  # not left on a mistyped line
    run_meta(shell, ".layers extra")
    assert shell.errors == [".quit takes no argument, not 'now'",
                            ".layers takes no argument, not 'extra'"]


def test_class_names_complete_where_a_class_goes():
    names = ["cat", "dog", "cow"]
    completer = DiagQLCompleter(classes=lambda: names)
    assert complete(completer, "AVG NEURONS IN fc1 WHERE class = ") == ["'cat'", "'dog'", "'cow'"]
    assert complete(completer, "AVG NEURONS IN fc1 WHERE class = c") == ["'cat'", "'cow'"]
    assert complete(completer, "AVG NEURONS IN fc1 WHERE predicted != 'd") == ["dog'"]
    assert complete(completer, "AVG NEURONS IN fc1 WHERE class IN ('cat', co") == ["'cow'"]
    assert "'cat'" not in complete(completer, "AVG NEURONS IN fc1 WHERE confidence < ")
    assert complete(DiagQLCompleter(), "AVG NEURONS IN fc1 WHERE class = 'c") == []
