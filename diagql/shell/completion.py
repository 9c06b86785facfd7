"""Context-aware completion for the REPL, read from the grammar itself.

The keywords valid at the cursor are the keyword terminals the LALR parser accepts after the
text before the current word (``parse_interactive(...).accepts()``); names come from the
connection (layers), the sampler registry (samplers and their parameters) and ``Settings``.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

from prompt_toolkit.completion import Completer, Completion

from diagql.language.grammar import accepts, keywords
from diagql.language.parser import split_statements

# A word may end in a layer's call number (block.relu#2), completed from the layer list.
_WORD = re.compile(r"[A-Za-z0-9_.]*(?:#\d*)?$")
_LAYER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*(?:#[1-9]\d*)?$")
_SAMPLER_NAME = re.compile(r"USING\s+SAMPLE\s*$", re.IGNORECASE)
# EVALUATE SAMPLERS's list so far, while no call in it is open: a name may come next.
_EVALUATE_LIST = re.compile(r"EVALUATE\s+SAMPLERS\b((?:[^()]|\([^()]*\))*)$", re.IGNORECASE)
# The open sampler call at the cursor (the only calls whose arguments may be names).
_SAMPLER_ARGS = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)\s*\(([^()]*)$")
_MEASURE = re.compile(r"\bSIMILARITY\b.*\bBY\s+\w*$", re.IGNORECASE | re.DOTALL)
_SWEEP = re.compile(r"\bSWEEP\s*$", re.IGNORECASE)
# Where a class's name goes: class = '...', predicted != ..., class IN ('a', ...
_CLASS_VALUE = re.compile(r"\b(?:class|predicted)\s*(?:=|!=|<>|(?:NOT\s+)?IN\s*\((?:[^()]*,)?)"
                          r"\s*['\"]?$", re.IGNORECASE)
_SET_NAME = re.compile(r"^\s*SET\s*$", re.IGNORECASE)
_SET_VALUE = re.compile(r"^\s*SET\s+([A-Za-z_]\w*)\s*=\s*$", re.IGNORECASE)
_UNTIL = re.compile(r"^\s*(?:EXPLAIN\s+)?(TOPK|AVG|ARGMAX)\b.*\bUNTIL\s*$",
                    re.IGNORECASE | re.DOTALL)
# Statements whose source clause takes no UNTIL/WITHIN (the parser refuses them there), and
# SIMILARITY no AUTO either (the binder does), though the grammar shares the clause.
_NO_GROWTH = re.compile(r"^\s*(?:EXPLAIN\s+)?(SIMILARITY|(?:TOPK|BOTTOMK)\s+\d+\s+INPUTS)\b",
                        re.IGNORECASE)


def current_statement(text: str) -> str:
    """The statement the cursor is in: the text after the last ';' outside strings/comments."""
    pieces = split_statements(text)
    if not pieces or pieces[-1].terminated:
        return ""
    return pieces[-1].text


class DiagQLCompleter(Completer):
    """Completes keywords, layers, samplers, sampler parameters, SET names and dot commands.

    ``layers`` is called lazily (it may probe the model once) and returns (name, meta) pairs;
    ``meta_commands`` maps each dot command to its one-line help.
    """

    def __init__(self, layers: Callable[[], Iterable[tuple[str, str]]] = lambda: (),
                 meta_commands: dict[str, str] | None = None,
                 meta_arguments: dict[str, Iterable[str]] | None = None,
                 models: Callable[[], Iterable[str]] = lambda: (),
                 classes: Callable[[], Iterable[str]] = lambda: ()):
        self.layers = layers
        self.models = models  # the connection's model names, for SET model = ...
        self.classes = classes  # the class names, for WHERE class = '...'

        self.meta_commands = meta_commands or {}
        self.meta_arguments = meta_arguments or {}

    def get_completions(self, document, complete_event) -> Iterator[Completion]:
        before = document.text_before_cursor
        if before.lstrip().startswith("."):
            yield from self._meta(before.lstrip())
            return
        statement = current_statement(before)
        word = _WORD.search(statement).group()
        prefix = statement[:len(statement) - len(word)]
        if _CLASS_VALUE.search(prefix):
            quote = prefix[-1] if prefix.endswith(("'", '"')) else ""
            for name in self._listed(self.classes):
                if name.lower().startswith(word.lower()):
                    text = name + quote if quote else repr(name)
                    yield Completion(text, -len(word), display_meta="class")
            if quote:
                return  # inside a quoted name: nothing else goes there
        if word[:1].isdigit():
            return  # a number: nothing to offer
        terminals = accepts(prefix)
        if terminals is None:
            return
        refused = _NO_GROWTH.match(prefix)
        if refused:
            terminals = terminals - {"UNTIL", "WITHIN"} - (
                {"AUTO"} if refused.group(1).upper() == "SIMILARITY" else set())
        yield from self._names(prefix, word, terminals)
        lower = bool(word) and word.islower()
        kws = keywords()
        for name in sorted(t for t in terminals if t in kws):
            text = kws[name] if lower else kws[name].upper()
            if text.lower().startswith(word.lower()):
                yield Completion(text, -len(word), display_meta="keyword")

    def _names(self, prefix: str, word: str, terminals: set[str]) -> Iterator[Completion]:
        from diagql import samplers
        from diagql.session.settings import FORMATS, Settings

        def offer(options, meta=lambda o: ""):
            for option in options:
                if option.lower().startswith(word.lower()):
                    yield Completion(option, -len(word), display_meta=meta(option))

        if "LAYER_NAME" in terminals:
            for name, meta in self._layer_list():
                shown = name if _LAYER_NAME.fullmatch(name) else '"' + name.replace('"', '\\"') + '"'
                if name.lower().startswith(word.lower()):
                    yield Completion(shown, -len(word), display_meta=meta)
        if "NAME" not in terminals:
            return
        listed = _EVALUATE_LIST.search(prefix)
        if _SAMPLER_NAME.search(prefix) or (listed and re.fullmatch(r"\s*|.*,\s*", listed.group(1),
                                                                    re.DOTALL)):
            yield from offer(samplers.REGISTRY,
                             lambda n: samplers.REGISTRY[n].description)  # as SHOW SAMPLERS says
            return
        if _MEASURE.search(prefix):
            from diagql.language.ast import MEASURES

            yield from offer(MEASURES, lambda n: "linear CKA (Kornblith et al. 2019)")
            return
        if _SWEEP.search(prefix):
            yield from offer(["j"], lambda n: "the boundary share of gmm and maxmargin")
            return
        if _SET_NAME.search(prefix):
            yield from offer(Settings.names(), lambda n: Settings().describe().get(n, ""))
            return
        set_value = _SET_VALUE.search(prefix)
        if set_value and set_value.group(1).lower() == "format":
            yield from offer(FORMATS)
            return
        if set_value and set_value.group(1).lower() == "model":
            yield from offer(self._listed(self.models), lambda n: "model")
            return
        if set_value and set_value.group(1).lower() == "estimator":
            from diagql.session.settings import ESTIMATORS

            yield from offer(ESTIMATORS)
            return
        if set_value and set_value.group(1).lower() == "latent":
            yield from offer(["default"], lambda n: "the input of the final linear layer")
            yield from offer([name for name, _ in self._layer_list()
                              if _LAYER_NAME.fullmatch(name)], lambda n: "layer")
            return
        until = _UNTIL.search(prefix)
        if until:
            from diagql.language.binder import TARGETS

            aggregate = until.group(1).lower()
            yield from offer([name for name, (of, *_) in TARGETS.items() if of == aggregate],
                             lambda n: f"UNTIL {n} {'>=' if TARGETS[n][1] == 'higher' else '<='} "
                                       f"target")
            return
        call = _SAMPLER_ARGS.search(prefix)
        if call and re.search(r"(\(|,)\s*$", prefix):
            cls = samplers.REGISTRY.get(call.group(1).lower())
            if cls is None:
                return
            used = set(re.findall(r"([A-Za-z_]\w*)\s*=", call.group(2)))
            if re.match(r"\s*EVALUATE\b", prefix, re.IGNORECASE):  # SEEDS chooses the seeds
                used.add("random_state")
            positional = sum(1 for arg in call.group(2).split(",") if arg.strip() and "=" not in arg)
            params = [p for i, p in enumerate(cls.params())
                      if p.name not in used and i >= positional]
            for param in params:
                if param.name.startswith(word.lower()):
                    yield Completion(param.name + "=", -len(word),
                                     display_meta=f"default {param.default!r}")

    def _layer_list(self) -> list[tuple[str, str]]:
        return self._listed(self.layers)

    @staticmethod
    def _listed(source: Callable[[], Iterable]) -> list:
        try:
            return list(source())
        except Exception:  # noqa: BLE001 - no model, or it failed: completion just offers less
            return []

    def _meta(self, text: str) -> Iterator[Completion]:
        command, space, argument = text.partition(" ")
        if not space:
            for name, help_text in self.meta_commands.items():
                if name.startswith(command):
                    yield Completion(name, -len(command), display_meta=help_text)
            return
        word = argument.split(" ")[-1]
        for option in self.meta_arguments.get(command, ()):
            if option.startswith(word):
                yield Completion(option, -len(word))


def connection_layers(conn) -> Callable[[], list[tuple[str, str]]]:
    """Layer names with their type and shape, for the completer (probes the model once): the
    default model's, and with several models every model's as ``model.layer`` (a checkpoint's
    from its final model's catalog, so that completing loads no checkpoint)."""

    def listed(catalog, prefix: str = "", model: str = "") -> list[tuple[str, str]]:
        return [(prefix + layer.name, f"{model}{layer.type_name} {layer.shape_text()}")
                for layer in catalog.layers if layer.shape is not None]

    def layers() -> list[tuple[str, str]]:
        names = listed(conn.catalog)
        models = conn.models
        if len(models) > 1:
            given = {id(e.architecture()): e for e in models.values() if not e.is_checkpoint}
            for name, entry in models.items():
                catalog = given.get(id(entry.architecture()), entry).catalog
                names += listed(catalog, f"{name}.", f"{name}: ")
        return names

    return layers


def connection_models(conn) -> Callable[[], list[str]]:
    return lambda: list(conn.models)


def connection_classes(conn) -> Callable[[], list[str]]:
    return lambda: list(getattr(conn, "class_names", None) or [])
