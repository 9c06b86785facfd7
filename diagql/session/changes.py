"""Noticing that a model or the data changed in place while a connection is open: a model
trained a step further, a state_dict loaded into it, a weight zeroed for an ablation, a
submodule swapped, a data tensor written, a checkpoint file saved again. What the
connection derived from them (catalog, profile, samples, kept activations, inputs indexes,
fingerprints) would be stale, an answer would mix old predictions with new activations, and
rows of the new model would be stored under the old one's key; so before each statement the
connection compares stamps and derives afresh what changed (docs/ARCHITECTURE.md,
"Session").

A stamp is cheap: each tensor's identity, storage and version counter (which every in-place
write through autograd's view bumps: an optimizer's step, ``load_state_dict``, ``with
torch.no_grad(): w.mul_(2)``), and every module's identity and class. A model of at most
FULL_BYTES is fingerprinted whole besides (storage/fingerprint.py), which also sees writes
through ``.data`` and to attributes; a larger one is not, and after such a write the user
connects again. The data's bytes are hashed whole up to FULL_BYTES, and beyond it in about
1 MB of evenly spread pieces (storage/sampled.py: about 0.3 ms at any size), which sees a
wholesale write through numpy or ``.data`` (scaling, normalising, shuffling the rows) but
not an edit of a few elements; its length and its parts' are stamped too (a list of items
appended to), and a list's items one by one (replaced, or their tensors written in place). A
checkpoint given as a module is stamped as a model is, as a state_dict by its tensors, in a
file by the file's time and size. A forward hook that can change outputs (an ablation's:
storage/hook_effects.py) is part of the stamp, at any size; one that counts or records calls
is instrumentation and is not.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader, Subset

from diagql.errors import DiagQLError, warn
from diagql.model.data import ItemSource, listed_items
from diagql.model.forward import FORWARDS
from diagql.model.weights import weights_file
from diagql.session.inputs import forget_indices
from diagql.session.item_stamps import items_stamp, length, version
from diagql.session.serial import STATEMENTS
from diagql.storage.fingerprint import (Unfingerprintable, code_digest, hooks_digest,
                                       item_functions, model_fingerprint, scores_fingerprint)
from diagql.storage.sampled import SAMPLE_BYTES, sampled_digest

FULL_BYTES = 32 * 1024 ** 2  # hashed whole before each statement: about 5 ms at most
MAX_MODULES = 512  # and of at most so many modules (2,000 small ones took 45 ms)


def tensor_stamp(tensors) -> tuple:
    return tuple((id(t), _pointer(t), version(t)) for t in tensors)


def _pointer(t) -> int:
    """Where a tensor's values are; 0 for one without a storage of its own (sparse), -1 for
    a lazy module's parameter not yet materialised (its first forward makes it)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return 0
    except ValueError:  # a lazy module's, not yet materialised: "uninitialized parameter"
        return -1


def model_stamp(module) -> tuple:
    """The stamp of a module: its tensors', its modules' identities, its hooks' digest, and
    its fingerprint when it is small."""
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    modules = tuple((id(m), type(m)) for m in module.modules())
    hooks = hooks_digest(module)  # a hook added or removed (an ablation's), at any size
    # A lazy module's parameters before its first forward have no values to read; the
    # statement's own pass makes them, and the model is stamped again after it.
    if len(modules) > MAX_MODULES or any(is_lazy(t) for t in tensors):
        return tensor_stamp(tensors), modules, hooks, None
    # Of the globals its code reads, the numbers and strings (a GAIN its forward scales by,
    # changed between statements, had been unseen, and rows of both mixed in one answer and
    # stored under the old key): a notebook's large global (a vocabulary) would cost every
    # statement a walk; they key the cache, where a new process reads them.
    return tensor_stamp(tensors), modules, hooks, \
        _small(_bytes(tensors), lambda: model_fingerprint(module, code="scalars"))


def scores_stamp(conn):
    """The digest of the user's scores= function, the values its code reads included (a
    column K it picks, changed between statements, had left the profile's predictions the
    old column's, silently: sweep SS9); None without one."""
    given = conn.given_scores
    if given is None or not callable(given.pick):
        return None
    try:
        # As model_stamp's: a large global it reads (a vocabulary) keys the cache only.
        return scores_fingerprint(given.pick, code="scalars")
    except Unfingerprintable:  # the cache key refuses it, and says why
        return None


def notice_changes(conn) -> None:
    """Derive afresh what a model or the data changed in place since the last statement
    invalidated, saying so where something had been derived from them."""
    if not conn.models or conn.source is None:
        return
    if conn.engine is not None:
        _refuse_changes_on_workers(conn)
        return
    data = data_stamp(conn)
    data_changed = conn.data_stamp is not None and data != conn.data_stamp
    if data_changed:
        _read_again(conn)
        data = (tensor_stamp(_data_parts(conn)[0]), *data[1:])  # the new source's tensors
    conn.data_stamp = data
    scores = scores_stamp(conn)
    scores_changed = getattr(conn, "scores_stamp", None) not in (None, scores)
    conn.scores_stamp = scores
    forgot, remade = [], set()
    finals: dict = {}  # the final models' hook digests, once a statement however many checkpoints
    for entry in conn.models.values():
        stamp = _checkpoint_stamp(entry, finals) if entry.is_checkpoint else \
            model_stamp(entry.architecture())
        changed = entry.stamp is not None and stamp != entry.stamp
        if changed:
            what = (_weights_changed(entry) if stamp[0] != entry.stamp[0] else
                    "the final model's hooks, which it runs with") if entry.is_checkpoint \
                else "its hooks" if _only_hooks(stamp, entry.stamp) else \
                "its weights, modules or the values its code reads"
        if scores_changed and not changed:
            changed, what = True, "the values its scores= function reads"
        entry.stamp = stamp
        if changed and not entry.is_checkpoint and what != "its hooks":
            remade.add(id(entry.architecture()))
        if changed or data_changed:
            forget_indices(entry)
            if entry.is_checkpoint:
                entry.slot.forget(entry.name)
            if entry.forget_derived() and changed:
                forgot.append((entry, what))
    # A checkpoint runs in a copy of its final model made at first use (session/
    # checkpoints.py): a final model changed otherwise than in its hooks (a module swapped, an
    # attribute its forward reads; or its weights, which the copies do not take, but a stamp
    # does not tell those apart) is copied again, and what its checkpoints gave is stale.
    for entry in conn.models.values():
        if entry.is_checkpoint and id(entry.slot.final) in remade:
            entry.slot.copies.clear()
            forget_indices(entry)
            if entry.forget_derived():
                forgot.append((entry, "the final model, whose copy it runs in"))
    if data_changed:
        _say("the data changed")
    for entry, what in forgot:
        whose = f"model {entry.name!r}" if len(conn.models) > 1 else "the model"
        _say(f"{whose} changed ({what})")


def batch_size_changed(conn) -> None:
    """SET batch_size changed the batches: a batch-dependent model's profile, samples, kept
    rows and inputs indexes were made in the old ones (``Profile.batch_size``; SW5)."""
    for entry in conn.models.values():
        profile = entry.artifacts.profile
        if profile is not None and profile.batch_size is not None:
            entry.forget_latent_space()
            forget_indices(entry)


def _refuse_changes_on_workers(conn) -> None:
    """Ray's workers hold their own copies of the model and the data, made when they started:
    a change in place on the driver would not reach them, and every answer after it would be
    the old model's, silently. The driver's copies are stamped, and a change refused."""
    stamp = _driver_stamp(conn)
    changed = conn.data_stamp is not None and stamp != conn.data_stamp
    data_changed = changed and stamp[0] != conn.data_stamp[0]
    if changed and not conn.engine.actors_held() and \
            (not data_changed or _sends_data(conn.engine)):
        # No worker holds a copy yet (a hook added after connect, data scaled before any
        # pass): they will take the models and the data as they are now; what the driver
        # derived from them goes, and the data is read again (its labels were copied).
        if data_changed:
            _read_again(conn)
            stamp = _driver_stamp(conn)
        # The globals the workers must read alike, as they are now (a SCALE set since).
        from diagql.engine.ray_workers import driver_reads

        models = {name if conn.engine.several else None: entry.architecture()
                  for name, entry in conn.models.items() if not entry.is_checkpoint}
        conn.engine.reads = driver_reads(conn.engine, models, conn.data)
        for entry in conn.models.values():
            forget_indices(entry)
            entry.forget_derived()
        _say("the data changed" if data_changed else "the model changed")
    elif changed:
        raise DiagQLError("the model or the data changed in place since the last statement, "
                          "but the Ray engine's workers hold their own copies of them, made "
                          "when they started (or, for a data factory, their own data): "
                          "connect again to answer for them as they are now (or use the "
                          "local engine, which follows such changes)")
    conn.data_stamp = stamp


def _read_again(conn) -> None:
    """The data read again: its labels were copied when it was first read. The cache keys'
    fingerprint (ModelEntry.data_digest) is taken again, of the data as the new source reads
    it, when a key is next needed: every entry made from here on is keyed by the data as it
    is now, never the original's."""
    conn.source = ItemSource(conn.data, label_key=conn.source.label_key)
    conn._data_digest.clear()


def _sends_data(engine) -> bool:
    """Whether Ray's workers take the driver's data itself, as it is when they start (not a
    data factory's own, nor a Ray Dataset's blocks, read at connect)."""
    from diagql.engine.ray_data import is_ray_dataset
    from diagql.model.data_forms import is_factory

    return not (is_factory(engine.data) or is_ray_dataset(engine.data))


def _driver_stamp(conn) -> tuple:
    """The data's stamp as the local engine takes it, and each model's."""
    models = tuple(model_stamp(entry.architecture()) for entry in conn.models.values()
                   if not entry.is_checkpoint)
    return data_stamp(conn), models


def _only_hooks(stamp: tuple, before: tuple) -> bool:
    """Whether two model stamps differ in their hooks alone: an output-changing hook (an
    ablation's) added or removed, which the small fingerprint sees too."""
    return stamp[:2] == before[:2] and stamp[2] != before[2]


@contextlib.contextmanager
def watching(conn):
    """One statement's span, one at a time (STATEMENTS): changes noticed before it, its own
    passes' taken as read after (when it ran the model at all)."""
    with STATEMENTS:
        forwards = _begin(conn)
        try:
            with _inside():
                yield
        finally:
            _taken(conn, forwards)


@contextlib.contextmanager
def reading(conn):
    """A read of what the connection derives (``db.profile``, ``db.catalog``): a span of its
    own when no statement of this thread is running, so that a change since the last is
    noticed first. Unwatched, the profile of a model changed in place had been computed and
    stored under the original weights' cache key, which a later process read (FF1)."""
    if getattr(_SPANS, "depth", 0):
        yield
        return
    with watching(conn):
        yield


# Each thread's statements' spans now open (``watching``, ``stepped``): reads within one
# are its own.
_SPANS = threading.local()


@contextlib.contextmanager
def _inside():
    _SPANS.depth = getattr(_SPANS, "depth", 0) + 1
    try:
        yield
    finally:
        _SPANS.depth -= 1


def stepped(conn, outcomes: Iterator) -> Iterator:
    """``outcomes`` (a script's shared pass: its statements' answers, one at a time) stepped
    within one statement's span as ``watching`` keeps it, but yielded outside the lock: a
    caller that stopped reading midway (an iter_execute left unfinished) had held it, and
    every other thread's statement waited, on any connection."""
    forwards = None
    while True:
        with STATEMENTS:
            if forwards is None:
                forwards = _begin(conn)
            try:
                with _inside():
                    outcome = next(outcomes)
            except StopIteration:
                return
            finally:
                forwards = _taken(conn, forwards)
        yield outcome


def _begin(conn) -> int:
    """A statement's start: a meta model refused, changes noticed; the passes run so far."""
    _refuse_meta(conn)
    notice_changes(conn)
    return FORWARDS[0]


def _taken(conn, forwards: int) -> int:
    """The passes run since ``forwards`` (the statement's own) taken as read; the count now."""
    if FORWARDS[0] != forwards:
        after_statement(conn)
    return FORWARDS[0]


def _refuse_meta(conn) -> None:
    """A model built on the meta device and not yet given its weights has none to run: say
    so before anything reads them (torch's own error named an operator with no meta kernel).
    Refused per statement, not at connect: loading them after connecting is a way too."""
    for entry in conn.models.values():
        if entry.is_checkpoint:
            continue
        module = entry.architecture()
        empty = next((name for name, t in itertools.chain(module.named_parameters(),
                                                          module.named_buffers())
                      if t.is_meta), None)
        if empty is not None:
            whose = f"model {entry.name!r}" if len(conn.models) > 1 else "the model"
            raise DiagQLError(f"{whose} is on the meta device, without values ({empty!r} has "
                              f"none): load its weights first, load_state_dict(state, "
                              f"assign=True), or to_empty(device='cpu') and then "
                              f"load_state_dict")


def after_statement(conn) -> None:
    """Take as read what the statement's own passes changed: a model whose forward writes its
    buffers or attributes (a call counter, a rotary embedding's cache grown to a longer input)
    is not a model the user changed, so each model is stamped again."""
    if not conn.models or conn.source is None:
        return
    if conn.engine is not None:  # the driver's own runs (the probe) are no user's change
        if conn.data_stamp is not None:
            conn.data_stamp = _driver_stamp(conn)
        return
    for entry in conn.models.values():
        if not entry.is_checkpoint and entry.stamp is not None:
            entry.stamp = model_stamp(entry.architecture())
    # Likewise what the code that makes the items wrote (a collate_fn counting its calls into
    # a list it closes over, or clamping a list's items in place, had made every statement
    # read the data again).
    if conn.data_stamp is not None and (conn.data_stamp[-1] is not None or
                                        conn.data_stamp[-2] is not None):
        conn.data_stamp = (*conn.data_stamp[:-2], items_stamp(listed_items(conn.source)),
                           _item_code(conn.data))


def _bytes(tensors: list, arrays: tuple = ()) -> int:
    """Their bytes, each storage once (a tensor made from an array shares its memory)."""
    sizes = {_pointer(t) or id(t): t.numel() * t.element_size() for t in tensors}
    sizes.update((a.__array_interface__["data"][0], a.nbytes) for a in arrays)
    return sum(sizes.values())


def _small(size: int, fingerprint) -> str | None:
    """The fingerprint of a model of ``size`` bytes, when that is at most FULL_BYTES."""
    if size > FULL_BYTES:
        return None
    try:
        return fingerprint()
    except Exception:  # noqa: BLE001 - Unfingerprintable, or a tensor that cannot be read
        return None  # (meta, ...): the stamp's versions and identities still stand


def data_stamp(conn) -> tuple:
    """The data's stamp: its tensors' identities, storages and versions, the lengths of it
    and its parts (a list of items appended to, a Dataset grown), and a digest of its bytes:
    whole at most FULL_BYTES, else sampled (storage/sampled.py), which sees wholesale edits
    through numpy or ``.data`` (scaling, normalising, shuffling) but not every element's."""
    tensors, arrays = _data_parts(conn)
    size = _bytes(tensors, arrays)
    if size <= FULL_BYTES:  # Python lists given as parts too (a pair's labels as a list)
        arrays = [*arrays, *_lists_as_arrays(conn.data)]
    return tensor_stamp(tensors), _lengths(conn.data), \
        sampled_digest([*tensors, *arrays], budget=None if size <= FULL_BYTES else SAMPLE_BYTES), \
        items_stamp(listed_items(conn.source)), _item_code(conn.data)


def _item_code(data) -> str | None:
    """The digest of the code that makes the items (fingerprint.code_digest of
    ``item_functions``); None where there is none. A collate_fn scaling each batch by a
    global NORM, changed between statements, had been unseen: old predictions beside new
    rows in one answer."""
    functions = item_functions(data)
    return code_digest(functions) if functions else None


def _given(data) -> list:
    """The parts the user gave: a pair's two (a mapping's values for its first), a mapping's
    values; none for other forms."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return [*(data[0].values() if isinstance(data[0], Mapping) else [data[0]]), data[1]]
    if isinstance(data, Mapping):
        return list(data.values())
    return []


def _data_parts(conn) -> tuple[list, list]:
    """The tensors the items are read from and those the user gave (a pair's labels, which
    are read once, into an array), and the numpy arrays the user gave (which have no version
    counter: only a digest of their bytes sees a write into one)."""
    given = _given(conn.data)
    tensors = [*conn.source.tensors(), *(t for t in given if isinstance(t, torch.Tensor))]
    return tensors, [a for a in given if isinstance(a, np.ndarray)]


def _lists_as_arrays(data) -> list:
    arrays = []
    for part in _given(data):
        if isinstance(part, (list, tuple)):
            try:
                arrays.append(np.asarray(part))
            except (ValueError, TypeError):  # ragged: its length is still stamped
                pass
    return arrays


def _lengths(data) -> tuple:
    """The length of the data (a DataLoader's dataset's) and of each part it was given in:
    a list of items appended to or cut, a Dataset that grew, must be read again; and a
    loader's sampler's indices (a SubsetRandomSampler's replaced, of the same length, had
    left every answer on the old split)."""
    picked = []
    if isinstance(data, DataLoader):
        sampler = getattr(data.batch_sampler, "sampler", data.sampler)
        picked.append(_indices_digest(getattr(sampler, "indices", None)))
        data = data.dataset
    whole = data
    # A Subset's indices, nested or not, edited in place or replaced (SW5: the old items'
    # labels beside the new items' rows, 0.17 off, unwarned).
    while isinstance(whole, Subset) and len(picked) < 8:
        picked.append(_indices_digest(whole.indices))
        whole = whole.dataset
    return (*(length(part) for part in (data, *_given(data))), tuple(picked))


def _indices_digest(indices) -> str | None:
    if indices is None:
        return None
    try:
        return sampled_digest([np.asarray(indices, dtype=np.int64)], budget=None)
    except (TypeError, ValueError):  # indices of the user's own kind: not stamped
        return None


def _weights_changed(entry) -> str:
    return "its checkpoint file" if isinstance(entry.weights, (str, os.PathLike)) else \
        "its weights"


def _checkpoint_stamp(entry, finals: dict) -> tuple:
    """A checkpoint file's modification time, size and inode (a training job saves it again;
    ``rsync -t`` keeps the time, not the inode; the change time, which ``cp -p`` cannot keep,
    also moves with a chmod or a backup's hard link: unchanged weights said changed, sweep
    SX5), the weights file of a save_pretrained directory (its own times do not follow a file
    copied over one inside: sweep SX3, an old CKA answered unwarned), a module's stamp (as a
    model's), or a state_dict's tensors' stamp, and the final model's hooks, which its copy
    runs with (session/checkpoints.py); ``finals`` keeps each final model's digest for the
    statement's other checkpoints."""
    final = entry.slot.final
    if id(final) not in finals:
        finals[id(final)] = hooks_digest(final)
    hooks = finals[id(final)]
    if isinstance(entry.weights, torch.nn.Module):  # trained, loaded, given new parameters
        return model_stamp(entry.weights), hooks
    if isinstance(entry.weights, Mapping):  # a state_dict, trained on or loaded into in place
        return tensor_stamp([t for t in entry.weights.values() if isinstance(t, torch.Tensor)]), \
            hooks
    if not isinstance(entry.weights, (str, os.PathLike)):
        return None, hooks
    try:
        status = os.stat(weights_file(entry.weights))
    except (OSError, DiagQLError):
        return None, hooks  # loading it says what is wrong
    return (status.st_mtime_ns, status.st_size, status.st_ino), hooks


def _say(what: str) -> None:
    warn(f"{what} since DiagQL last read it: the profile, samples and kept activations are "
         f"derived again")
