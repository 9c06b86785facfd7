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
import importlib.machinery
import importlib.util
import sys
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
# ``from cfg import K`` inside a function reads cfg's K as ``cfg.K`` would.
_ATTRIBUTE_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM"})


@functools.lru_cache(maxsize=4096)  # a code object never changes: each statement's stamp
def _names(code: types.CodeType, attributes: bool) -> frozenset[str]:  # reads it again
    wanted = _ATTRIBUTE_LOADS if attributes else _GLOBAL_LOADS
    names = set()
    for part in _nested(code):
        found = {op.argval for op in dis.get_instructions(part)
                 if op.opname in wanted and isinstance(op.argval, str)}
        if not attributes and "globals" in found:  # globals()["K"]: its string constants
            found |= {const for const in part.co_consts if isinstance(const, str)}
        names |= found
    return frozenset(names)


def _nested(code: types.CodeType):
    """``code`` and the code nested in it (a lambda, a comprehension, an inner function)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested(const)


def modules_imported(code: types.CodeType, namespace: dict) -> list[tuple[str, object]]:
    """The user's modules that ``code`` (or code nested in it) imports itself, as (name,
    module), whose reads of them (``cfg.K``) count as a global module's do; (name, the path of
    its source file) for one not imported yet (the cache key is taken before the forward first
    runs), found without importing it, which could run what the forward never would. An edit
    of a constant a forward imported with ``import cfg`` or ``from cfg import K`` had left a
    cached profile stale (sweep JJ2)."""
    found = []
    for name, level in _imports(code):
        try:
            absolute = importlib.util.resolve_name("." * level + name, namespace.get(
                "__package__")) if level else name
        except (ImportError, ValueError):
            continue
        module = sys.modules.get(absolute)
        if module is not None:
            if user_module(module):
                found.append((absolute, module))
        elif "." not in absolute:  # a submodule's search would import its package
            spec = importlib.machinery.PathFinder.find_spec(absolute)
            origin = None if spec is None else spec.origin
            if isinstance(origin, str) and origin.endswith(".py") and user_path(origin):
                found.append((absolute, origin))
    return found


@functools.lru_cache(maxsize=4096)
def _imports(code: types.CodeType) -> tuple[tuple[str, int], ...]:
    """(name, level) of each ``import`` in ``code`` or code nested in it (the level is the
    constant loaded two instructions before: 0 for an absolute import)."""
    found = []
    for part in _nested(code):
        ops = list(dis.get_instructions(part))
        found += [(op.argval, ops[i - 2].argval if i >= 2 and isinstance(ops[i - 2].argval, int)
                   else 0) for i, op in enumerate(ops) if op.opname == "IMPORT_NAME"]
    return tuple(found)


# Methods that change a container in place: a global called so is the code's own state.
_MUTATORS = frozenset({"append", "add", "update", "setdefault", "pop", "popitem", "extend",
                       "insert", "clear", "remove", "discard", "__setitem__", "__delitem__"})


@functools.lru_cache(maxsize=4096)
def globals_written(code: types.CodeType) -> frozenset[str]:
    """The globals that ``code`` (or code nested in it) changes itself: assigned under
    ``global`` (a counter, a lazy singleton), or a container it stores into
    (``CACHE[key] = value``) or calls a mutating method of (``SEEN.add(x)``). Their values
    are the running code's state, not its settings: a process that ran it holds others than
    one that did not."""
    names = set()
    for part in _nested(code):
        ops = list(dis.get_instructions(part))
        for i, op in enumerate(ops):
            if op.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                names.add(op.argval)
            elif op.opname in _GLOBAL_LOADS and isinstance(op.argval, str):
                after = ops[i + 1:i + 16]
                if after and after[0].opname in _ATTRIBUTE_LOADS and \
                        after[0].argval in _MUTATORS or _stored_into(op, after):
                    names.add(op.argval)
    return frozenset(names)


def _stored_into(load, after) -> bool:
    """Whether the value ``load`` pushes is the container of a store or delete that follows
    (``X[key] = value``, ``X[i][j] = value``, ``X[key] += 1``; not ``Y[k] = X[j]``): the
    stack above it, by each instruction's net effect, holds only the key when the store
    comes."""
    height = max(dis.stack_effect(load.opcode, load.arg) if load.arg is not None else 1, 1)
    previous = load
    for op in after:
        if op.opname in ("STORE_SUBSCR", "DELETE_SUBSCR"):
            # [container, key] above the value, if any; ``X[k] += 1`` computes the value
            # above them and swaps it under them (not ``Y[k] = X``, with no swap)
            return height == 2 or height == 3 and previous.opname == "SWAP"
        previous = op
        if op.opname.startswith(("JUMP", "POP_JUMP", "RETURN", "FOR_ITER", "RAISE")):
            return False
        if op.opname in ("COPY", "SWAP") and op.arg > height:  # reaches under the value:
            return False  # it is now part of what was computed (``Y[len(x)] += 1``)
        try:
            height += dis.stack_effect(op.opcode, op.arg, jump=False) if op.opcode >= \
                dis.HAVE_ARGUMENT else dis.stack_effect(op.opcode)
        except ValueError:
            return False
        if height < 1:
            return False
    return False


_STDLIB: list[str] = []


def _stdlib() -> str:
    if not _STDLIB:
        _STDLIB.append(sysconfig.get_paths()["stdlib"])
    return _STDLIB[0]
