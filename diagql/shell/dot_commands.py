"""Dot commands of the REPL (the sqlite3/DuckDB convention), registered by a decorator that
also writes ``.help``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from diagql.session.settings import FORMATS


@dataclass(frozen=True)
class MetaCommand:
    name: str
    aliases: tuple[str, ...]
    usage: str
    help: str
    choices: tuple[str, ...]
    handler: Callable


COMMANDS: dict[str, MetaCommand] = {}


def command(name: str, *aliases: str, usage: str = "", choices: tuple[str, ...] = ()):
    """Register ``handler(shell, argument) -> bool`` (True: leave the REPL); its docstring's first
    line is the help."""

    def register(handler):
        doc = (handler.__doc__ or "").strip().split("\n")[0]
        meta = MetaCommand(name, aliases, usage, doc, choices, handler)
        for key in (name, *aliases):
            COMMANDS[key] = meta
        return handler

    return register


def is_meta(text: str) -> bool:
    return text.lstrip().startswith(".")


def run_meta(shell, text: str) -> bool:
    """Run one dot command; True when the REPL should end."""
    name, _, argument = text.strip().partition(" ")
    meta = COMMANDS.get(name.lower())
    if meta is None:
        from diagql.suggest import did_you_mean

        shell.error(f"unknown command {name!r}{did_you_mean(name, COMMANDS) or '; try .help'}")
        return False
    if argument.strip() and not meta.usage:  # a command of no argument: say, not ignore it
        shell.error(f"{name.lower()} takes no argument, not {argument.strip()!r}")  # as typed
        return False
    return bool(meta.handler(shell, argument.strip()))


def completions() -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """(command -> help, command -> argument choices) for the completer."""
    return ({key: meta.help for key, meta in COMMANDS.items()},
            {key: meta.choices for key, meta in COMMANDS.items() if meta.choices})


def commands_help() -> str:
    seen, lines = set(), []
    for meta in COMMANDS.values():
        if meta.name in seen:
            continue
        seen.add(meta.name)
        names = " | ".join((meta.name, *meta.aliases))
        lines.append(f"  {(names + ' ' + meta.usage).strip():<24} {meta.help}")
    return "\n".join(lines)


def language_help() -> str:
    """The language at a glance: each statement's shape with the choices the grammar accepts
    at each point, and the samplers and settings from their registries."""
    from diagql import samplers
    from diagql.language.grammar import accepts, keywords
    from diagql.session.settings import Settings

    def choices(prefix: str) -> str:
        kws = keywords()
        return " | ".join(kws[t].upper() for t in sorted(accepts(prefix) or ()) if t in kws)

    query = "TOPK 10 NEURONS IN conv2 "
    lines = [
        "A statement runs at its ';' (Enter without one starts a new line), a dot command at "
        "once.",
        "A statement nothing can follow (SHOW LAYERS, DESCRIBE conv2, SET seed = 1, CLEAR CACHE) "
        "also runs on Enter.",
        "",
        f"Statements start with {choices('')}.",
        f"  TOPK n | AVG | ARGMAX  {choices('AVG ')}  IN layer[#n]   (#n: the n-th call of a "
        f"module that runs several times per pass)",
        f"      [TOKENS <{choices('AVG NEURONS IN x TOKENS ')}> | TOKEN n]   (a sequence layer's "
        f"tokens: mean by default; n-th real token, -1 the last)",
        f"      [BY {choices('TOPK 1 NEURONS IN x BY ')}]",
        f"      [WHERE <{choices(query + 'WHERE ')}> ...]   "
        f"(fields compare with = < <= > >= != and IN (...); AND | OR | NOT)",
        f"      [GROUP BY {choices(query + 'GROUP BY ')}]",
        "      [USING " + choices(query + "USING ").replace(
            "SAMPLE", "SAMPLE sampler(size, param=value, ...)") + "]",
        "      [UNTIL precision >= 0.9 | cosine <= 0.01 | width <= 0.05 | js <= 0.05] "
        "[WITHIN n SECONDS]   (grow the sample until its estimate meets the target)",
        "      [WITH BASELINE]",
        "      [ACROSS CHECKPOINTS [PLOT 'file.png']]   (once per checkpoint and the final model)",
        "  a layer of another model: model.layer (wide.fc2); SET model = name changes the "
        "default one",
        "  TOPK | BOTTOMK k INPUTS FOR [CHANNEL] layer[i, ...] [TOKENS ...] [WHERE ...] "
        "[USING ...]   (the items that activate one neuron most or least)",
        f"  SHOW {choices('SHOW ')}    DESCRIBE layer    SET name = value    EXPLAIN query",
        "  EVALUATE SAMPLERS [sampler, ...] [AT size, ...] [K k, ...] [LAYERS layer, ...] "
        "[SEEDS n]",
        "      [SWEEP j IN (value, ...)] [PLOT 'file.png']   (the paper's S1/S2/S3 benchmark)",
        "  SIMILARITY layer, layer [, ...] [BY cka] [WHERE ...] [GROUP BY ...] [USING ...] "
        "[WITH BASELINE] [PLOT 'file.png']   (linear CKA; three or more layers: every pair)",
        "  CLEAR CACHE  (empties the disk cache of profiles, samples and activations)",
        "",
        "Examples:",
        "  TOPK 10 NEURONS IN conv2 WHERE class = 3 AND incorrect "
        "USING SAMPLE stratified(0.05) WITH BASELINE;",
        "  AVG NEURONS IN fc1 WHERE incorrect GROUP BY class;",
        "  ARGMAX CHANNELS IN conv2 WHERE predicted = 8;",
        "  TOPK 10 NEURONS IN conv2 USING AUTO UNTIL precision >= 0.9 WITHIN 2 SECONDS;",
        "  TOPK 5 INPUTS FOR conv2[5,3,3] WHERE incorrect;",
        "  EVALUATE SAMPLERS random, stratified, maxmargin AT 0.05, 0.1 SEEDS 3 PLOT 'fig4.png';",
        "  SIMILARITY conv2, fc3 USING SAMPLE random(0.1) WITH BASELINE;",
        "",
        "Samplers:",
    ]
    for name, cls in samplers.REGISTRY.items():
        params = ", ".join(f"{p.name}={p.default!r}" for p in cls.params())
        lines.append(f"  {name}({params})")
    lines += ["", "Settings (SET name = value): " + ", ".join(Settings.names()), "",
              "Commands:", commands_help(), "",
              "Tab completes, Ctrl-R searches the history, Ctrl-C cancels, Ctrl-D leaves."]
    return "\n".join(lines)


@command(".help", usage="", choices=())
def _help(shell, argument):
    """Show the language at a glance, the samplers and these commands."""
    shell.say(language_help())


@command(".quit", ".exit")
def _quit(shell, argument):
    """Leave the REPL (or Ctrl-D)."""
    return True


@command(".timer", usage="on|off", choices=("on", "off"))
def _timer(shell, argument):
    """Print the time each statement took."""
    if argument.lower() not in ("on", "off"):
        shell.error(f"usage: .timer on|off (now {'on' if shell.timer else 'off'})")
        return
    shell.timer = argument.lower() == "on"


@command(".mode", usage="|".join(FORMATS), choices=FORMATS)
def _mode(shell, argument):
    """Set the output format (same as SET format = ...)."""
    if argument.lower() not in FORMATS:
        shell.error(f"usage: .mode {'|'.join(FORMATS)} (now {shell.conn.settings.format})")
        return
    shell.conn.settings.format = argument.lower()


@command(".layers")
def _layers(shell, argument):
    """List the layers a query can name (SHOW LAYERS)."""
    shell.execute("SHOW LAYERS;")


@command(".read", usage="FILE")
def _read(shell, argument):
    """Run the statements of a script file."""
    if not argument:
        shell.error("usage: .read FILE")
        return
    try:  # utf-8-sig: as the command line reads scripts (shell/cli.py)
        with open(argument, encoding="utf-8-sig") as handle:
            text = handle.read()
    except OSError as exc:
        shell.error(f"cannot read {argument}: {exc.strerror}")
        return
    except UnicodeDecodeError as exc:
        shell.error(f"cannot read {argument}: not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                    f"at offset {exc.start:,})")
        return
    shell.execute(text, echo=True, name=argument)
