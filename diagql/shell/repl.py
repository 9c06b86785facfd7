"""The interactive prompt: a statement runs at its ';', a dot command at once (as in psql,
sqlite3 and DuckDB).

A prompt_toolkit session with grammar-driven completion and highlighting (completion.py,
highlight.py), dot commands (dot_commands.py), a history file, and Ctrl-C that cancels the
running statement.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from diagql.errors import DiagQLError, IncompleteStatement
from diagql.language.grammar import accepts
from diagql.language.parser import parse_piece, split_statements
from diagql.shell.dot_commands import is_meta, run_meta
from diagql.shell.pending import PendingConnection

PROMPT = "diagql> "
CONTINUATION = "   ...> "
GOODBYE = "Goodbye!"


def wants_more(text: str, layers: Callable[[], set[str] | None] = lambda: None) -> bool:
    """True when Enter should start a new line instead of running the input.

    A statement without its ';' waits, even when complete (a WHERE may follow on the next
    line), unless no further line could change it: nothing may follow it in the grammar (SHOW
    LAYERS, DESCRIBE conv2, SET seed = 1), or it has a mistake that no later line can repair,
    which is better shown now than after more typing: a parse error, or a layer that is not
    among ``layers()`` (the queryable layers' names, None until the connection has them: a
    statement after `TOPK 3 NEURONS IN conv9` had been read as its continuation, and only
    "end the one before it with ';'" was shown).
    """
    if not text.strip() or is_meta(text):
        return False
    pieces = split_statements(text)
    if not pieces or pieces[-1].terminated:
        return False
    last = pieces[-1]
    try:
        statement = parse_piece(last, text)
    except IncompleteStatement:
        return True
    except DiagQLError:
        return False
    known = layers()
    if known is not None and any(ref.text() not in known for ref in _layer_refs(statement)):
        return False
    return accepts(last.text) - {"CALL"} != {"$END"}  # a layer's '#n' is typed with its name


def _layer_refs(node) -> list:
    """The layers a statement names (its AST's LayerRefs, wherever they sit)."""
    from diagql.language.ast import LayerRef

    if isinstance(node, LayerRef):
        return [node]
    if isinstance(node, (tuple, list)):
        return [ref for part in node for ref in _layer_refs(part)]
    fields = getattr(node, "__dataclass_fields__", None)
    return [] if fields is None else [ref for name in fields
                                      for ref in _layer_refs(getattr(node, name))]


def known_layers(conn) -> Callable[[], set[str] | None]:
    """The names a query may read, for ``wants_more``: the completer's (``connection_layers``),
    but without waiting (Enter must answer at once), so None while the connection loads or a
    model's layers are not yet probed."""
    from diagql.shell.completion import connection_layers

    listed = connection_layers(conn)

    def names() -> set[str] | None:
        if isinstance(conn, PendingConnection) and not conn.ready():
            return None
        models = [entry for entry in conn.models.values() if not entry.is_checkpoint]
        if any(entry.artifacts.catalog is None for entry in models):
            return None
        return {name for name, _ in listed()}
    return names


def history_path() -> Path:
    """$DIAGQL_HISTORY_FILE, else $XDG_STATE_HOME/diagql/history (~/.local/state by default)."""
    explicit = os.environ.get("DIAGQL_HISTORY_FILE")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join("~", ".local", "state")
    return Path(state).expanduser() / "diagql" / "history"


def _history(note=None):
    """The prompt's history, kept in ``history_path()``; where that cannot be read or written
    (a read-only file or home, a directory of that name) it is kept in memory for the session,
    and ``note`` (a one-argument callable) is told once why: an OSError from the history file
    inside prompt_toolkit had printed a traceback at every Enter."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = history_path()
    told = []

    def fallback(exc: OSError) -> None:
        if note is not None and not told:
            told.append(True)
            note(f"history kept for this session only: {path}: {exc.strerror or exc}")

    class _Kept(FileHistory):
        def load_history_strings(self):
            try:
                yield from list(super().load_history_strings())
            except OSError as exc:
                fallback(exc)

        def store_string(self, string: str) -> None:
            try:
                super().store_string(string)
            except OSError as exc:
                fallback(exc)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        with open(path, "a", encoding="utf-8"):  # writable (touch passes a read-only file)
            pass
    except OSError as exc:  # a read-only home must not stop the REPL
        fallback(exc)
        return InMemoryHistory()
    return _Kept(str(path))


def key_bindings(layers: Callable[[], set[str] | None] = lambda: None):
    """Enter runs a finished statement and starts a new line otherwise (``wants_more``)."""
    from prompt_toolkit.filters import has_completions, is_searching
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    # Not while searching the history (Ctrl-R): prompt_toolkit's own Enter takes the match.
    @bindings.add("enter", filter=~has_completions & ~is_searching)
    def _enter(event):
        """Run the input when it ends with ';' or is a dot command (see wants_more for the
        rest); otherwise continue on a new line."""
        buffer = event.current_buffer
        if buffer.document.is_cursor_at_the_end and wants_more(buffer.text, layers):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @bindings.add("enter", filter=has_completions & ~is_searching)
    def _pick(event):
        """Take the highlighted completion (Enter does not run the statement then)."""
        buffer = event.current_buffer
        if buffer.complete_state and buffer.complete_state.current_completion:
            buffer.apply_completion(buffer.complete_state.current_completion)
        else:
            buffer.cancel_completion()
            _enter(event)

    return bindings


def make_session(conn, *, input=None, output=None, note=None):
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.completion import ThreadedCompleter

    from diagql.shell.completion import DiagQLCompleter, connection_classes, connection_layers, \
        connection_models
    from diagql.shell.dot_commands import completions
    from diagql.shell.highlight import STYLE, DiagQLLexer

    commands, arguments = completions()
    completer = DiagQLCompleter(connection_layers(conn), commands, arguments,
                                connection_models(conn), connection_classes(conn))
    return PromptSession(
        history=_history(note), auto_suggest=AutoSuggestFromHistory(), multiline=True,
        key_bindings=key_bindings(known_layers(conn)),
        # A line wrapped by the terminal is padded; "...>" marks a new line of the statement
        # (it had drawn a long line as if Enter had been pressed inside a word).
        prompt_continuation=lambda width, line, wrap: " " * len(CONTINUATION) if wrap else
        CONTINUATION,
        lexer=DiagQLLexer(), style=STYLE, include_default_pygments_style=False,
        completer=ThreadedCompleter(completer) if input is None else completer,
        complete_while_typing=False, enable_history_search=False, input=input, output=output)


class Shell:
    """One REPL session: the connection, where output goes, and the dot-command state."""

    def __init__(self, conn, out, err, debug: bool = False):
        self.conn, self.out, self.err = conn, out, err
        self.timer = False
        self.debug = debug  # --debug: an internal error's traceback

    def say(self, text: str) -> None:
        self.out.print(text, markup=False, highlight=False)

    def error(self, text: str) -> None:
        self.err.print(text, style="red", markup=False, highlight=False, soft_wrap=True)

    def execute(self, text: str, *, echo: bool = False, name: str | None = None) -> None:
        """Run statements; ``echo`` labels each result with its statement (for .read, whose
        statements the prompt has not shown); ``name``: the script file's, which errors start
        with (``file:line:col``, as the command line prints them)."""
        from diagql.shell.output import discard_unwritten, print_internal_error, print_result

        started = time.perf_counter()
        try:
            for outcome in self.conn.run_script(text):
                if isinstance(outcome, DiagQLError):
                    # A mistake at the prompt is shown, not fatal: the session goes on.
                    self.error(outcome.format(name))
                else:
                    print_result(self.out, outcome, self.conn.settings, echo=echo)
                    if self.timer:
                        self.say(f"Time: {time.perf_counter() - started:.3f}s")
                started = time.perf_counter()
        except KeyboardInterrupt:
            discard_unwritten(self.out, self.err)
            self.err.print("cancelled", style="yellow")
        except Exception as exc:  # noqa: BLE001 - a bug ends the statement, not the session
            if isinstance(self.conn, PendingConnection) and self.conn.failed():
                raise  # the model or data failed to load: the command line reports it
            # What was computed and cached before it stays: the session goes on.
            print_internal_error(self.err, exc, self.debug)

    def handle(self, text: str) -> bool:
        """Run one input; True when the session should end."""
        if is_meta(text):
            return run_meta(self, text)
        if text.strip():
            self.execute(text)
        return False


class _LoadFailed(Exception):
    """The connection the prompt came before failed to load (shell/pending.py)."""


def _end_prompt_on_failure(conn, session) -> None:
    """A model or data that fails to load ends the prompt when it fails, not at the statement
    typed next (which was lost with the session): the error is raised from ``result()``."""
    if not isinstance(conn, PendingConnection):
        return

    def stop() -> None:
        app = session.app
        if app.is_running and app.loop is not None:
            app.loop.call_soon_threadsafe(lambda: app.exit(exception=_LoadFailed()))

    conn.on_failure(stop)


def run_repl(conn, out, err, session=None, debug: bool = False) -> int:
    shell = Shell(conn, out, err, debug)
    session = session or make_session(conn, note=lambda text: err.print(
        text, style="yellow", markup=False, highlight=False))
    err.print(f"DiagQL — {conn.summary()}. Type .help for help, .quit to leave.",
              markup=False)
    _end_prompt_on_failure(conn, session)
    while True:
        try:
            if isinstance(conn, PendingConnection) and conn.failed():
                raise _LoadFailed
            text = session.prompt(PROMPT)
        except _LoadFailed:
            conn.result()  # raises the loading error: the command line reports it, status 1
            raise
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the input
        except EOFError:
            err.print(GOODBYE)
            return 0
        try:
            if shell.handle(text):
                err.print(GOODBYE)
                return 0
        except KeyboardInterrupt:
            from diagql.shell.output import discard_unwritten

            discard_unwritten(shell.out, err)
            err.print("cancelled", style="yellow")
