"""DiagQL: a declarative query language for diagnosing PyTorch models.

    >>> import diagql
    >>> db = diagql.demo()
    >>> db.query("TOPK 5 NEURONS IN conv2 WHERE class = 3 AND incorrect").labels

Importing this package is cheap: torch loads on first use of ``connect`` or ``demo``. In
Jupyter, ``%load_ext diagql`` adds the ``%diagql`` and ``%%diagql`` magics.
"""
from __future__ import annotations

from diagql._version import __version__
from diagql.errors import BindError, DiagQLError, DiagQLWarning, ExecutionError, ParseError

__all__ = ["BindError", "Connection", "DiagQLError", "DiagQLWarning", "ExecutionError",
           "ParseError", "Result", "__version__", "connect", "demo", "parse"]

_LAZY = {"connect": "diagql.session.connection", "Connection": "diagql.session.connection",
         "Result": "diagql.results.result", "demo": "diagql.mnist_demo",
         "parse": "diagql.language.parser",
         # %load_ext diagql (Jupyter): the magics, imported only when IPython asks for them.
         "load_ipython_extension": "diagql.shell.jupyter"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diagql' has no attribute {name!r}")
