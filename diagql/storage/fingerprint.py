"""Fingerprints that key the disk cache: digests of what decides a model's outputs and of a data
set's items, so that a changed model or data set never reuses a stale entry. XXH3-128, fast
enough for every new session to hash its data (docs/ARCHITECTURE.md, "Storage").

Why this module is long: the model's walk and the data's forms feed one digest the same way
(length-prefixed parts, tensors and arrays by their bytes in fixed pieces); split, they would
share those private feeders across modules."""
from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import inspect
import itertools
import json
import os
import struct
import types
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from diagql.storage.code_reads import (globals_read, globals_written, modules_imported,
                                      user_code, user_module, user_path)
from diagql.storage.hook_effects import users_changing


class Unfingerprintable(Exception):
    """Some of what decides a model's outputs or a data set's items cannot be seen whole, so no
    digest can stand for it and it must not be cached on disk. The message says what."""


def cache_key(*parts) -> str:
    """A file-name-safe key for JSON-able parts (fingerprints, settings, sampler specs)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(model, code: bool | str = True) -> str:
    """A digest of what decides the model's outputs; raises Unfingerprintable when some of it
    cannot be seen whole (two models that differ there would share the digest).

    Covered: every parameter and buffer and the extra state; the class of every module with
    the source of every non-torch class in its MRO (a changed forward() must not reuse a
    stale profile), or its code where it has no source (defined at a prompt); and each
    module's attributes (``LeakyReLU.negative_slope``, a custom ``self._scale``, a config
    object, a ``functools.partial``, a function with its defaults and closure), followed
    through containers and plain objects. Torch's own classes, and their private attributes,
    are covered by torch's version; and the globals that the user's own code reads (a helper
    function, a constant, a class attribute: storage/code_reads.py), followed where they can
    be seen whole (``code=False``: not these, nor the user's classes' attributes;
    ``code="scalars"``: those that are numbers, strings or functions only); and the
    forward hooks that can change its outputs, by their code (``hooks_digest``).
    Not covered: the globals of installed packages' code.
    """
    import torch

    digest = xxhash.xxh3_128()
    _feed(digest, "torch", torch.__version__)
    try:
        _Walk(code).modules(digest, model, "")
    except RecursionError:
        raise Unfingerprintable("the model's attributes are nested too deeply to hash") from None
    _feed(digest, "hooks", hooks_digest(model))
    return digest.hexdigest()


def scores_fingerprint(fn, code: bool | str = True) -> str:
    """A digest of the user's scores= function, as a model attribute's (named ``scores``, as
    the cache keys have it): its code, defaults, closure and the values its code reads
    (``code`` as model_fingerprint's: "scalars" for a statement's stamp); raises
    Unfingerprintable as model_fingerprint."""
    import torch

    holder = torch.nn.Module()
    holder.scores = fn
    return model_fingerprint(holder, code=code)


HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks")


def code_digest(functions) -> str:
    """A digest of functions (or callable objects) and what they read, for a statement's
    stamp of the data (session/changes.py: a DataLoader's collate_fn, a Dataset's
    __getitem__): a function by its code, the plain values of its defaults and closure
    (numbers, strings, tensors, arrays, tuples and dicts of them: not a list it appends its
    calls to) and the globals its code reads as a model's stamp takes them (numbers, strings,
    functions, small containers: ``STAMP_VALUES``); a callable object by its contents when it
    holds at most STAMP_VALUES values (a collator holding a tokenizer is "unseen": a walk per
    statement would cost more than the statement)."""
    digest = xxhash.xxh3_128()
    for i, fn in enumerate(functions):
        name, part = f"function {i}", xxhash.xxh3_128()
        walk = _Walk(code="scalars")
        walk.limit = STAMP_VALUES
        try:
            if isinstance(fn, types.FunctionType):
                walk.code(part, name, fn.__code__)
                walk.plain(part, name, (fn.__defaults__, fn.__kwdefaults__))
                for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
                    try:
                        walk.plain(part, f"{name}.<closure {var}>", cell.cell_contents)
                    except ValueError:  # not yet assigned
                        _feed(part, name, "empty cell", var)
                walk.globals_of(part, name, fn)
                found = part.hexdigest()
            else:
                found = walk.digest_of(name, fn) if _small_enough(fn) else "unseen"
        except (_Opaque, RecursionError, TypeError, ValueError, RuntimeError):
            found = "unseen"
        _feed(digest, found)
    return digest.hexdigest()


def globals_digests(functions, shipped: bool = False) -> dict[str, str]:
    """Each global that the user's ``functions`` read (storage/code_reads.py), as
    ``module.name``, to its digest as a statement's stamp takes it (numbers, strings,
    functions, small containers; a larger value by its type, one that cannot be seen
    "unseen"), and each of the user's modules they import themselves (``<import cfg>``);
    not a container or a plain value that the functions change themselves
    (``globals_written``: a cache, a counter, a lazy singleton), whose value is what the
    process has run. What a Ray worker, which imports the user's modules afresh, must read
    alike (engine/ray_workers.py): a global set at run time on the driver is not its.
    ``shipped``: as Ray's pickler ships code: the script's own (``__main__``'s) functions and
    classes go by value, with the plain values they read then, which a worker reads as the
    driver had them; what they read of the user's modules is imported there afresh: only
    that is compared for them, their own functions followed (``_shipped_reads``). Walked
    whole, a script's classes digested otherwise on a worker, which holds them without
    their source, and every global had been said to differ (sweeps SX8, SX9)."""
    walk = _Walk(code="scalars")
    walk.limit = STAMP_VALUES
    found: dict[str, str] = {}
    queue, seen = list(functions), set()
    while queue:
        fn = queue.pop(0)
        if not isinstance(fn, types.FunctionType) or fn.__code__ in seen:
            continue
        seen.add(fn.__code__)
        module = fn.__globals__.get("__name__", "?")
        written = globals_written(fn.__code__)
        for var, value, feed in walk.reads_of(fn):
            if f"{module}.{var}" in found or var in written and not isinstance(
                    value, (types.ModuleType, type, types.FunctionType)):
                continue
            if shipped and module == "__main__":
                followed = _shipped_reads(value)
                if followed is not None:
                    queue.extend(followed)
                    continue
            part = xxhash.xxh3_128()
            try:
                feed(part, "")
                found[f"{module}.{var}"] = part.hexdigest()
            except (_Opaque, RecursionError, TypeError, ValueError, RuntimeError, OSError):
                found[f"{module}.{var}"] = "unseen"
    return found


def _shipped_reads(value) -> list | None:
    """How a global that the script's own code reads is compared with a Ray worker's: None
    where it is (a user's module, or a function or class of one, which a worker imports
    afresh); else the functions to follow instead (a function or class of the script's own,
    shipped by value: its functions), or none (a plain value, shipped as it was; torch's and
    other installed code)."""
    if isinstance(value, types.ModuleType):
        return None if user_module(value) else []
    if isinstance(value, (types.FunctionType, type)):
        if getattr(value, "__module__", None) == "__main__":
            return [value] if isinstance(value, types.FunctionType) else \
                _class_functions(value)
        own = user_code(value.__code__) if isinstance(value, types.FunctionType) else \
            _user_class(value)
        return None if own else []
    return []


def model_functions(model, script: bool = False) -> list:
    """The functions of the user's own classes among a model's modules and their bases;
    ``script``: a class of the running script's too (``__main__``), which a Ray worker holds
    without its source file (its reads had been none there, every one the driver's said to
    differ: sweep SX8)."""
    classes = {}
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls is not object and not _from_torch(cls) and (
                    _user_class(cls) or script and cls.__module__ == "__main__"):
                classes.setdefault(cls, None)
    return [fn for cls in classes for fn in _class_functions(cls)]


def _class_functions(cls: type) -> list:
    """The Python functions a class's own attributes run (``_functions`` of each)."""
    return [fn for item in cls.__dict__.values() for fn in _functions(item)]


def item_functions(data, script: bool = False) -> list:
    """The user's code that makes a data set's items: a DataLoader's own collate_fn, the
    __getitem__ of a Dataset of the user's own class, its transforms (``script``: as
    ``model_functions``')."""
    from torch.utils.data import DataLoader, default_collate

    functions = []
    if isinstance(data, DataLoader):
        if data.collate_fn is not default_collate:
            functions.append(data.collate_fn)
        data = data.dataset
    getitem = getattr(type(data), "__getitem__", None)
    if isinstance(getitem, types.FunctionType) and (user_code(getitem.__code__) or script and
                                                    getitem.__module__ == "__main__"):
        functions.append(getitem)
    for name in ("transform", "target_transform"):
        try:
            found = getattr(data, name, None)
        except Exception:  # noqa: BLE001 - the user's __getattr__ raised: nothing to stamp
            found = None
        if callable(found):
            functions.append(found)
    return functions


def hooks_digest(model) -> str:
    """A digest of the forward hooks that can change what the model returns
    (storage/hook_effects.py): those on its modules and torch's global ones, not DiagQL's
    own and not those that only count or record; "" when there are none. A hook is
    hashed by its code and the plain values it was given (numbers, strings, tensors, in its
    defaults, closure or ``functools.partial`` arguments), not by the state it keeps: an
    ablation's hook keys its own cache entries, and a hook that counts calls into a list
    keeps one digest however many it has counted (docs/ARCHITECTURE.md, "Storage"). Only a
    hook that may change outputs is hashed at all, and its state with it: the globals it reads,
    its closure's lists and objects, its instance's attributes (``UNIT`` a global an ablation
    zeroes: changed, its answers had been the old unit's)."""
    from torch.nn.modules import module as torch_module

    named = list(model.named_modules())
    owners = [("<global>", {kind: getattr(torch_module, f"_global{kind}", None)
                            for kind in HOOK_TABLES})]
    owners += [(name, {kind: getattr(module, kind, None) for kind in HOOK_TABLES})
               for name, module in named]
    digest = None
    walk = _Walk(code=False)
    # The model's own modules met in a hook's state are named, not hashed again (the model is
    # stamped apart): a hook closing over the model costs no walk of its weights.
    walk.module_names = {id(module): name for name, module in named}
    for (name, tables), kind in itertools.product(owners, HOOK_TABLES):
        for hook in list((tables[kind] or {}).values()):
            if not users_changing(hook):
                continue
            digest = digest or xxhash.xxh3_128()
            _feed(digest, name, kind)
            walk.hook(digest, f"{name}<{kind}>", hook)
    return "" if digest is None else digest.hexdigest()


def data_fingerprint(data, columns: tuple[dict, object] | None = None,
                     indices=None) -> str:
    """A digest of the items; raises Unfingerprintable where it cannot be exact.

    Exact: a pair (X, y) of tensors or arrays (y None for data without labels), a
    TensorDataset, and a DataLoader over a TensorDataset with the default collate (items are
    read by index, so the loader's order does not matter); and data given as columns (a
    mapping of arrays, or a pair of one and the labels: a tokenizer's output), whose
    ``columns`` (ItemSource.columns: each input column as read, by name, and the labels, the
    label key chosen) are hashed. Any other
    Dataset can change, or read files, without us knowing. ``indices``: the items of the
    loader's dataset that its sampler yields (ItemSource.indices; None: all of them).
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset, default_collate

    from diagql.model.data_forms import unlabelled_items

    unread = unlabelled_items(data)  # (items, None): the items, their labels left unread
    if unread:
        data = data[0]
    if columns is not None:
        inputs, labels = columns
        digest = xxhash.xxh3_128()
        _feed(digest, "columns", str(len(inputs)))
        for key in sorted(inputs):
            _feed_tensor(digest, f"column {key!r}", inputs[key])
        _feed(digest, "labels", "none" if labels is None else "given")
        if labels is not None:
            _feed_tensor(digest, "labels", torch.as_tensor(labels))
        return digest.hexdigest()
    if isinstance(data, DataLoader):
        if data.collate_fn is not default_collate:
            raise Unfingerprintable("a DataLoader with its own collate_fn cannot be hashed "
                                    "exactly: its batches are whatever that function makes")
        data = data.dataset
    if type(data) is TensorDataset:
        parts = list(data.tensors)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        parts = list(data)
    else:
        raise Unfingerprintable(f"data of type {type(data).__name__} cannot be hashed exactly "
                                f"(only a pair (X, y), a TensorDataset, a DataLoader over one, "
                                f"or columns: a mapping of arrays, alone or beside the labels)")
    digest = xxhash.xxh3_128()
    if unread:
        _feed(digest, "labels", "unread")
    if indices is not None:
        _feed_array(digest, "items", np.asarray(indices, dtype=np.int64))
    for i, part in enumerate(parts):
        try:
            if part is None and i == 1:  # (X, None): data without labels, a key of its own
                _feed(digest, f"part {i}", "none")
            elif isinstance(part, torch.Tensor):
                _feed_tensor(digest, f"part {i}", part)
            else:
                _feed_array(digest, f"part {i}", np.asarray(part))
        except (ValueError, TypeError) as exc:
            raise Unfingerprintable(f"part {i} of the data is not an array: {exc}") from None
        except _Opaque as exc:
            raise Unfingerprintable(f"part {i} of the data holds {exc.what}") from None
    return digest.hexdigest()


def source_digest(obj) -> str:
    """The digest of a class's or function's source, or "" when it has none (defined at the
    prompt). Torch's own code is covered by torch's version instead (and is slow to parse).
    An installed package's is its whole file's: finding one class's source parses its file
    (a tiny BERT's 21 classes took 2-7 s), and the file changes only when the package does."""
    if _from_torch(obj):
        return ""
    try:
        return _source_digest(obj)
    except TypeError:  # unhashable callable
        return _source_digest.__wrapped__(obj)


@functools.lru_cache(maxsize=512)
def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return xxhash.xxh3_128(f.read()).hexdigest()
    except OSError:
        return ""


@functools.lru_cache(maxsize=512)
def _source_digest(obj) -> str:
    # Memoized per object: the file lookup runs for every class of every fingerprint (each
    # statement's stamp), getsource parses the whole file, and an object's code is fixed.
    try:
        path = inspect.getsourcefile(obj)
    except (TypeError, OSError, ValueError):  # built in, or defined at a prompt (python -c,
        path = None  # IPython)
    if path is not None and not user_path(path):
        return _file_digest(path)
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError, ValueError):  # ValueError: a __wrapped__ chain that loops
        return ""
    return hashlib.sha256(source.encode()).hexdigest()


# --- walking a model's values -------------------------------------------------------------------

_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_MAX_DEPTH = 100  # containers and objects nested in one attribute; deeper cannot be hashed
_MAX_VALUES = 1_000_000  # values hashed for one model, so that a huge object graph fails fast
_PLAIN = (types.NoneType, bool, int, float, complex, str, bytes, range, slice,
          types.EllipsisType, types.NotImplementedType)
_DESCRIPTORS = (types.MethodDescriptorType, types.WrapperDescriptorType,
                types.ClassMethodDescriptorType, types.GetSetDescriptorType,
                types.MemberDescriptorType)
# Kept by Python for a class, not behaviour: left out when a class's body is hashed.
_CLASS_BOOKKEEPING = frozenset({
    "__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__",
    "__slots__", "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__",
    "__abstractmethods__", "_abc_impl", "__dataclass_fields__", "__dataclass_params__",
    "__match_args__"})
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement, not built into C
_POINTER = struct.calcsize("P")


class _Opaque(Exception):
    """A value whose content cannot be seen; the module walk adds whose attribute it was."""

    def __init__(self, path: str, what: str):
        super().__init__(path, what)
        self.path, self.what = path, what


class _Walk:
    """One model's modules and the values they hold, hashed in a fixed order.

    Modules and state tensors met again inside attributes are hashed as references to their
    names, and a value met again inside itself as a back reference, so a graph with cycles
    hashes alike each time and finishes.
    """

    def __init__(self, code: bool | str = True):
        # The globals and class attributes the user's code reads; "scalars": only those that
        # are numbers, strings or functions (a statement's stamp: no large global's walk).
        self.follow_code = bool(code)
        self.scalars_only = code == "scalars"
        self.module_names: dict[int, str] = {}
        self.tensor_names: dict[int, str] = {}
        self.stack: list[int] = []  # ids of the values being hashed, outermost first
        self.values = 0
        self.limit = _MAX_VALUES
        # (id of a namespace or class, a name) -> its digest, or "cycle" while it is hashed
        self.globals_seen: dict[tuple[int, str], str] = {}

    def modules(self, digest, root, prefix: str) -> None:
        import torch

        from diagql.model.hooks import compiled_original

        named = list(root.named_modules(prefix=prefix))
        state = root.state_dict(keep_vars=True, prefix=f"{prefix}." if prefix else "")
        # Non-persistent buffers are left out of state_dict but still shape the outputs.
        state.update((name, buf) for name, buf in root.named_buffers(prefix=prefix)
                     if name not in state)
        for name, module in named:
            self.module_names.setdefault(id(module), name)
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                self.tensor_names.setdefault(id(value), name)

        classes = {}
        for name, module in named:
            classes.setdefault(type(module), name)
            for base in type(module).__mro__[1:]:
                if not _from_torch(base) and base is not object:
                    classes.setdefault(base, name)
            _feed(digest, "module", name, _qualname(type(module)))
            if compiled_original(module) is not None:
                # A torch.compile'd part: its original module is its child ``_orig_mod``,
                # hashed as any module; its own attributes are dynamo's callables.
                continue
            if isinstance(module, torch.jit.ScriptModule):
                # TorchScript: its compiled code is what runs (its attributes are bindings to
                # it); its parameters and buffers are in ``state``.
                _feed(digest, "script", name, _script_code(module))
                continue
            for attr, value in _attributes(module):
                path = f"{name}.{attr}"
                with _blame(f"attribute {attr!r} of {_module_label(name, root)}", path):
                    self.value(digest, path, value)
        for cls, name in classes.items():
            with _blame(f"the class {cls.__qualname__} of {_module_label(name, root)}", ""):
                self.cls(digest, None, "source", cls)
        for name, value in state.items():
            with _blame(f"the parameter, buffer or extra state {name!r}", name):
                if isinstance(value, torch.Tensor):
                    _feed_tensor(digest, name, value)
                else:
                    self.value(digest, name, value)

    def value(self, digest, name: str, value) -> None:
        import torch
        from torch import nn

        self.values += 1
        if self.values > self.limit:
            raise _Opaque(name, f"more than {self.limit} values")
        if isinstance(value, torch.Tensor):
            if id(value) in self.tensor_names:
                _feed(digest, name, "state", self.tensor_names[id(value)])
            else:
                _feed_tensor(digest, name, value)
        elif isinstance(value, np.ndarray):
            _feed_array(digest, name, value)
        elif isinstance(value, enum.Enum):
            cls = type(value)
            _feed(digest, name, "enum", _qualname(cls), source_digest(cls), value.name)
            self.value(digest, f"{name}.value", value.value)
        elif isinstance(value, (*_PLAIN, np.generic, np.dtype)):
            _feed(digest, name, repr(value))
            if type(value) not in _PLAIN and not isinstance(value, (np.generic, np.dtype)):
                _feed(digest, name, _qualname(type(value)))  # a subclass: its class, attributes
                self.value(digest, f"{name}.__dict__", dict(getattr(value, "__dict__", {})))
        elif isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            _feed(digest, name, repr(value))
        elif isinstance(value, types.ModuleType):
            _feed(digest, name, "python module", value.__name__)  # its globals: not covered
        elif isinstance(value, nn.Module) and id(value) in self.module_names:
            _feed(digest, name, "module", self.module_names[id(value)])
        elif id(value) in self.stack:
            _feed(digest, name, "cycle", str(len(self.stack) - self.stack.index(id(value))))
        else:
            if len(self.stack) >= _MAX_DEPTH:
                raise _Opaque(name, f"values nested more than {_MAX_DEPTH} deep")
            self.stack.append(id(value))
            try:
                self.composite(digest, name, value)
            finally:
                self.stack.pop()

    def composite(self, digest, name: str, value) -> None:
        """A value that holds other values (and so may hold itself)."""
        from torch import nn

        if isinstance(value, nn.Module):  # in no state_dict: not registered as a submodule
            _feed(digest, name, "unregistered module")
            self.modules(digest, value, name)
        elif isinstance(value, (tuple, list)):
            _feed(digest, name, type(value).__name__, str(len(value)))
            for i, item in enumerate(value):
                self.value(digest, f"{name}[{i}]", item)
            self.subclass_attributes(digest, name, value)
        elif isinstance(value, dict):
            # In insertion order: code that iterates over a dict sees that order.
            _feed(digest, name, "dict", str(len(value)))
            if type(value) is not dict:
                _feed(digest, name, _qualname(type(value)))
            if isinstance(value, defaultdict):
                self.value(digest, f"{name}.default_factory", value.default_factory)
            for i, (key, item) in enumerate(value.items()):
                shown = repr(key) if isinstance(key, (str, int)) else f"<key {i}>"
                self.value(digest, f"{name}<key {i}>", key)
                self.value(digest, f"{name}[{shown}]", item)
            self.subclass_attributes(digest, name, value)
        elif isinstance(value, (set, frozenset)):
            # Iteration order follows hashes, which vary between processes: sort by content.
            _feed(digest, name, type(value).__name__, str(len(value)))
            for item_digest in sorted(self.digest_of(f"{name}{{item}}", item) for item in value):
                _feed(digest, item_digest)
        elif isinstance(value, functools.partial):
            _feed(digest, name, "partial")
            self.value(digest, f"{name}.func", value.func)
            self.value(digest, f"{name}.args", value.args)
            self.value(digest, f"{name}.keywords", value.keywords)
            self.value(digest, f"{name}.__dict__", dict(vars(value)))
        elif isinstance(value, types.FunctionType):
            self.function(digest, name, value)
        elif isinstance(value, (types.MethodType, types.MethodWrapperType)):
            _feed(digest, name, "method", value.__name__)
            self.value(digest, f"{name}.__func__", getattr(value, "__func__", None))
            self.value(digest, f"{name}.__self__", value.__self__)
        elif isinstance(value, types.BuiltinFunctionType):
            _feed(digest, name, "builtin", _qualname(value))
            owner = value.__self__
            if not (owner is None or isinstance(owner, (types.ModuleType, type))):
                self.value(digest, f"{name}.__self__", owner)  # a bound method: its object
        elif isinstance(value, np.ufunc):
            _feed(digest, name, "ufunc", value.__name__)
        elif isinstance(value, _DESCRIPTORS):
            _feed(digest, name, "descriptor", _qualname(value.__objclass__), value.__name__)
        elif isinstance(value, (staticmethod, classmethod)):
            _feed(digest, name, type(value).__name__)
            self.value(digest, f"{name}.__func__", value.__func__)
        elif isinstance(value, property):
            _feed(digest, name, "property")
            for part in ("fget", "fset", "fdel"):
                self.value(digest, f"{name}.{part}", getattr(value, part))
        elif isinstance(value, type):
            self.cls(digest, name, "type", value, guarded=True)
        elif isinstance(value, (types.GenericAlias, types.UnionType)):  # list[int], int | None
            _feed(digest, name, type(value).__name__)
            self.value(digest, f"{name}.__origin__", getattr(value, "__origin__", None))
            self.value(digest, f"{name}.__args__", value.__args__)
        else:
            self.instance(digest, name, value)

    def function(self, digest, name: str, fn: types.FunctionType) -> None:
        """Its code, and what the code reads besides its arguments: defaults and closure."""
        _feed(digest, name, "function", _qualname(fn), source_digest(fn))
        if not _from_torch(fn):  # torch's own code: covered by torch's version
            # Code as well as source: two lambdas on one line share their source text.
            self.code(digest, name, fn.__code__)
            self.globals_of(digest, name, fn)
        self.value(digest, f"{name}.__defaults__", fn.__defaults__)
        self.value(digest, f"{name}.__kwdefaults__", fn.__kwdefaults__)
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                contents = cell.cell_contents
            except ValueError:  # not yet assigned
                _feed(digest, name, "empty cell", var)
                continue
            self.value(digest, f"{name}.<closure {var}>", contents)
        self.value(digest, f"{name}.__dict__", dict(vars(fn)))

    def hook(self, digest, name: str, hook) -> None:
        """A hook by its code and the plain values bound to it (``hooks_digest``)."""
        while isinstance(hook, functools.partial):
            _feed(digest, name, "partial")
            self.plain(digest, name, (hook.args, tuple(sorted(hook.keywords.items()))))
            hook = hook.func
        if isinstance(hook, types.MethodType):  # its instance is state, its class is code
            _feed(digest, name, "method of", _qualname(type(hook.__self__)))
            self.state(digest, f"{name}.self", hook.__self__)  # the model's own: by name
            hook = hook.__func__
        if not isinstance(hook, types.FunctionType):  # a callable object
            _feed(digest, name, "callable", _qualname(type(hook)))
            self.state(digest, f"{name}.self", hook)
            hook = getattr(type(hook), "__call__", None)
            if not isinstance(hook, types.FunctionType):
                return
        _feed(digest, name, "function", _qualname(hook))
        self.code(digest, name, hook.__code__)
        self.plain(digest, name, (hook.__defaults__, hook.__kwdefaults__))
        for var, cell in zip(hook.__code__.co_freevars, hook.__closure__ or ()):
            try:
                self.state(digest, f"{name}.<closure {var}>", cell.cell_contents)
            except ValueError:  # not yet assigned
                _feed(digest, name, "empty cell", var)
        for var, value in globals_read(hook.__code__, hook.__globals__):
            if not isinstance(value, (types.ModuleType, types.FunctionType, type)):
                self.state(digest, f"{name}.<global {var}>", value)

    def state(self, digest, name: str, value) -> None:
        """A value an output-changing hook reads, by its contents where they can be seen
        (``value``: lists, objects, tensors), else as ``plain`` sees it."""
        part = xxhash.xxh3_128()
        values, stack = self.values, list(self.stack)
        try:
            self.value(part, name, value)
        except (_Opaque, Unfingerprintable, RecursionError, TypeError, ValueError):
            self.values, self.stack = values, stack
            try:
                self.plain(digest, name, value)
            except (TypeError, ValueError, RuntimeError):  # a lazy module's parameter
                _feed(digest, name, "of type", _qualname(type(value)))
            return
        _feed(digest, name, part.hexdigest())

    def plain(self, digest, name: str, value) -> None:
        """A value by its contents where it is a number, string, tensor or array, or a tuple
        or dict of them (what parameterises a hook); anything else by its type alone."""
        import torch

        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            _feed(digest, name, type(value).__name__, repr(value))
        elif isinstance(value, torch.Tensor) and value.layout == torch.strided and \
                value.device.type != "meta":
            _feed_tensor(digest, name, value.detach())
        elif isinstance(value, np.ndarray) and value.dtype != object:
            _feed_array(digest, name, value)
        elif isinstance(value, (tuple, frozenset)) or type(value) is dict:
            items = value.items() if isinstance(value, dict) else enumerate(
                sorted(value, key=repr) if isinstance(value, frozenset) else value)
            _feed(digest, name, type(value).__name__, str(len(value)))
            for key, item in items:
                self.plain(digest, f"{name}[{key!r}]", item)
        else:
            _feed(digest, name, "of type", _qualname(type(value)))

    def globals_of(self, digest, name: str, fn: types.FunctionType) -> None:
        """The globals the user's function reads, each fed once per walk (``reads_of``)."""
        if self.follow_code:
            for _, _, feed in self.reads_of(fn):
                feed(digest, name)

    def reads_of(self, fn: types.FunctionType):
        """(name, value, feed) for each global the user's function reads
        (storage/code_reads.py) and each of the user's modules it imports itself
        (``modules_imported``: one imported already by its attributes the code reads, as a
        global module's; one not yet by its file); ``feed(digest, name)`` hashes that read.
        One that cannot be seen whole (a logger, a generator) is named, not hashed: it must
        not keep the whole model from the cache."""
        if not user_code(fn.__code__):
            return
        code = fn.__code__
        for var, value in globals_read(code, fn.__globals__):
            def feed(digest, name, var=var, value=value):
                self.global_value(digest, name, id(fn.__globals__), var, value)
                self.module_reads(digest, name, code, var, value, depth=3)
            yield var, value, feed
        for var, module in modules_imported(code, fn.__globals__):
            if isinstance(module, str):  # not imported yet: its file, read as it is now
                def feed(digest, name, var=var, path=module):
                    _feed(digest, name, "import", var, _file_digest.__wrapped__(path))
            else:
                def feed(digest, name, var=var, module=module):
                    self.module_reads(digest, name, code, f"<import {var}>", module, depth=3)
            yield f"<import {var}>", module, feed

    def module_reads(self, digest, name: str, code, var: str, value, depth: int) -> None:
        """settings.SCALE, pkg.ops.f: the names the code reads as attributes, looked up in
        the user's modules it reaches (a few levels down)."""
        if depth and isinstance(value, types.ModuleType) and user_module(value):
            for attr, item in globals_read(code, vars(value), attributes=True):
                self.global_value(digest, name, id(value), f"{var}.{attr}", item)
                self.module_reads(digest, name, code, f"{var}.{attr}", item, depth - 1)

    def global_value(self, digest, name: str, scope: int, var: str, value) -> None:
        """A global (or class attribute) by its own digest, computed once per walk and fed
        alike wherever it is met, so that a digest does not depend on where it was met
        first (the items of a set are hashed in an order of their own)."""
        known = self.globals_seen.get((scope, var))
        if known is not None:
            _feed(digest, name, "global", var, known)
            return
        self.globals_seen[(scope, var)] = "cycle"
        if callable(value) and hasattr(value, "__wrapped__"):  # functools.cache, wraps
            try:
                value = inspect.unwrap(value)
            except ValueError:  # a chain of wrappers that loops (a mock's __getattr__)
                pass
        counted = self.values
        try:
            if self.scalars_only and not isinstance(value, (*_SCALARS, types.FunctionType,
                                                            types.ModuleType)) \
                    and not _small_enough(value):
                found = f"a {_qualname(type(value))}"  # a vocabulary: not walked each time
            else:
                found = self.digest_of(f"{name}<{var}>", value)
        except _Opaque:
            self.values, found = counted, "unseen"
        self.globals_seen[(scope, var)] = found
        _feed(digest, name, "global", var, found)

    def code(self, digest, name: str, code: types.CodeType) -> None:
        # What runs, without the file name and line numbers, which move without changing it.
        _feed(digest, name, "code", json.dumps([
            code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags,
            code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars]))
        _feed(digest, code.co_code)
        for i, const in enumerate(code.co_consts):
            if isinstance(const, types.CodeType):
                self.code(digest, f"{name}<const {i}>", const)
            else:
                self.value(digest, f"{name}<const {i}>", const)

    def cls(self, digest, name: str | None, tag: str, cls: type, guarded: bool = False) -> None:
        """A class by its name and source; one with no source (defined at a prompt) by its
        body: its bases and what it defines, methods hashed by their code. ``guarded``: the
        caller has it on the stack already."""
        source = source_digest(cls)
        _feed(digest, *([] if name is None else [name]), tag, _qualname(cls), source)
        if source and self.follow_code and _user_class(cls):
            # What its source does not show: attributes set at run time (Net.SCALE = 3), a
            # decorated method's inner function and the globals its methods read.
            for key, item in cls.__dict__.items():
                if key not in _CLASS_BOOKKEEPING:
                    for i, part in enumerate(_functions(item) or [item]):
                        self.global_value(digest, _qualname(cls), id(cls), f"{key}#{i}", part)
        if source or not _is_python_class(cls):
            return
        name = name or _qualname(cls)
        if guarded:
            self.body(digest, name, cls)
        elif id(cls) in self.stack:  # a method's __class__ cell (super()) leads back here
            _feed(digest, name, "cycle", str(len(self.stack) - self.stack.index(id(cls))))
        else:
            self.stack.append(id(cls))
            try:
                self.body(digest, name, cls)
            finally:
                self.stack.pop()

    def body(self, digest, name: str, cls: type) -> None:
        for base in cls.__bases__:
            self.cls(digest, f"{name}.__bases__", "base", base)
        for key, item in cls.__dict__.items():
            if key not in _CLASS_BOOKKEEPING:
                self.value(digest, f"{name}.{key}", item)

    def instance(self, digest, name: str, value) -> None:
        """An object by its class and its attributes, when they are all of its state."""
        cls = type(value)
        if not _state_is_attributes(cls):
            raise _Opaque(name, f"a {_qualname(cls)} whose content cannot be seen")
        _feed(digest, name, "object")
        self.cls(digest, f"{name}.__class__", "type", cls)
        attributes = getattr(value, "__dict__", None)
        if attributes is not None:
            for attr in sorted(attributes, key=str):
                self.value(digest, f"{name}.{attr}", attributes[attr])
        for slot in _slot_names(cls):
            try:
                item = object.__getattribute__(value, slot)
            except AttributeError:
                _feed(digest, name, "unset slot", slot)
                continue
            self.value(digest, f"{name}.{slot}", item)

    def subclass_attributes(self, digest, name: str, value) -> None:
        """What a subclass of a container keeps besides its items (a namedtuple keeps none)."""
        attributes = getattr(value, "__dict__", None)
        if attributes and attributes is not value:
            self.value(digest, f"{name}.__dict__", dict(attributes))

    def digest_of(self, name: str, value) -> str:
        digest = xxhash.xxh3_128()
        self.value(digest, name, value)
        return digest.hexdigest()


# A statement's stamp (``code="scalars"``) walks a global container its code reads when it
# holds at most STAMP_VALUES Python values and STAMP_ELEMENTS array or tensor elements (a
# config dict, a lookup table, a gain vector: a few microseconds to a millisecond); a larger
# one (a vocabulary) only keys the cache. A global dict read by forward and edited between
# statements had been unseen: old rows mixed with new in one answer, and the new stored under
# the original's key (docs/ARCHITECTURE.md, "Session").
STAMP_VALUES = 2_000
STAMP_ELEMENTS = 1 << 20


def _small_enough(value) -> bool:
    """Whether ``value`` is within the stamp's budget (STAMP_VALUES, STAMP_ELEMENTS)."""
    import torch

    pending, seen, values, elements = [value], set(), 0, 0
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        values += 1
        if isinstance(item, (torch.Tensor, np.ndarray)):
            elements += item.numel() if isinstance(item, torch.Tensor) else item.size
        elif isinstance(item, Mapping):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif not isinstance(item, (*_SCALARS, type, types.ModuleType, types.FunctionType)):
            try:
                pending.extend(vars(item).values())
            except TypeError:  # no __dict__: slots, or a value of its own kind
                pass
        if values > STAMP_VALUES or elements > STAMP_ELEMENTS:
            return False
    return True


@contextlib.contextmanager
def _blame(owner: str, path: str):
    """Turns an _Opaque from inside the value at ``path`` into Unfingerprintable, saying whose
    value it was and, when it lies deeper, where in it."""
    try:
        yield
    except _Opaque as exc:
        where = "" if exc.path == path else f" (at {exc.path})"
        raise Unfingerprintable(f"{owner} holds {exc.what}{where}") from None


def _script_code(module) -> str:
    """A TorchScript module's code (its forward's and its other methods'), as TorchScript
    prints it; its graph where no code can be printed."""
    try:
        return module.code
    except (RuntimeError, AttributeError):
        return str(getattr(module, "graph", ""))


def _module_label(name: str, root) -> str:
    return f"module {name!r}" if name else f"the model ({type(root).__name__})"


def _attributes(module):
    """A module's own attributes, without nn.Module's bookkeeping (parameters, hooks, ...)."""
    from_torch = _from_torch(type(module))
    derived = _recomputed(module)
    for attr, value in sorted(vars(module).items()):
        # Torch's own classes derive their private attributes from their public ones.
        if attr not in _module_bookkeeping() and not (from_torch and attr.startswith("_")) \
                and attr not in derived:
            yield attr, value


def _recomputed(module) -> set[str]:
    """The attributes that torch.nn.utils' own forward pre-hooks compute again before every
    call from the module's parameters and buffers, which are hashed: the old ``weight_norm``'s
    and ``spectral_norm``'s ``weight`` (spectral_norm's holds the raw weight until the first
    call: its first forward read as a change of the model) and pruning's."""
    names = set()
    for hook in module._forward_pre_hooks.values():
        if type(hook).__module__.startswith("torch.nn.utils"):
            name = getattr(hook, "name", None) or getattr(hook, "_tensor_name", None)
            if isinstance(name, str):
                names.add(name)
    return names


@functools.cache
def _module_bookkeeping() -> frozenset[str]:
    from torch import nn

    # Hooks are left out too: DiagQL and its users add them without changing the model.
    return frozenset(vars(nn.Module())) | {"_compiled_call_impl"}


def _state_is_attributes(cls: type) -> bool:
    """Whether an instance keeps all its state in its __dict__ and __slots__: no fields in C
    that attributes do not show (random.Random's generator state, a lock, a torch.Generator)."""
    if cls.__itemsize__:
        return False
    slots = len(_slot_names(cls))
    dict_and_weakref = (cls.__dictoffset__ > 0) + (cls.__weakrefoffset__ > 0)
    return cls.__basicsize__ == object.__basicsize__ + _POINTER * (slots + dict_and_weakref)


def _slot_names(cls: type) -> list[str]:
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            if slot.startswith("__") and not slot.endswith("__"):
                slot = f"_{klass.__name__.lstrip('_')}{slot}"  # name-mangled
            if slot not in names:
                names.append(slot)
    return names


@functools.lru_cache(maxsize=512)
def _user_class(cls: type) -> bool:
    try:
        path = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return False
    return path is not None and user_path(path)


def _functions(item) -> list:
    """The Python functions a class attribute runs: a method, a static or class method's
    function, a property's accessors."""
    if isinstance(item, (staticmethod, classmethod)):
        item = item.__func__
    if isinstance(item, property):
        return [f for f in (item.fget, item.fset, item.fdel) if isinstance(f, types.FunctionType)]
    return [item] if isinstance(item, types.FunctionType) else []


def _is_python_class(cls: type) -> bool:
    return bool(cls.__flags__ & _HEAPTYPE) and not _from_torch(cls) and cls.__module__ != "builtins"


def _from_torch(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "torch"


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


# --- feeding the digest -------------------------------------------------------------------------

def _feed(digest, *parts: str | bytes) -> None:
    # Length-prefixed, so that no two different sequences of parts hash alike.
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)


def _feed_tensor(digest, name: str, value) -> None:
    import torch
    from torch.nn.parameter import is_lazy

    if is_lazy(value):
        raise _Opaque(name, "a lazy module's parameter, not made yet (run one batch through "
                            "the model before connecting, and it is cached)")
    if value.is_sparse:
        value = value.to_dense()
    try:
        flat = value.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy()  # bytes of any dtype, bfloat16 included
    except (RuntimeError, TypeError) as exc:  # quantized, meta, ...
        raise _Opaque(name, f"a tensor that cannot be read ({exc})") from None
    _feed(digest, name, "tensor", str(value.dtype), str(tuple(value.shape)))
    _feed_bytes(digest, raw)


def _feed_array(digest, name: str, value: np.ndarray) -> None:
    if value.dtype.hasobject:
        raise _Opaque(name, "an array of Python objects")
    if isinstance(value, np.ma.MaskedArray):
        raise _Opaque(name, "a masked array")  # its mask and fill value are more than its bytes
    _feed(digest, name, "array", value.dtype.str, str(value.shape))
    _feed_bytes(digest, np.ascontiguousarray(value).reshape(-1).view(np.uint8))


_CHUNK = 32 * 1024 ** 2  # bytes per separately hashed piece of a large array


def _hash_threads(pieces: int) -> int:
    # XXH3 runs at the memory bandwidth of one core: a second of two gains nothing (measured).
    return 1 if (os.cpu_count() or 1) <= 2 else min(pieces, os.cpu_count())


def _feed_bytes(digest, raw: np.ndarray) -> None:
    _feed(digest, str(raw.nbytes))
    if raw.nbytes <= _CHUNK:
        digest.update(memoryview(raw))
        return
    # Fixed pieces, their digests fed in order: one fingerprint for any number of threads.
    pieces = [memoryview(raw[start:start + _CHUNK]) for start in range(0, raw.nbytes, _CHUNK)]
    with ThreadPoolExecutor(_hash_threads(len(pieces))) as pool:
        for piece_digest in pool.map(xxhash.xxh3_128_digest, pieces):
            digest.update(piece_digest)
