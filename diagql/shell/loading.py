"""Loading the user's model and data from ``MODULE:CALLABLE`` specs and a weights file."""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Mapping

from diagql.errors import DiagQLError


def resolve(spec: str, what: str):
    """Import ``module:attr`` (the current directory is importable) and return the attribute."""
    module_name, sep, attr = spec.rpartition(":")  # rpartition: C:\\models\\vit.py:build
    if not sep or not module_name or not attr:
        file = (_name_in_file(spec, what) if spec.endswith(".py") and os.path.isfile(spec) else
                f"; a file is read by a function of yours that loads it and returns the "
                f"{what}: name that function, e.g. --{what} mymodule:load"
                if os.path.isfile(spec) else "")
        raise DiagQLError(f"--{what} {spec!r} is not MODULE:CALLABLE (e.g. mypkg.models:build)"
                          f"{file}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    path = None
    if module_name.endswith(".py"):  # a file of Python: imported as the module it is
        path = os.path.abspath(module_name)
        module_name = _file_module(module_name, f"--{what} {spec!r}")
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
    where = getattr(module, "__file__", None)
    if path is not None and (where is None or os.path.abspath(where) != path):
        # tests/models.py imported as tests.models found another package's (a regular
        # ``tests`` on the path wins over a folder without __init__.py: review PP1)
        raise DiagQLError(f"--{what} {spec!r}: importing it as {module_name!r} found "
                          f"{where or 'a namespace'} instead; rename its folder or the file, "
                          f"or run DiagQL from its own folder")
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


def _name_in_file(path: str, what: str) -> str:
    """'; name the function in it that returns the data: --data data.py:load', naming what the
    file defines at its top level (read, not imported: importing runs it), functions first."""
    import ast as python_ast

    try:
        with open(path, encoding="utf-8") as file:
            body = python_ast.parse(file.read()).body
    except (OSError, SyntaxError, ValueError):
        body = []
    functions = [n.name for n in body if isinstance(n, (python_ast.FunctionDef,
                                                         python_ast.ClassDef))]
    values = [t.id for n in body if isinstance(n, python_ast.Assign) for t in n.targets
              if isinstance(t, python_ast.Name)]
    names = [n for n in dict.fromkeys(functions + values) if not n.startswith("_")]
    names.sort(key=lambda n: what not in n.lower())  # load_data before a collate beside it
    if not names:
        return (f"; name a function in it that returns the {what} (it defines none at its top "
                f"level): --{what} {path}:load")
    listed = ", ".join(names[:8]) + (f" … ({len(names) - 8} more)" if len(names) > 8 else "")
    return (f"; name the function (or value) in it that gives the {what}: "
            f"--{what} {path}:{names[0]} (it defines {listed})")


def _file_module(path: str, label: str) -> str:
    """The module name under which ``path`` (a .py file) imports: its dotted name where it lies
    under the current directory (``tests/models.py`` → ``tests.models``, its package's relative
    imports intact), else its stem, its folder put on the import path (where Ray's workers,
    which rebuild the model from the same spec, find it too)."""
    whole = os.path.abspath(path)
    if not os.path.isfile(whole):
        raise DiagQLError(f"{label}: no such file {path!r}")
    inside = os.path.relpath(whole)
    dotted = inside[:-3].replace(os.sep, ".")
    if not inside.startswith(os.pardir) and all(p.isidentifier() for p in dotted.split(".")):
        try:  # the dotted name may find another package's module first (review PP1)
            found = importlib.util.find_spec(dotted)
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and os.path.abspath(found.origin) == whole:
            folder = os.path.dirname(whole)
            if not os.path.isfile(os.path.join(folder, "__init__.py")) and \
                    folder not in sys.path:  # its imports of the files beside it, as
                sys.path.append(folder)  # `python proj/net.py` finds them (sweep S36)
            return dotted
    folder, name = os.path.split(whole)
    stem = name[:-3]
    if not stem.isidentifier():
        raise DiagQLError(f"{label}: {name!r} cannot be imported as a module (its name has "
                          f"characters other than letters, digits and _): rename the file")
    known = sys.modules.get(stem)
    where = getattr(known, "__file__", None)
    if known is not None and (where is None or os.path.abspath(where) != whole):
        raise DiagQLError(f"{label}: a module named {stem!r} is imported already"
                          f"{f' (from {where})' if where else ''}: rename the file")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return stem


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

    if _is_file(spec):
        refuse_model_file(spec)
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
    """--data: ``MODULE:CALLABLE`` (what it returns or is), or a file of tensors or arrays."""
    if os.path.isdir(spec):
        raise DiagQLError(f"--data {spec!r} is a directory: name a file of the data, or "
                          f"MODULE:CALLABLE that returns it")
    if not os.path.exists(spec) and os.path.splitext(spec)[1].lower() in DATA_FILES:
        raise DiagQLError(f"--data {spec!r}: no such file")
    return read_data_file(spec) if _is_file(spec) else _call(resolve(spec, "data"), spec, "data")


def refuse_model_file(path: str):
    """--model FILE: what the file holds, and what to give instead (a model is built by a
    function of the user's: DiagQL runs no pickled code, and TorchScript takes no hooks)."""
    import zipfile

    import torch

    label = f"--model {path!r}"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.split("/")[1:2] == ["code"] for name in archive.namelist()):
                raise DiagQLError(f"{label} is TorchScript, whose layers take no forward "
                                  f"hooks: name the function that builds the nn.Module it was "
                                  f"scripted from, --model mymodule:build")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a pickled model, or not a torch file at all
        state = None
    if isinstance(state, Mapping):
        raise DiagQLError(f"{label} holds weights (a state_dict), not a model: name the "
                          f"function that builds the model, with the file as its weights: "
                          f"--model mymodule:build --weights {path}")
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or a pickle
        raise DiagQLError(f"{label} holds an object saved whole (torch.save(model)?), and "
                          f"DiagQL runs no pickled code: name a function of yours that "
                          f"returns the model (torch.load(path, weights_only=False) if you "
                          f"trust the file), --model mymodule:load")
    raise DiagQLError(f"--model {path!r} is not MODULE:CALLABLE (e.g. mypkg.models:build)")


# The files --data reads itself, by suffix (anything else: a function of the user's reads it).
DATA_FILES = (".pt", ".pth", ".npz", ".npy", ".safetensors")


def _is_file(spec: str) -> bool:
    """A file named whole, not MODULE:CALLABLE (a path of Python, ``models.py:build``, has a
    callable after it, and is not a file as written)."""
    return os.path.isfile(spec) and not spec.endswith(".py")


def read_data_file(path: str):
    """The data saved at ``path``: torch.save's (X, y), a mapping of named inputs or a tensor
    (read as tensors only: no pickled code runs), numpy's .npz (``np.savez(f, X, y)``: X and
    y; named arrays: a mapping) or .npy (inputs without labels), or safetensors' mapping."""
    label = f"--data {path!r}"
    suffix = os.path.splitext(path)[1].lower()
    if os.path.getsize(path) == 0:
        raise DiagQLError(f"{label} is an empty file")
    if suffix not in DATA_FILES:
        raise DiagQLError(f"{label}: DiagQL reads data files ending {', '.join(DATA_FILES)}; "
                          f"another file is read by a function of yours that loads it and "
                          f"returns the data: name that function, e.g. --data mymodule:load")
    try:
        if suffix in (".npz", ".npy"):
            import numpy as np

            if suffix == ".npy":  # inputs alone, without labels
                return np.load(path, allow_pickle=False), None
            with np.load(path, allow_pickle=False) as held:
                arrays = {key: held[key] for key in held.files}
            positional = [f"arr_{i}" for i in range(len(arrays))]
            if list(arrays) == positional[:1]:  # np.savez(f, X): inputs alone, as a .npy's
                return arrays["arr_0"], None
            return tuple(arrays[key] for key in positional) if list(arrays) == positional \
                else arrays
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True)
        return (data, None) if isinstance(data, torch.Tensor) else data  # inputs alone
    except ImportError as exc:
        raise DiagQLError(f"{label}: reading it needs {exc.name} (pip install {exc.name})") \
            from None
    except Exception as exc:  # noqa: BLE001 - the loaders raise anything on a bad file
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        from diagql.model.weights import other_format

        what = other_format(path) if suffix in (".pt", ".pth") else None
        if what is not None:  # text named .pt: said so, not as an unpickler's error
            first = f"it is no torch file (it is {what})"
        elif first.startswith("Weights only load failed"):
            first = ("it holds numpy arrays, which torch.load reads only by running pickled "
                     "code: save them with np.savez(path, X, y), or as tensors "
                     "(torch.from_numpy)" if "numpy" in str(exc) else
                     "it holds Python objects besides tensors (a Dataset?), and DiagQL runs no "
                     "pickled code: save the tensors themselves, torch.save((X, y), path), or "
                     "name a function of yours that loads it: --data mymodule:load")
        raise DiagQLError(f"{label} could not be read: {first}") from None
