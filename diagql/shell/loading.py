"""Loading the user's model and data from ``MODULE:CALLABLE`` specs and a weights file."""
from __future__ import annotations

import importlib
import os
import sys

from diagql.errors import DiagQLError


def resolve(spec: str, what: str):
    """Import ``module:attr`` (the current directory is importable) and return the attribute."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DiagQLError(f"--{what} {spec!r} is not MODULE:CALLABLE (e.g. mypkg.models:build)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DiagQLError(f"--{what} {spec!r}: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise DiagQLError(f"--{what} {spec!r}: importing {module_name!r} raised "
                          f"{type(exc).__name__}: {exc}") from None
    try:
        value = module
        for part in attr.split("."):
            value = getattr(value, part)
    except AttributeError:
        raise DiagQLError(f"--{what} {spec!r}: module {module_name!r} has no attribute "
                          f"{attr!r}") from None
    return value


def _call(value, spec: str, what: str):
    from torch import nn

    if callable(value) and not isinstance(value, nn.Module):
        try:
            return value()
        except Exception as exc:  # noqa: BLE001 - user code
            raise DiagQLError(f"--{what} {spec!r} raised {type(exc).__name__}: {exc}") from None
    return value


def load_model(spec: str, weights: str | None = None):
    from torch import nn

    model = _call(resolve(spec, "model"), spec, "model")
    if not isinstance(model, nn.Module):
        raise DiagQLError(f"--model {spec!r} gave {type(model).__name__}, not a torch.nn.Module")
    if weights:
        load_weights(model, weights)
    return model


def load_weights(model, path: str) -> None:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DiagQLError(f"--weights {path!r}: no such file") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise DiagQLError(f"--weights {path!r} is not a readable torch checkpoint: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise DiagQLError(f"--weights {path!r} holds {type(state).__name__}, not a state_dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise DiagQLError(f"--weights {path!r} do not fit the model: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_few(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_few(result.unexpected_keys)}")
    if problems:
        raise DiagQLError(f"--weights {path!r} do not fit the model: " + "; ".join(problems))


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:4])
    return shown + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def load_data(spec: str):
    return _call(resolve(spec, "data"), spec, "data")
