"""DiagQL: a declarative query language for diagnosing PyTorch models.

    >>> import diagql
    >>> db = diagql.demo()
    >>> db.query("TOPK 5 NEURONS IN conv2 WHERE class = 3 AND incorrect").labels

Importing this package is cheap: torch loads on first use of ``connect`` or ``demo``.
"""
from __future__ import annotations

from ._version import __version__
from .errors import BindError, DiagQLError, DiagQLWarning, ExecutionError, ParseError

__all__ = ["BindError", "Connection", "DiagQLError", "DiagQLWarning", "ExecutionError",
           "ParseError", "Result", "__version__", "connect", "demo", "parse"]

_LAZY = {"connect": "connection", "Connection": "connection", "Result": "result",
         "demo": "builtin_demo", "parse": "parser"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diagql' has no attribute {name!r}")
