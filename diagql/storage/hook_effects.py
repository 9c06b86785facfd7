"""Which forward hooks can change what a model returns (docs/ARCHITECTURE.md, "Storage").

A hook that returns a value replaces its module's output (or, before the forward, its
inputs), and one that writes into its arguments in place (``output[:, 3] = 0``,
``output.mul_(0)``) changes them: an ablation. A hook that counts or records calls
(``calls.append(1)``, ``store[name] = output.detach()``) is instrumentation, and must neither
split the cache nor make a connection derive its profile again. The hook's source is read: a
hook is instrumentation only when it visibly returns nothing, writes into none of its
arguments and hands none to a function of the user's (``helper(output)`` may write into
it); one whose source cannot be read or that calls something unknown in a lambda's return
position is taken to change outputs (its digest then keys the cache)."""
from __future__ import annotations

import ast
import functools
import inspect
import linecache
import textwrap
import types

from diagql.storage.code_reads import user_module

# Calls that return None: a lambda whose body is one of these returns nothing.
NONE_RETURNING = frozenset({
    "append", "extend", "insert", "add", "update", "discard", "remove", "clear", "sort",
    "reverse", "__setitem__", "__delitem__", "put", "put_nowait", "print", "debug", "info",
    "warning", "error", "log", "set_postfix", "set_description",
})
# Calls that write into their first argument.
WRITING = frozenset({"setattr", "delattr", "__setitem__", "__delitem__"})
# Functions called by bare name that never write into what they are given: any other (the
# user's ``helper(output)``) may, and a hook handing it an argument may change outputs.
READING = frozenset({
    "print", "len", "id", "type", "isinstance", "repr", "str", "int", "float", "bool",
    "tuple", "list", "dict", "set", "frozenset", "sorted", "min", "max", "sum", "any", "all",
    "abs", "round", "hash", "getattr", "hasattr", "format", "enumerate", "zip", "range",
})


def is_diagql_hook(hook) -> bool:
    """Whether the hook is one of DiagQL's own (a pass's), which no digest takes."""
    function, _ = _function_of(hook)
    return (getattr(function, "__module__", None) or "").split(".")[0] == "diagql"


def users_changing(hook) -> bool:
    """Whether ``hook`` is the user's, not DiagQL's, and may change what its module returns
    (an ablation's): what keys the cache and what checkpoints' copies take."""
    return not is_diagql_hook(hook) and may_change_outputs(hook)


def may_change_outputs(hook) -> bool:
    """Whether calling ``hook`` as a forward (pre-)hook may change what its module returns."""
    function, skip_first = _function_of(hook)
    if function is None:
        return True
    return _judged(function.__code__, skip_first, function)


def _function_of(hook) -> tuple[types.FunctionType | None, bool]:
    """The function a hook runs, and whether its first parameter is an instance's ``self``."""
    skip_first = False
    while isinstance(hook, functools.partial):
        hook = hook.func
    if isinstance(hook, types.MethodType):
        hook, skip_first = hook.__func__, True  # ``self`` is the recorder, not an argument
    elif not isinstance(hook, types.FunctionType):
        hook, skip_first = getattr(type(hook), "__call__", None), True
    return (hook if isinstance(hook, types.FunctionType) else None), skip_first


_JUDGED: dict = {}  # (code, skip_first) -> bool: before every statement, each hook is judged


def _judged(code: types.CodeType, skip_first: bool, hook: types.FunctionType) -> bool:
    key = (code, skip_first)
    if key not in _JUDGED:
        _JUDGED[key] = _judge(hook, skip_first)
    return _JUDGED[key]


def _judge(hook: types.FunctionType, skip_first: bool) -> bool:
    code = hook.__code__
    names = list(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount +
                                  bool(code.co_flags & inspect.CO_VARARGS) +
                                  bool(code.co_flags & inspect.CO_VARKEYWORDS)])
    arguments = set(names[1:] if skip_first else names)
    scope = hook.__globals__
    if code.co_name == "<lambda>":
        body = _lambda_body(code)
        if not (isinstance(body, ast.Call) and _called_name(body) in NONE_RETURNING):
            return True  # it returns what its body gives
        return _writes(body, arguments, scope)
    node = _definition(hook)
    if node is None:
        return True
    # Writes are looked for everywhere in its body, functions defined inside it too (one may
    # write into the output it closes over); returns only in its own code. A name given
    # anything made of an argument may be the argument itself: ``acts = output[0]``,
    # ``for row in output``, ``x = output.detach()`` (the same storage) write into it too.
    reach = _aliases(node, arguments)
    return any(_returns_value(n) for n in _own_nodes(node)) or \
        any(_writes(statement, reach, scope) for statement in node.body)


def _aliases(node: ast.AST, arguments: set[str]) -> set[str]:
    """The arguments and every name bound to an expression that mentions one of them (by
    assignment, a for loop, ``with ... as``, ``:=``), to a fixed point."""
    reach = set(arguments)
    bindings = []
    for n in ast.walk(node):
        if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.NamedExpr)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            bindings.append((targets, n.value))
        elif isinstance(n, (ast.For, ast.AsyncFor, ast.comprehension)):
            bindings.append(([n.target], n.iter))
        elif isinstance(n, ast.withitem) and n.optional_vars is not None:
            bindings.append(([n.optional_vars], n.context_expr))
    grew = True
    while grew:
        grew = False
        for targets, value in bindings:
            if value is None or not any(isinstance(v, ast.Name) and v.id in reach
                                        for v in ast.walk(value)):
                continue
            for name in _bound_names(targets):
                if name not in reach:
                    reach.add(name)
                    grew = True
    return reach


def _bound_names(targets) -> list[str]:
    """The names a binding's targets bind (``a``, ``a, *b``), not those it writes into
    (``store[key] = output`` writes into ``store``, which stays what it was)."""
    names = []
    for target in targets:
        if isinstance(target, ast.Starred):
            target = target.value
        if isinstance(target, ast.Name):
            names.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            names.extend(_bound_names(target.elts))
    return names


def _lambda_body(code: types.CodeType) -> ast.expr | None:
    """A lambda's body, parsed from the source span its instructions cover (several lambdas
    on one line, or one inside a call's arguments, are told apart so), or None."""
    # RESUME's and the like's are empty (line 3, column 0 to 0).
    spans = [p for p in code.co_positions() if None not in p and (p[0], p[2]) != (p[1], p[3])]
    lines = linecache.getlines(code.co_filename)
    if not spans or not lines:
        return None
    (line, col), (end_line, end_col) = min((p[0], p[2]) for p in spans), \
        max((p[1], p[3]) for p in spans)
    if end_line > len(lines):
        return None
    # Positions count UTF-8 bytes.
    text = [lines[n - 1].encode() for n in range(line, end_line + 1)]
    text[-1] = text[-1][:end_col]
    text[0] = text[0][col:]
    try:
        return ast.parse(b"".join(text).decode().strip(), mode="eval").body
    except (SyntaxError, UnicodeDecodeError):
        return None


def _definition(fn: types.FunctionType) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The ``def`` node of ``fn``, or None (no source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    found = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
             and n.name == fn.__code__.co_name]
    return found[0] if found else None


def _own_nodes(fn: ast.AST):
    """The nodes of a function's body, not those of functions or classes defined inside it."""
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not isinstance(
            child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)))


def _returns_value(node: ast.AST) -> bool:
    return isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom)) and node.value is not None \
        and not (isinstance(node.value, ast.Constant) and node.value.value is None)


def _writes(node: ast.AST, arguments: set[str], scope: dict | None = None) -> bool:
    """Whether ``node``, or anything in it, writes into an argument (``scope``: the hook's
    globals, where a called ``helpers.zero(output)`` is found to be the user's)."""
    for n in ast.walk(node):
        targets = []
        if isinstance(n, (ast.Assign, ast.Delete)):
            targets = n.targets
        elif isinstance(n, (ast.AugAssign, ast.AnnAssign)):
            targets = [n.target]
        if any(isinstance(t, (ast.Subscript, ast.Attribute)) and _root(t) in arguments
               for t in targets):
            return True
        if isinstance(n, ast.Call):
            name = _called_name(n)
            receiver = n.func.value if isinstance(n.func, ast.Attribute) else None
            inplace = name.endswith("_") and not name.startswith("__")
            if receiver is not None and _root(receiver) in arguments and (
                    inplace or name in WRITING):
                return True  # output.mul_(0), output[:, 3].zero_(), args.__setitem__(...)
            first = n.args[0] if n.args else None
            if (inplace or name in WRITING) and first is not None and \
                    _root(first) in arguments:
                return True  # torch.nn.init.zeros_(output), setattr(module, "w", ...)
            if any(k.arg == "out" and _root(k.value) in arguments for k in n.keywords):
                return True
            given = any(_root(a) in arguments for a in (*n.args, *(k.value for k in n.keywords)))
            if given and any(k.arg == "inplace" and not (isinstance(k.value, ast.Constant)
                                                        and not k.value.value)
                             for k in n.keywords):
                return True  # F.relu(output, inplace=True)
            module = (scope or {}).get(_root(receiver)) if given and receiver is not None \
                else None
            if isinstance(module, types.ModuleType) and user_module(module):
                return True  # helpers.zero_unit(output, 3): the user's function may write
            if given and isinstance(n.func, ast.Name) and name not in READING:
                return True  # helper(output): the user's function may write into it
    return False


def _called_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _root(node: ast.AST) -> str | None:
    """The name an expression such as ``output[0].data`` starts from."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None
