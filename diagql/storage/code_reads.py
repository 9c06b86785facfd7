"""What the user's code reads from its module besides its arguments: the global names a
function's code uses (a helper function, a constant such as ``SCALE = 2.0``). An edit to one
changes a model's outputs as an edit to its forward() does, so the model's fingerprint
follows them (docs/ARCHITECTURE.md, "Storage").

Only the user's code is followed: installed packages and the standard library are fixed
while they stay installed, and following them would walk half of a library's module graph.
"""
from __future__ import annotations

import dis
import functools
import sysconfig
import types


def user_code(code: types.CodeType) -> bool:
    """Whether code is the user's own: not from an installed package or the standard
    library (a file elsewhere, a notebook cell, code typed at a prompt)."""
    return user_path(code.co_filename)


def user_module(module: types.ModuleType) -> bool:
    """Whether a module is one of the user's files (``import settings``; ``settings.SCALE``)."""
    path = getattr(module, "__file__", None)
    return isinstance(path, str) and user_path(path)


def user_path(path: str) -> bool:
    """Whether a source file is the user's: not in an installed package or the standard
    library."""
    if path.startswith("<frozen"):
        return False
    if "site-packages" in path or "dist-packages" in path:
        return False
    return not path.startswith(_stdlib())


def globals_read(code: types.CodeType, namespace: dict,
                 attributes: bool = False) -> list[tuple[str, object]]:
    """The (name, value) of each global of ``namespace`` that ``code`` (or code nested in it:
    a lambda, a comprehension) loads, in name order. ``attributes``: the names it reads as
    attributes instead (``settings.SCALE``, looked up in a user's module). Only names loaded
    as globals are read from the code's own namespace: ``self.r`` must not bring in a global
    ``r`` (a notebook's ``r = db.query(...)``), whose every rebinding would change the
    fingerprint."""
    names = _names(code, attributes)
    return [(name, namespace[name]) for name in sorted(names)
            if name in namespace and not (name.startswith("__") and name.endswith("__"))]


_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
_ATTRIBUTE_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})


@functools.lru_cache(maxsize=4096)  # a code object never changes: each statement's stamp
def _names(code: types.CodeType, attributes: bool) -> frozenset[str]:  # reads it again
    wanted = _ATTRIBUTE_LOADS if attributes else _GLOBAL_LOADS
    names = {op.argval for op in dis.get_instructions(code)
             if op.opname in wanted and isinstance(op.argval, str)}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const, attributes)
    return frozenset(names)


_STDLIB: list[str] = []


def _stdlib() -> str:
    if not _STDLIB:
        _STDLIB.append(sysconfig.get_paths()["stdlib"])
    return _STDLIB[0]
