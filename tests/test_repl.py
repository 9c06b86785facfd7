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


@pytest.fixture
def repl():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "diagql", "--model", "tests.models:trained_mlp",
                                           "--data", "tests.models:digits"],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=120,
                          dimensions=(50, 160))
    child.expect("diagql>")
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
    repl.sendline("TOPK 2 NEURONS IN haed")
    repl.expect("did you mean 'head'")
    repl.expect("diagql>")
    repl.sendline("TOPK 2 NEURONS IN head;")
    repl.expect("matching items")
    repl.expect("diagql>")
    repl.sendline(".quit")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


def test_ctrl_d_leaves(repl):
    repl.sendcontrol("d")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0
