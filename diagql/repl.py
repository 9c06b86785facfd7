"""The interactive prompt: statements run when they end with ';' or parse completely."""
from __future__ import annotations

from .errors import DiagQLError, ParseError
from .parser import is_complete, parse

PROMPT = "diagql> "
CONTINUATION = "   ...> "

HELP = """\
Statements end with ';' (a single complete statement also runs on Enter).
  SHOW LAYERS; SHOW PROFILE; SHOW SAMPLERS; SHOW SETTINGS; DESCRIBE conv2;
  TOPK 10 NEURONS IN conv2 WHERE class = 3 AND incorrect USING SAMPLE stratified(0.05) WITH BASELINE;
  AVG NEURONS IN fc1 WHERE incorrect GROUP BY class;
  ARGMAX CHANNELS IN conv2 WHERE predicted = 8;
  SET seed = 1;  EXPLAIN <query>;
Commands: .help  .quit (or Ctrl-D).  Ctrl-C clears the input or cancels a running statement."""


def wants_more(text: str) -> bool:
    """True while the input is an unfinished statement (no ';' yet and cut off mid-way)."""
    if not text.strip() or is_complete(text):
        return False
    try:
        parse(text)
    except ParseError as exc:
        return exc.message.startswith("unexpected end of statement")
    except DiagQLError:
        return False
    return False


def run_repl(conn, out, err) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    from .cli import print_result

    session = PromptSession(history=InMemoryHistory())
    err.print(f"DiagQL — {conn!r}. Type .help for help, .quit to leave.", markup=False)
    while True:
        try:
            text = _read_statement(session)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        command = text.strip()
        if command in (".quit", ".exit", "\\q"):
            return 0
        if command in (".help", "help", "\\?"):
            out.print(HELP, markup=False, highlight=False)
            continue
        try:
            for outcome in conn.run_script(text):
                if isinstance(outcome, DiagQLError):
                    # A mistake at the prompt is shown, not fatal: the session goes on.
                    err.print(outcome.format(), style="red", markup=False, highlight=False,
                              soft_wrap=True)
                else:
                    print_result(out, outcome, conn.settings)
        except KeyboardInterrupt:
            err.print("cancelled", style="yellow")


def _read_statement(session) -> str:
    text = session.prompt(PROMPT)
    while wants_more(text):
        text += "\n" + session.prompt(CONTINUATION)
    return text
