"""The diagql command run inside the test process: ``main(argv)`` with its own stdin, stdout and
stderr, answered as a ``subprocess.CompletedProcess``, without a new Python importing torch.

A subprocess costs 3-9 s on a 2-core machine (Python, torch and the model load each time);
what only a real process shows (--help not importing torch, the exit status of
``python -m diagql``, a shell pipe) stays with subprocess tests (tests/test_cli.py,
tests/test_readme.py).
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def diagql(*args: str, stdin: str | None = None, cwd: Path | str = ROOT,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """What ``python -m diagql ARGS`` (stdin piped, output captured, NO_COLOR=1) exits with and
    prints. ``env`` adds variables for the run only."""
    from diagql.shell.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_path = list(sys.path)  # --model MODULE:CALLABLE puts the current directory on it
    with _environment({"NO_COLOR": "1", **(env or {})}), contextlib.chdir(cwd), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            _stdin(stdin or ""), _warnings_to_stderr():
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors, --help and --version
            code = _exit_status(exc.code)
        finally:
            sys.path[:] = saved_path
    return subprocess.CompletedProcess(["diagql", *args], code, out.getvalue(), err.getvalue())


def _exit_status(code) -> int:
    """sys.exit's argument as the process's status: None is 0, a message is printed and 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _stdin(text: str):
    """A pipe's stdin: its text, and not a terminal (so the CLI never starts the REPL)."""
    before = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = before


@contextlib.contextmanager
def _warnings_to_stderr():
    """Warnings print to stderr as in a fresh interpreter with its default filters, not into
    pytest's record, so a test sees in ``stderr`` what a user would."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                         ResourceWarning):
            warnings.filterwarnings("ignore", category=category, append=True)
        warnings.simplefilter("default", append=True)
        warnings.showwarning = _show
        yield


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
