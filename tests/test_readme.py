"""Everything README.md shows runs as written, and the demo's shown table is what it prints."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("command, shown", CONSOLE, ids=[c[:60] for c, _ in CONSOLE])
def test_console_command_runs_and_prints_what_is_shown(command, shown):
    done = subprocess.run(_runnable(command), shell=True, text=True, capture_output=True,
                          cwd=ROOT, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    printed = [line.rstrip() for line in done.stdout.splitlines()]
    for line in shown:
        if TABLE_LINE.match(line):
            assert line.rstrip() in printed, f"README shows a line the command did not print:\n{line}"


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_python_block_runs(index):
    done = subprocess.run([sys.executable, "-c", BLOCKS[index][1]], text=True,
                          capture_output=True, cwd=ROOT, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "sql"])
def test_sql_block_runs_on_the_demo(index):
    done = subprocess.run([sys.executable, "-m", "diagql", "--demo"], input=BLOCKS[index][1],
                          text=True, capture_output=True, cwd=ROOT, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr


def test_examples_run():
    for command in ([sys.executable, "-m", "diagql", "--demo", "examples/tour.dql"],
                    [sys.executable, "examples/python_api.py"]):
        done = subprocess.run(command, text=True, capture_output=True, cwd=ROOT, env=_env(),
                              timeout=300)
        assert done.returncode == 0, done.stderr


def test_the_text_classifier_example_runs():
    """examples/text_classifier.py trains a tiny BERT and must find what it shows: the mistakes
    are sentences with a negation."""
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "examples/text_classifier.py"], text=True,
                          capture_output=True, cwd=ROOT, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    assert "of them contain 'not'" in done.stdout
