"""Loading the user's model and data from ``MODULE:CALLABLE`` specs and a weights file."""
from __future__ import annotations

import importlib
import os
import re
import sys

from diagql.errors import DiagQLError


def resolve(spec: str, what: str):
    """Import ``module:attr`` (the current directory is importable) and return the attribute."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        file = (f"; a file is read by a function of yours that loads it and returns the "
                f"{what}: name that function, e.g. --{what} mymodule:load"
                if os.path.isfile(spec) else "")
        raise DiagQLError(f"--{what} {spec!r} is not MODULE:CALLABLE (e.g. mypkg.models:build)"
                          f"{file}")
    if module_name.endswith(".py"):  # a file's name where a module's is meant
        whole = os.path.abspath(module_name)
        path = os.path.relpath(whole)
        if path.startswith(os.pardir):  # outside the current directory, the importable one
            folder, name = os.path.split(whole)
            hint = (f"run DiagQL in {folder} (or add it to PYTHONPATH) and write "
                    f"--{what} {name[:-3]}:{attr}")
        else:
            hint = f"--{what} {path[:-3].replace(os.sep, '.')}:{attr}"
        raise DiagQLError(f"--{what} {spec!r}: name the module, not its file: {hint}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) == module_name.split(".")[0] and \
            "." not in module_name
        hint = _nearby_module(module_name) if missing else ""
        raise DiagQLError(f"--{what} {spec!r}: cannot import {module_name!r}: {exc}"
                          f"{hint}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise DiagQLError(f"--{what} {spec!r}: importing {module_name!r} raised "
                          f"{type(exc).__name__}: {exc} (--debug shows where)") from exc
    try:
        value = module
        for part in attr.split("."):
            value = getattr(value, part)
    except AttributeError:
        from diagql.suggest import did_you_mean

        names = [n for n in dir(module) if not n.startswith("_")]
        raise DiagQLError(f"--{what} {spec!r}: module {module_name!r} has no attribute "
                          f"{attr!r}{did_you_mean(attr, names)}") from None
    return value


def _nearby_module(name: str) -> str:
    """'; did you mean 'mymodels'?' among the current directory's modules."""
    import pkgutil

    from diagql.suggest import did_you_mean

    return did_you_mean(name, [m.name for m in pkgutil.iter_modules([os.getcwd()])])


def _call(value, spec: str, what: str):
    from torch import nn

    if callable(value) and not isinstance(value, nn.Module):
        try:
            return value()
        except Exception as exc:  # noqa: BLE001 - user code
            raise DiagQLError(f"--{what} {spec!r} raised {type(exc).__name__}: {exc} "
                              f"(--debug shows where)") from exc
    return value


def load_model(spec: str, weights: str | None = None):
    from torch import nn

    model = _call(resolve(spec, "model"), spec, "model")
    if not isinstance(model, nn.Module):
        raise DiagQLError(f"--model {spec!r} gave {type(model).__name__}, not a torch.nn.Module")
    if weights:
        from diagql.model.weights import load_file

        load_file(model, weights)
    return model


def named(value: str, flag: str) -> tuple[str | None, str]:
    """``NAME=SPEC`` as (NAME, SPEC); a value without a name before '=' is (None, value)."""
    name, sep, rest = value.partition("=")
    if sep and re.fullmatch(r"[A-Za-z_]\w*", name):
        return name, rest
    if sep and not re.search(r"[:/\\]", name):  # a mistyped name, not a path with '='
        raise DiagQLError(f"{flag} {value!r}: {name!r} is not a model name (letters, digits and "
                          f"_, not starting with a digit)")
    return None, value


def load_models(specs: list[str], weights: list[str]):
    """--model (repeatable, ``NAME=MODULE:CALLABLE`` or one unnamed) and --weights (``PATH``
    for the one model, or ``NAME=PATH``): one nn.Module, or a dict of them by name in the
    order given (the first is the default model)."""
    models: dict[str | None, object] = {}
    for spec in specs:
        name, spec = named(spec, "--model")
        if name is None and len(specs) > 1:
            raise DiagQLError(f"--model {spec!r}: with several models, name each one: "
                              f"--model NAME=MODULE:CALLABLE")
        if name in models:
            raise DiagQLError(f"--model {name}=... is given twice")
        models[name] = spec
    paths: dict[str | None, str] = {}
    for value in weights:
        name, path = named(value, "--weights")
        if name is not None and name not in models:
            given = [m for m in models if m is not None]
            raise DiagQLError(f"--weights {value!r}: there is no --model {name}=...; " + (
                f"models are {', '.join(given)}" if given else
                "the one model is unnamed: --weights PATH"))
        if name is None and len(models) > 1:
            raise DiagQLError(f"--weights {value!r}: with several models, say whose: "
                              f"--weights NAME=PATH")
        paths[name if name is not None else next(iter(models))] = path
    loaded = {name: load_model(spec, paths.get(name)) for name, spec in models.items()}
    return loaded[None] if None in loaded else loaded


def checkpoint_paths(values: list[str]) -> dict[str, str]:
    """--checkpoint NAME=PATH, PATH or a glob ('ckpt/*.pt'): paths by name, a file's name
    being its stem; a glob's files in natural order (epoch2 before epoch10)."""
    import glob

    from diagql.session.checkpoints import natural_key, stem_name

    paths: dict[str, str] = {}
    for value in values:
        name, path = named(value, "--checkpoint")
        if name is not None:
            found = [(name, path)]
        elif glob.has_magic(path):
            files = sorted(glob.glob(path), key=natural_key)
            if not files:
                raise DiagQLError(f"--checkpoint {path!r}: no file matches")
            found = [(stem_name(file), file) for file in files]
        else:
            found = [(stem_name(path), path)]
        for key, file in found:
            if key in paths:
                raise DiagQLError(f"--checkpoint: two checkpoints are named {key!r} ({paths[key]} "
                                  f"and {file}); name them with NAME=PATH")
            paths[key] = file
    return paths


def load_data(spec: str):
    return _call(resolve(spec, "data"), spec, "data")
