"""Fingerprints that key the disk cache: digests of what decides a model's outputs and of a data
set's items, so that a changed model or data set never reuses a stale entry."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os

import numpy as np


def cache_key(*parts) -> str:
    """A file-name-safe key for JSON-able parts (fingerprints, settings, sampler specs)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --- fingerprints -------------------------------------------------------------------------------

class _Unhashable(Exception):
    """Something whose content we cannot hash exactly: then it is not cached on disk."""


def model_fingerprint(model) -> str | None:
    """A digest of what decides the model's outputs, or None if some of it cannot be hashed.

    Covered: the class and the source of every non-torch module class (a changed forward()
    must not reuse a stale profile), every parameter and buffer, extra state, and each
    module's plain attributes (``LeakyReLU.negative_slope``, ``Conv2d.stride``, a custom
    ``temperature``), which change outputs without being in the state_dict. Torch's own
    classes are covered by torch's version. Not covered: global state that forward() reads.
    """
    import torch

    digest = hashlib.sha256()
    try:
        _feed(digest, "torch", torch.__version__)
        classes = {}
        for name, module in model.named_modules():
            classes.setdefault(type(module), None)
            _feed(digest, "module", name, _qualname(type(module)))
            for attr, value in sorted(vars(module).items()):
                if not attr.startswith("_") and attr != "training":
                    _feed_value(digest, f"{name}.{attr}", value)
        for cls in classes:
            _feed(digest, "source", _qualname(cls), source_digest(cls))
        state = model.state_dict(keep_vars=True)
        # Non-persistent buffers are left out of state_dict but still shape the outputs.
        state.update((name, buf) for name, buf in model.named_buffers() if name not in state)
        for name, value in state.items():
            _feed_value(digest, name, value)
    except (_Unhashable, RecursionError):
        return None
    return digest.hexdigest()


def data_fingerprint(data) -> str | None:
    """A digest of the items, where it can be exact; None (not cached on disk) otherwise.

    Exact: a pair (X, y) of tensors or arrays, a TensorDataset, and a DataLoader over a
    TensorDataset with the default collate (items are read by index, so the loader's order
    does not matter). Any other Dataset can change, or read files, without us knowing.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset, default_collate

    if isinstance(data, DataLoader):
        if data.collate_fn is not default_collate:
            return None
        data = data.dataset
    if type(data) is TensorDataset:
        parts = list(data.tensors)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        parts = list(data)
    else:
        return None
    digest = hashlib.sha256()
    try:
        for i, part in enumerate(parts):
            if not isinstance(part, (torch.Tensor, np.ndarray)):
                part = np.asarray(part)
            _feed_value(digest, f"part {i}", part)
    except (_Unhashable, ValueError, TypeError):
        return None
    return digest.hexdigest()


def source_digest(obj) -> str:
    """The digest of a class's or function's source, or "" when it has none (defined at the
    prompt). Torch's own code is covered by torch's version instead (and is slow to parse)."""
    if (getattr(obj, "__module__", None) or "").split(".")[0] == "torch":
        return ""
    try:
        return _source_digest(obj)
    except TypeError:  # unhashable callable
        return _source_digest.__wrapped__(obj)


@functools.lru_cache(maxsize=512)
def _source_digest(obj) -> str:
    # Memoized per object: getsource parses the whole file, and an object's code is fixed.
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return ""
    return hashlib.sha256(source.encode()).hexdigest()


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _feed(digest, *parts: str) -> None:
    # Length-prefixed, so that no two different sequences of parts hash alike.
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)


def _feed_value(digest, name: str, value) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_sparse:
            value = value.to_dense()
        try:
            flat = value.detach().cpu().contiguous().reshape(-1)
            raw = flat.view(torch.uint8).numpy()  # bytes of any dtype, bfloat16 included
        except (RuntimeError, TypeError) as exc:  # quantized, meta, ...
            raise _Unhashable(str(exc)) from None
        _feed(digest, name, "tensor", str(value.dtype), str(tuple(value.shape)))
        _feed_bytes(digest, raw)
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise _Unhashable(f"{name} holds Python objects")
        _feed(digest, name, "array", value.dtype.str, str(value.shape))
        _feed_bytes(digest, np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes, np.generic)):
        _feed(digest, name, repr(value))
    elif isinstance(value, (tuple, list)):
        _feed(digest, name, type(value).__name__, str(len(value)))
        for i, item in enumerate(value):
            _feed_value(digest, f"{name}[{i}]", item)
    elif isinstance(value, dict):
        _feed(digest, name, "dict", str(len(value)))
        for key in sorted(value, key=repr):
            _feed_value(digest, f"{name}[{key!r}]", value[key])
    elif isinstance(value, (torch.dtype, torch.device, torch.Size)):
        _feed(digest, name, repr(value))
    elif callable(value) and hasattr(value, "__qualname__"):
        _feed(digest, name, _qualname(value), source_digest(value))
    else:
        # An object whose content we cannot see: its type only. A child module is hashed
        # on its own, through named_modules().
        _feed(digest, name, _qualname(type(value)))


_CHUNK = 32 * 1024 ** 2  # bytes per separately hashed piece of a large array


def _feed_bytes(digest, raw: np.ndarray) -> None:
    _feed(digest, str(raw.nbytes))
    if raw.nbytes <= _CHUNK:
        digest.update(memoryview(raw))
        return
    # A large array (a data set's inputs) is hashed in fixed pieces on several threads
    # (hashlib releases the GIL), then the pieces' digests are fed in order: the same
    # fingerprint on any machine, in a fraction of the time on a multi-core one.
    from concurrent.futures import ThreadPoolExecutor

    pieces = [raw[start:start + _CHUNK] for start in range(0, raw.nbytes, _CHUNK)]
    with ThreadPoolExecutor(min(len(pieces), os.cpu_count() or 1)) as pool:
        for piece_digest in pool.map(lambda p: hashlib.sha256(memoryview(p)).digest(), pieces):
            digest.update(piece_digest)
