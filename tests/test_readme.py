"""Everything README.md shows runs as written, and the demo's shown table is what it prints.

A `diagql ...` command runs in-process (tests/cli_in_process.py), as do the SQL and Python
blocks and the examples: a new Python each cost 3-12 s of importing torch and loading the demo.
A command with a shell pipe runs in a real shell, through the installed `diagql` script.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_in_process import diagql

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)
# Box-drawing lines are the deterministic part of a shown output (captions carry timings).
TABLE_LINE = re.compile(r"^[┏┃┡│└]")

pytest.importorskip("mlxtend", reason="the README runs the demo, which needs mlxtend")


def _env() -> dict:
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}


def _console_commands() -> list[tuple[str, list[str]]]:
    """(command, shown output lines) for every `$ ` line of the console blocks."""
    commands = []
    for lang, body in BLOCKS:
        if lang != "console":
            continue
        for chunk in re.split(r"^\$ ", body, flags=re.M)[1:]:
            command, *output = chunk.rstrip("\n").split("\n")
            commands.append((command, output))
    return commands


def _runnable(command: str) -> str | None:
    """The part of a command the test runs: installs are CI's job, and pytest is this run."""
    if "pytest" in command:
        return None
    return command.split("&& ", 1)[1] if command.startswith("pip install") else command


CONSOLE = [(c, out) for c, out in _console_commands() if _runnable(c)]


def test_readme_has_the_two_setup_commands():
    commands = [c for c, _ in _console_commands()]
    assert any(c.startswith('pip install ".[demo]" && diagql --demo -e') for c in commands)
    assert 'pip install -e ".[test]" && python -m pytest' in commands


def _run_command(command: str) -> subprocess.CompletedProcess:
    """A plain `diagql ARGS` in-process; anything else (a pipe) in a shell."""
    argv = shlex.split(command)
    if argv[0] == "diagql" and not set("|&;<>") & set(command):
        return diagql(*argv[1:])
    return subprocess.run(command, shell=True, text=True, capture_output=True, cwd=ROOT,
                          env=_env(), timeout=300, check=False)


def test_a_console_command_still_runs_the_installed_script_in_a_shell():
    """The README pipes into `diagql`: that command is the one run by a real shell."""
    assert any("| diagql " in _runnable(c) for c, _ in CONSOLE)


@contextlib.contextmanager
def _in_process():
    """Run Python as a script would: in the repository, output captured, the global random
    state left as it was for the tests that follow."""
    out = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(io.StringIO()), torch.random.fork_rng(devices=[]):
        yield out


@pytest.mark.parametrize("command, shown", CONSOLE, ids=[c[:60] for c, _ in CONSOLE])
def test_console_command_runs_and_prints_what_is_shown(command, shown):
    done = _run_command(_runnable(command))
    assert done.returncode == 0, done.stderr
    printed = [line.rstrip() for line in done.stdout.splitlines()]
    for line in shown:
        if TABLE_LINE.match(line):
            assert line.rstrip() in printed, f"README shows a line the command did not print:\n{line}"


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_python_block_runs(index):
    with _in_process():
        code = compile(BLOCKS[index][1], f"README.md block {index}", "exec")
        exec(code, {"__name__": "__main__"})  # noqa: S102 - running the README is the test


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "sql"])
def test_sql_block_runs_on_the_demo(index):
    done = diagql("--demo", stdin=BLOCKS[index][1])
    assert done.returncode == 0, done.stderr


def test_the_tour_shown_is_the_tour_file():
    """The README's tour block had drifted from examples/tour.dql (statements in one only)."""
    from diagql.language.parser import split_statements

    shown = README.split("A tour, runnable as `diagql --demo examples/tour.dql`:", 1)[1]
    block = re.search(r"```sql\n(.*?)```", shown, flags=re.S).group(1)
    tour = (ROOT / "examples" / "tour.dql").read_text(encoding="utf-8")

    def statements(text):
        lines = [line.split("--")[0] for line in text.splitlines()]
        return [" ".join(piece.text.split()) for piece in split_statements("\n".join(lines))]

    assert statements(block) == statements(tour)


def test_examples_run():
    # examples/tour.dql runs as the README's `diagql --demo examples/tour.dql` (above).
    assert any(_runnable(c) == "diagql --demo examples/tour.dql" for c, _ in CONSOLE)
    with _in_process():
        runpy.run_path(str(ROOT / "examples" / "python_api.py"), run_name="__main__")


def test_the_text_classifier_example_runs():
    """examples/text_classifier.py trains a tiny BERT and must find what it shows: the mistakes
    are sentences with a negation."""
    pytest.importorskip("transformers")
    # On one intra-op thread, as every test (tests/conftest.py): with two, on a busy 2-core
    # machine, the run took 23-48 s of CPU against 6-7 s, printing the same finding.
    with _in_process() as out:
        runpy.run_path(str(ROOT / "examples" / "text_classifier.py"), run_name="__main__")
    assert "of them contain 'not'" in out.getvalue()
