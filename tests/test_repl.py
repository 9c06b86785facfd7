"""The prompt, driven through a real pseudo-terminal as a person would use it."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


MLP = ["--model", "tests.models:trained_mlp", "--data", "tests.models:digits"]


def spawn(history: Path, args=MLP):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1",
           "DIAGQL_HISTORY_FILE": str(history)}
    child = pexpect.spawn(sys.executable, ["-m", "diagql", *args], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=60, dimensions=(50, 160))
    child.expect("diagql>")
    return child


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One prompt on the MLP for the checks that leave it at a fresh prompt in table mode: each
    spawn costs a Python, torch and the model (1-3 s on 2 cores)."""
    child = spawn(tmp_path_factory.mktemp("repl") / "history")
    yield child
    child.close(force=True)


@pytest.fixture
def repl(session):
    assert session.isalive(), "an earlier test ended the shared session"
    yield session


@pytest.fixture
def own_repl(tmp_path):
    """A prompt of the test's own, for a test that ends it."""
    child = spawn(tmp_path / "history")
    yield child
    child.close(force=True)


def _output(child) -> str:
    return ANSI.sub("", child.before)


def test_multi_line_statement_runs_at_the_semicolon(repl):
    repl.sendline("TOPK 2 NEURONS IN head WHERE")
    repl.expect(r"\.\.\.>")
    repl.sendline("  class = 3 AND correct;")
    repl.expect("matching items")
    assert "head[" in _output(repl)
    repl.expect("diagql>")


def test_an_error_is_shown_and_the_session_goes_on(repl):
    repl.sendline("TOPK 2 NEURONS IN haed;")
    repl.expect("did you mean 'head'")
    repl.expect("diagql>")
    repl.sendline("TOPK 2 NEURONS IN head;")
    repl.expect("matching items")
    repl.expect("diagql>")
    # .quit ending the session with status 0: test_history_survives_a_restart.


def test_an_internal_error_ends_the_statement_not_the_session():
    """A bug (an exception that is no DiagQLError) is shown as an internal error and the
    prompt goes on to the next statement, where it had ended the session and what it held."""
    import io

    from rich.console import Console

    from diagql.shell.repl import Shell

    class Connection:
        def __init__(self):
            self.statements = []

        def run_script(self, text):
            self.statements.append(text)
            if len(self.statements) == 1:
                raise RuntimeError("a bug")
            yield from ()

    conn, out, err = Connection(), io.StringIO(), io.StringIO()
    shell = Shell(conn, Console(file=out), Console(file=err))
    assert shell.handle("AVG NEURONS IN fc1;") is False
    assert "internal error: RuntimeError: a bug (run with --debug" in err.getvalue()
    assert shell.handle("AVG NEURONS IN fc1;") is False and len(conn.statements) == 2


def test_output_cut_by_ctrl_c_is_not_written_again_under_the_next_answer():
    """Ctrl-C while a long CSV was being written to the terminal had left rich's buffer full,
    and the next statement printed all 4,704 rows of the cancelled one above its own 10."""
    import io

    from rich.console import Console

    import diagql
    from diagql.shell.repl import Shell
    from tests.models import digits, trained_mlp

    class Terminal(io.StringIO):
        """A terminal the user interrupts during the first long write."""

        def __init__(self):
            super().__init__()
            self.armed = True

        def write(self, text):
            if self.armed and text.count("\n") > 50:
                self.armed = False
                raise KeyboardInterrupt
            return super().write(text)

    conn = diagql.connect(trained_mlp(), digits(), cache_dir=False, progress=False)
    out, err = Terminal(), io.StringIO()
    shell = Shell(conn, Console(file=out, width=100), Console(file=err))
    shell.handle(".mode csv")
    assert shell.handle("AVG NEURONS IN encoder.0;") is False  # 64 rows
    assert "cancelled" in err.getvalue()
    shell.handle("AVG NEURONS IN head WHERE class = 1;")
    rows = [line for line in out.getvalue().splitlines() if line[:1].isdigit()]
    assert [line.split(",")[1] for line in rows] == [f"head[{i}]" for i in range(10)]


def test_the_readme_example_runs_as_typed_there(tmp_path):
    pytest.importorskip("mlxtend", reason="the README's example runs on the demo")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^```text\n(diagql> .*?)^```", readme, flags=re.S | re.M).group(1)
    lines = [re.sub(r"^(diagql|   \.\.\.)> ", "", line) for line in block.splitlines()]
    assert len(lines) == 2 and not lines[0].endswith(";")  # a complete query, then its WHERE
    child = spawn(tmp_path / "history", ["--demo"])
    try:
        child.sendline(lines[0])
        child.expect(r"\.\.\.>")  # complete, but it waits for its ';'
        child.sendline(lines[1])
        child.expect("matching items", timeout=120)
        shown = _output(child)
        assert "conv2[" in shown and "syntax error" not in shown
        child.expect("diagql>")
    finally:
        child.close(force=True)


@pytest.mark.parametrize("text, more", [
    ("TOPK 3 NEURONS IN conv2", True),  # complete, but a WHERE may follow
    ("TOPK 3 NEURONS IN conv2\n  WHERE class = 9 AND incorrect", True),
    ("TOPK 3 NEURONS IN conv2\n  WHERE class = 9 AND incorrect;", False),
    ("TOPK 3 NEURONS IN conv2 WHERE class =", True),  # cut off
    ("TOPK 3 NEURONS IN conv2 -- a comment", True),
    ("SHOW LAYERS; TOPK 3 NEURONS IN conv2", True),  # the last statement decides
    ("TOPK 3 NEURONS IN conv2; SHOW LAYERS", False),
    ("SHOW", True),
    ("EVALUATE SAMPLERS", True),
    ("SHOW LAYERS", False),  # nothing may follow these
    ("DESCRIBE conv2", False),
    ("SET seed = 1", False),
    ("clear cache -- now", False),
    ("TOPK 3 NEURONS IN conv2 WHER", False),  # no later line can mend these: shown at once
    ("TOPK 3 NEURONS IN conv2 @", False),
    ("DESCRIBE 'unterminated", False),
    (".mode csv", False),
    ("   ", False),
])
def test_enter_runs_at_the_semicolon(text, more):
    from diagql.shell.repl import wants_more

    assert wants_more(text) is more


@pytest.mark.parametrize("text,more", [
    ("TOPK 3 NEURONS IN conv9", False),  # no line can make conv9 a layer: shown at once
    ("TOPK 3 NEURONS IN conv2", True),
    ("TOPK 3 NEURONS IN block.relu#2", True),
    ("TOPK 3 NEURONS IN block.relu#3", False),
    ("SIMILARITY conv2, fc9", False),
    ("TOPK 3 INPUTS FOR conv2[1,2,3]", True),
    ("EVALUATE SAMPLERS random LAYERS conv2, fcx", False),
])
def test_enter_runs_a_statement_naming_an_unknown_layer(text, more):
    """`TOPK 3 NEURONS IN conv9` + Enter had waited; the next line (SET seed = 1) then read as
    its continuation, and only "end the one before it with ';'" was shown. Layers not yet
    known (the connection loading) decide nothing."""
    from diagql.shell.repl import wants_more

    assert wants_more(text, lambda: {"conv2", "fc2", "block.relu#2"}) is more
    assert wants_more(text, lambda: None) is True


def test_the_banner_says_what_is_connected_in_words(tmp_path):
    """It showed a Python repr: 'DiagQL — <diagql.Connection to ... (loading)>'."""
    child = spawn(tmp_path / "history")
    try:
        banner = child.before
        assert "DiagQL — " in banner and "<diagql" not in banner
        assert "tests.models:trained_mlp" in banner or "items on cpu" in banner
    finally:
        child.close(force=True)


def test_ctrl_d_leaves(own_repl):
    own_repl.sendcontrol("d")
    own_repl.expect(pexpect.EOF)
    own_repl.close()
    assert own_repl.exitstatus == 0


def test_tab_completes_a_layer_name(repl):
    repl.send("TOPK 2 NEURONS IN he\t")
    repl.expect("ad", timeout=30)  # the screen is redrawn incrementally: only the new letters
    repl.send(";\r")
    repl.expect("matching items")
    assert "head[" in _output(repl)
    repl.expect("diagql>")


def test_history_survives_a_restart(tmp_path):
    history = tmp_path / "state" / "history"
    # No model: history is the prompt's own, and each session skips loading one (2-3 s).
    first = spawn(history, [])
    first.sendline("SHOW SETTINGS;")
    first.expect("max_rows")
    first.expect("diagql>")
    first.sendline(".quit")
    first.expect(pexpect.EOF)
    first.close()
    assert first.exitstatus == 0
    assert "SHOW SETTINGS;" in history.read_text()
    second = spawn(history, [])
    try:
        second.send("\x1b[A")  # up: .quit, then the previous session's statement
        second.expect("quit", timeout=30)
        second.send("\x1b[A")
        second.expect("SETTINGS", timeout=30)  # highlighted: SHOW and SETTINGS styled apart
        second.send("\r")
        second.expect("max_rows")
        second.expect("diagql>")
    finally:
        second.close(force=True)


def test_ctrl_r_then_enter_takes_the_history_match(tmp_path):
    # No model: the prompt's own history (SHOW SETTINGS needs none).
    child = spawn(tmp_path / "history", [])
    try:
        child.sendline("SHOW SAMPLERS;")
        child.expect("maxmargin")
        child.expect("diagql>")
        child.sendline("SHOW SETTINGS;")
        child.expect("max_rows")
        child.expect("diagql>")
        child.send("\x12")  # Ctrl-R: search the history backwards
        child.send("SAMPL")
        child.expect("SAMPL", timeout=30)
        child.send("\r")  # take the match into the line (Enter had emptied the search)
        child.send("\r")  # and run it
        child.expect("maxmargin", timeout=30)
        child.expect("diagql>")
    finally:
        child.close(force=True)


def test_dot_commands(repl):
    repl.sendline(".mode csv")
    repl.expect("diagql>")
    repl.sendline(".timer on")
    repl.expect("diagql>")
    repl.sendline("TOPK 1 NEURONS IN head WHERE class = 3;")
    repl.expect(r"Time: \d+\.\d{3}s")
    assert "neuron,label,value" in _output(repl)
    repl.expect("diagql>")
    repl.sendline(".nope")
    repl.expect("unknown command")
    repl.expect("diagql>")
    repl.sendline(".exit now")  # named as typed, not as its alias .quit (sweep S36)
    repl.expect(r"\.exit takes no argument, not 'now'")
    repl.expect("diagql>")
    repl.sendline(".help")
    repl.expect("Samplers:")
    repl.expect("diagql>")
    for command in (".mode table", ".timer off"):  # as the shared session's next test expects
        repl.sendline(command)
        repl.expect("diagql>")


def test_ctrl_c_cancels_a_long_query_and_the_next_answer_is_right(tmp_path):
    import diagql
    from diagql.results.render import to_csv
    from tests.models import digits, trained_mlp

    query = "AVG NEURONS IN head WHERE class = 3 USING FULL;"
    expected = to_csv(diagql.connect(trained_mlp(), digits(), cache_dir=False).query(query))
    child = spawn(tmp_path / "history", ["--model", "tests.slow_model:slow_mlp", "--data",
                                         "tests.models:digits", "--batch-size", "8", "--no-cache"])
    try:
        child.sendline(".mode csv")
        child.expect("diagql>")
        child.sendline(query)
        child.expect("items/s", timeout=60)  # the progress bar of a long pass
        child.sendcontrol("c")
        child.expect("cancelled", timeout=30)
        child.expect("diagql>")
        child.sendline("SET batch_size = 2000;")
        child.expect("diagql>")
        child.sendline(query)
        child.expect("neuron,label,value", timeout=60)
        child.expect("diagql>", timeout=60)
        lines = ["neuron,label,value"] + [line.strip() for line in _output(child).splitlines()]
        for row in expected.strip().splitlines():
            assert row in lines
    finally:
        child.close(force=True)


def test_a_model_that_fails_to_load_is_reported_when_it_fails(tmp_path):
    # The prompt comes before the model loads (diagql.shell.pending); a failed load says why
    # and ends the session with status 1 as soon as it fails, not at the statement typed next
    # (which it lost), never with a traceback.
    child = spawn(tmp_path / "history", ["--model", "tests.models:nothing_here", "--data",
                                         "tests.models:digits"])
    child.expect(pexpect.EOF)  # nothing typed
    child.close()
    text = ANSI.sub("", child.before)
    assert "has no attribute 'nothing_here'" in text and "Traceback" not in text
    assert child.exitstatus == 1


def test_a_history_file_that_cannot_be_used_is_one_note_and_the_prompt_works(tmp_path):
    # A directory of that name (or a read-only file) made prompt_toolkit print a traceback and
    # "Press ENTER to continue..." at start or at every Enter, eating the user's statements.
    history = tmp_path / "history"
    history.mkdir()
    child = spawn(history)
    try:
        assert "history kept for this session only" in ANSI.sub("", child.before)
        child.sendline("SHOW LAYERS;")
        child.expect("encoder")
        child.expect("diagql>")
        assert "Traceback" not in child.before and "Press ENTER" not in child.before
    finally:
        child.close(force=True)


def test_history_kept_in_memory_when_the_file_fails_later(tmp_path, monkeypatch):
    from prompt_toolkit.history import FileHistory

    from diagql.shell.repl import _history

    monkeypatch.setenv("DIAGQL_HISTORY_FILE", str(tmp_path / "history"))
    notes = []
    kept = _history(notes.append)

    def refuse(self, string):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(FileHistory, "store_string", refuse)
    kept.append_string("SHOW LAYERS;")
    kept.append_string("SHOW MODELS;")
    assert list(kept.get_strings()) == ["SHOW LAYERS;", "SHOW MODELS;"]  # kept in memory
    assert notes == [f"history kept for this session only: {tmp_path / 'history'}: "
                     f"Permission denied"]
