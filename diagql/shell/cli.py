"""The ``diagql`` command: scripts, -e queries and stdin, or the REPL on a terminal.

Only argparse and the session's settings (for the formats and defaults) load before the
arguments are read, so ``--help`` and ``--version`` never import torch or numpy.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

from diagql._version import __version__
from diagql.session.settings import FORMATS, Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="diagql",
        description="Query a PyTorch model's activations: TOPK, AVG and ARGMAX over neurons of "
                    "any layer, filtered by class and correctness, exactly or on samples.",
        epilog="examples:\n"
               "  diagql --demo -e 'SHOW LAYERS'\n"
               "  diagql --demo -e 'TOPK 10 NEURONS IN conv2 WHERE class = 3 AND incorrect "
               "USING SAMPLE stratified(0.05) WITH BASELINE'\n"
               "  diagql --model mypkg.models:build --weights ckpt.pt --data mypkg.data:test_set "
               "report.dql\n"
               "  echo 'SHOW PROFILE;' | diagql --demo --format csv",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scripts", nargs="*", metavar="SCRIPT.dql",
                        help="script files to run in order ('-' reads standard input)")
    parser.add_argument("-e", "--execute", action="append", default=[], metavar="QUERY",
                        help="run this statement (repeatable; runs after the scripts)")
    source = parser.add_argument_group("model and data")
    source.add_argument("--demo", action="store_true",
                        help="the built-in LeNet-5 over 2,500 held-out MNIST digits "
                             "(needs: pip install 'diagql[demo]')")
    source.add_argument("--model", metavar="[NAME=]MODULE:CALLABLE", action="append", default=[],
                        help="a callable returning an nn.Module (or the module itself), "
                             "its module named or its file (path/models.py:build); "
                             "repeat as NAME=MODULE:CALLABLE for several models over the same "
                             "data (the first is the default; wide.fc2 names another's layer)")
    source.add_argument("--weights", metavar="[NAME=]PATH", action="append", default=[],
                        help="a state_dict saved with torch.save (NAME=PATH: that model's)")
    source.add_argument("--checkpoint", metavar="[NAME=]PATH", action="append", default=[],
                        help="a checkpoint of the model (a saved state_dict), a model of its "
                             "own named NAME or by the file's stem; a glob such as "
                             "'ckpt/*.pt' adds every file (the model itself is then 'final'); "
                             "ACROSS CHECKPOINTS runs a query on each")
    source.add_argument("--data", metavar="MODULE:CALLABLE|FILE",
                        help="a callable returning a Dataset (of (x, y) or of dicts), a "
                             "DataLoader, (X, y) or a mapping of named inputs; or a file of "
                             "them: torch.save's (X, y) or mapping (.pt), .npz (X, y or "
                             "named arrays), .npy (inputs alone) or .safetensors")
    source.add_argument("--label-key", metavar="KEY",
                        help="the key under which the data's mapping items hold their labels "
                             "(default: labels, label, y, target or targets)")
    source.add_argument("--classes", metavar="NAMES", type=_classes_arg,
                        help="the class names in class order, comma-separated (cat,dog,bird), "
                             "so that WHERE class = 'cat' reads (default: the data's or the "
                             "model's names, if any)")
    source.add_argument("--scores", metavar="POSITION|KEY|MODULE:FUNCTION", type=_scores_arg,
                        help="where the class scores are in what the model returns: a position "
                             "in a tuple (1 for (features, logits)), a key of a dict or "
                             "output object, or a function of the output that returns them "
                             "(mymodels:last_token_logits) (default: the output, its logits, "
                             "or the one vector per item as wide as the labels need)")
    source.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                        help=f"items per forward pass (default {defaults.batch_size})")
    source.add_argument("--device", help="torch device, e.g. cpu or cuda (default: the model's)")
    source.add_argument("--cache-dir", metavar="DIR",
                        help="where profiles and samples are kept between runs (default: "
                             "$DIAGQL_CACHE_DIR or the platform's cache directory)")
    source.add_argument("--no-cache", action="store_true", help="keep nothing on disk")
    source.add_argument("--cache-limit", metavar="SIZE",
                        help="bound the disk cache, e.g. 500MB (default $DIAGQL_CACHE_LIMIT or "
                             "2GB); least recently used entries go first. SHOW CACHE lists it, "
                             "CLEAR CACHE empties it")
    source.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="where passes over the data run: in this process (default) or on "
                             "a Ray cluster, one model replica per worker (needs: pip install "
                             "'diagql[ray]'; see docs/SCALING.md)")
    source.add_argument("--ray-address", metavar="ADDR",
                        help="the Ray cluster to use with --engine ray, e.g. ray://head:10001 "
                             "(default: a new local instance, one CPU per core)")
    source.add_argument("--ray-workers", type=int, metavar="N",
                        help="model replicas with --engine ray (default: one per GPU of the "
                             "cluster, else one per CPU)")
    source.add_argument("--latent", metavar="LAYER",
                        help="layer whose output is the latent space for samplers "
                             "(default: the input of the final linear layer)")
    output = parser.add_argument_group("output")
    output.add_argument("--format", choices=FORMATS, default=defaults.format,
                        help=f"the output format (default {defaults.format}); json prints one "
                             f"object per statement")
    output.add_argument("--plot", metavar="FILE",
                        help="draw each EVALUATE SAMPLERS and SIMILARITY result, each TOPK k "
                             "INPUTS answer's items as thumbnails and each ACROSS CHECKPOINTS "
                             "answer's curves, to FILE (.png, .pdf, .svg; the second to "
                             "FILE-2.png, ...); needs matplotlib")
    output.add_argument("--keep-going", action="store_true",
                        help="run the remaining statements after one fails (exit status is still 1)")
    output.add_argument("--no-progress", action="store_true", help="never draw progress bars")
    output.add_argument("--debug", action="store_true",
                        help="show Python tracebacks for internal errors, and where your "
                             "model or data code failed")
    parser.add_argument("--version", action="version", version=f"diagql {__version__}")
    return parser


def _replace_what_cannot_be_written() -> None:
    """On a stream whose encoding cannot write the tables' bars and marks (ASCII: an old
    locale, PYTHONIOENCODING=ascii), each such character becomes '?': the answer's numbers
    are written whole, where the first bar had raised UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        try:
            "█✓…—".encode(stream.encoding or "utf-8")
        except (UnicodeEncodeError, LookupError):
            with contextlib.suppress(AttributeError, ValueError):  # a stream not to reconfigure
                stream.reconfigure(errors="replace")


BROKEN_PIPE = 128 + 13  # the status of a process SIGPIPE ended


def main(argv: list[str] | None = None) -> int:
    _replace_what_cannot_be_written()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo and (args.model or args.data):
        parser.error("--demo cannot be combined with --model/--data")
    if bool(args.model) != bool(args.data):
        parser.error("--model and --data go together")
    if args.weights and not (args.model or args.demo):
        parser.error("--weights needs --model (or --demo)")
    if args.demo and len(args.weights) > 1:
        parser.error("--demo takes one --weights PATH")
    if args.checkpoint and not (args.model or args.demo):
        parser.error("--checkpoint needs --model or --demo")
    if args.label_key and not args.data:
        parser.error("--label-key needs --data")
    if args.scores is not None and not args.model:
        parser.error("--scores needs --model")
    if args.no_cache and args.cache_dir:
        parser.error("--cache-dir and --no-cache contradict each other")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if (args.ray_address or args.ray_workers is not None) and args.engine != "ray":
        parser.error("--ray-address and --ray-workers need --engine ray")
    if args.ray_workers is not None and args.ray_workers < 1:
        parser.error("--ray-workers must be at least 1")
    if args.engine == "ray" and not (args.demo or args.model):
        parser.error("--engine ray needs a model: --demo, or --model and --data")
    if args.engine == "ray" and args.checkpoint:
        parser.error("--engine ray runs no checkpoints: leave out --checkpoint, or use the "
                     "local engine")
    if args.plot:
        from diagql.errors import DiagQLError
        from diagql.results.plots import check_target

        try:
            check_target(args.plot)
        except DiagQLError as exc:
            parser.error(f"--plot: {exc.message}")

    from rich.console import Console

    class _Out(Console):
        def on_broken_pipe(self) -> None:
            """A reader that closed the pipe (``| head -1``): rich's own end, stdout sent to
            devnull, with the status of a process SIGPIPE ended, 141, as other tools give,
            not a user error's 1 (sweep SX11)."""
            try:
                super().on_broken_pipe()
            except SystemExit:
                raise SystemExit(BROKEN_PIPE) from None

    # emoji=False: what the user typed is written as typed (a script's line 100 had printed
    # "all.dql💯25:", a quoted ':fire:' an emoji in an error and in JSON: sweep SY3).
    out = _Out(soft_wrap=False, width=_width(sys.stdout), emoji=False)
    err = Console(stderr=True, highlight=False, width=_width(sys.stderr), emoji=False)
    default = warnings.showwarning
    warnings.showwarning = _one_line_warnings(err, default)
    try:
        return _run(args, out, err)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug must not look like a user error
        from diagql.errors import DiagQLError

        if isinstance(exc, DiagQLError):
            if args.debug and exc.__cause__ is not None:  # the user's code failed: where
                err.print_exception()
            _print_error(err, exc, None)
            return EXIT_FAILED
        from diagql.shell.output import print_internal_error

        print_internal_error(err, exc, args.debug)
        return EXIT_FAILED
    finally:
        writer = sys.modules.get("diagql.storage.writer")
        if writer is not None:  # a failed cache write at exit: warned as the command's line
            writer.flush_pending()
        warnings.showwarning = default


def _one_line_warnings(err, default):
    """``warnings.showwarning`` for the command: DiagQL's own warnings (a cache that cannot be
    written, a damaged entry recomputed) one line each on stderr, "warning: ...", not Python's
    form with a source file and line; other libraries' warnings go to ``default``."""
    from diagql.errors import DiagQLWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DiagQLWarning):
            err.print(f"warning: {message}", style="yellow", markup=False, highlight=False,
                      soft_wrap=True)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _run(args, out, err) -> int:
    sources = _sources(args)
    interactive = not sources and sys.stdin.isatty()
    if interactive and args.plot:
        err.print("--plot applies to scripts and -e; in the REPL, end the statement with "
                  "PLOT 'file.png'", markup=False)
        return EXIT_USAGE
    if interactive:
        from diagql.shell.pending import PendingConnection
        from diagql.shell.repl import run_repl

        # The prompt comes first; torch, the model and the data load behind it.
        what = "the demo" if args.demo else (", ".join(args.model) or "no model")
        return run_repl(PendingConnection(lambda: _connect(args), what), out, err,
                        debug=args.debug)
    conn = _connect(args)
    from diagql.errors import DiagQLError
    from diagql.shell.output import print_result

    failed = False
    plots = 0
    for name, text in sources:
        for outcome in conn.run_script(text):
            if isinstance(outcome, DiagQLError):
                if args.debug and outcome.__cause__ is not None:  # the user's code failed
                    _print_cause(err, outcome.__cause__)
                _print_error(err, outcome, name)
                failed = True
                if not args.keep_going:
                    return EXIT_FAILED
                if conn.settings.format == "json":  # JSON Lines: one line per statement
                    _print_json_error(out, outcome)
                continue
            if args.plot and (outcome.kind in ("evaluation", "similarity", "across")
                              or outcome.ranked is not None):
                plots += 1
                try:
                    _plot(outcome, args.plot, plots)
                except DiagQLError as exc:
                    _print_error(err, exc, None)
                    failed = True
            print_result(out, outcome, conn.settings)
    if args.plot and not plots:  # not a word otherwise: the user asked for a file
        err.print(f"--plot: nothing was written to {args.plot}: no statement made a figure "
                  f"(EVALUATE SAMPLERS, SIMILARITY, TOPK k INPUTS and ACROSS CHECKPOINTS "
                  f"do)", markup=False,
                  highlight=False, soft_wrap=True)
    return EXIT_FAILED if failed else EXIT_OK


def _print_json_error(out, error) -> None:
    """A failed statement's JSON line under --keep-going, so that each statement keeps its
    line (three statements with one failing had given two lines)."""
    import json

    from diagql.errors import shortened

    line = {"kind": "error", "error": error.shown_message(), "line": error.line,
            "column": error.column, "source_line": shortened(error.source_line()),
            # which statement failed, where the error has no place of its own (a forward
            # that raised: its line had been all null, sweep SX11)
            "statement": shortened(error.statement)}
    out.print(json.dumps(line, ensure_ascii=False), markup=False, highlight=False,
              soft_wrap=True)


def _plot(result, path: str, number: int) -> None:
    """--plot: the first plotted result to PATH, the n-th to PATH's stem + "-n" + suffix."""
    from pathlib import Path

    from diagql.results.across import write_curves
    from diagql.results.plots import write_plot

    if number > 1:
        target = Path(path)
        path = str(target.with_name(f"{target.stem}-{number}{target.suffix}"))
    (write_curves if result.kind == "across" else write_plot)(result, path)
    result.notes.append(f"plot written to {path}")


def _sources(args) -> list[tuple[str, str]]:
    sources = []
    scripts = args.scripts or ([] if args.execute or sys.stdin.isatty() else ["-"])
    for path in scripts:
        if path == "-":
            sources.append(("<stdin>", sys.stdin.read().removeprefix("\ufeff")))
            continue
        # utf-8-sig: an editor's byte order mark is not a character of the first statement.
        try:
            with open(path, encoding="utf-8-sig") as handle:
                sources.append((path, handle.read()))
        except (OSError, UnicodeDecodeError) as exc:
            from diagql.errors import DiagQLError

            why = exc.strerror if isinstance(exc, OSError) else \
                f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start:,})"
            # --checkpoint ckpt/*.pt unquoted: the shell gave the files after the first to
            # the command line as scripts.
            weights = path.lower().endswith((".pt", ".pth", ".ckpt", ".bin", ".safetensors"))
            hint = "; an unquoted glob expanded by the shell? quote it: --checkpoint " \
                "'ckpt/*.pt'" if weights and isinstance(exc, UnicodeDecodeError) else ""
            raise DiagQLError(f"cannot read script {path}: {why}{hint}") from None
    sources.extend(("<-e>", text) for text in args.execute)
    return sources


def _connect(args):
    conn = _open(args)
    conn.settings.format = args.format
    return conn


def _open(args):
    from diagql.session.connection import Connection, connect

    progress = False if args.no_progress else None
    cache_dir = False if args.no_cache else args.cache_dir
    options = dict(batch_size=args.batch_size, device=args.device, latent=args.latent,
                   progress=progress, cache_dir=cache_dir, cache_limit=args.cache_limit)
    if args.engine == "ray":
        options.update(engine="ray", ray_address=args.ray_address, ray_workers=args.ray_workers)
    if args.classes:
        options["classes"] = args.classes
    if args.checkpoint:
        from diagql.shell.loading import checkpoint_paths

        options["checkpoints"] = checkpoint_paths(args.checkpoint)
    if args.demo:
        from diagql.mnist_demo import demo

        try:
            return demo(args.weights[0] if args.weights else None, **options)
        except ImportError as exc:
            from diagql.errors import DiagQLError

            raise DiagQLError(str(exc)) from None
    if args.model:
        from diagql.shell.loading import load_data, load_models

        if args.engine == "ray":  # every worker builds its own model and data from the specs
            import functools

            return connect(functools.partial(load_models, args.model, args.weights),
                           functools.partial(load_data, args.data), label_key=args.label_key,
                           scores=_scores(args.scores), **options)
        return connect(load_models(args.model, args.weights), load_data(args.data),
                       label_key=args.label_key, scores=_scores(args.scores), **options)
    conn = Connection.detached(cache_dir, args.cache_limit)
    conn.settings.batch_size = args.batch_size
    return conn


def _width(stream) -> int | None:
    """None where rich finds the width itself (a terminal's, or $COLUMNS); a pipe without
    $COLUMNS gets 120 (tables widen past it: shell/output.py)."""
    import os

    return None if stream.isatty() or os.environ.get("COLUMNS", "").isdigit() else 120


def _classes_arg(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty class name")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{text!r} names two classes {twice[0]!r}")
    return names


def _scores_arg(text: str) -> int | str:
    """--scores: a whole number is a position, MODULE:FUNCTION a function (imported when the
    model is, ``_scores``), anything else a key."""
    try:
        return int(text)
    except ValueError:
        return text


def _scores(spec: int | str | None):
    """--scores as connect takes it: MODULE:FUNCTION imported, the function itself."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    from diagql.shell.loading import resolve

    function = resolve(spec, "scores")
    if not callable(function):
        from diagql.errors import DiagQLError

        raise DiagQLError(f"--scores {spec!r} is {type(function).__name__}, not a function "
                          f"of the model's output")
    return function


def _print_cause(err, cause: BaseException) -> None:
    """--debug: the traceback of the user's code that failed under a statement's error
    (the model's forward, the data's reading), which the script goes on past."""
    from rich.traceback import Traceback

    err.print(Traceback.from_exception(type(cause), cause, cause.__traceback__))


def _print_error(err, exc, name: str | None) -> None:
    err.print(exc.format(name), style="red" if err.is_terminal else None, markup=False,
              highlight=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
