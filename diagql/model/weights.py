"""Weights from a file or a mapping: reading a saved state_dict and loading it into a module,
with one-line errors that say what does not fit (``--weights``, ``--checkpoint``, checkpoints=)."""
from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from diagql.errors import WeightsError, warn

# Training scripts often save {"state_dict": ..., "optimizer": ...}: the model's entry is taken.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# The file each model's weights were loaded from before it was connected (``load_file``: the
# command line's --weights), which SHOW MODELS names; a model given as it is has none.
LOADED_FROM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_file(model: nn.Module, path) -> None:
    """``--weights PATH``: the state_dict saved at ``path`` loaded into ``model``, and the file
    kept for SHOW MODELS (``LOADED_FROM``)."""
    label = f"--weights {str(path)!r}"
    load_state(model, read_state(path, label), label)
    LOADED_FROM[model] = str(path)


# What a Hugging Face save_pretrained directory holds its weights in, in the order tried.
PRETRAINED_FILES = ("model.safetensors", "pytorch_model.bin")


def weights_file(path) -> Path:
    """The file ``path`` names: itself, or in a save_pretrained directory (a Trainer's
    checkpoint-500) its weights file."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in PRETRAINED_FILES:
        if (path / name).is_file():
            return path / name
    sharded = sorted(path.glob("*.index.json"))
    raise WeightsError(f"{str(path)!r} is a directory without {' or '.join(PRETRAINED_FILES)}"
                       + (f": its weights are in shards ({sharded[0].name}); load them into "
                          f"the model and pass it as a model" if sharded else
                          ": name the file that holds the weights"))


def check_format(path, label: str) -> None:
    """Refuses a file whose first bytes are none of the formats ``torch.load`` reads: a zip
    (torch.save, TorchScript), a pickle (the legacy format), safetensors (a length, then its
    JSON header) or a tar (torch's oldest). Read when the checkpoint is named, so that a glob
    that caught other files (``ckpt/*``, a script) is refused then, not as blank rows."""
    what = other_format(weights_file(path))
    if what is not None:
        raise WeightsError(f"{label} is not a torch checkpoint (it is {what}): save the model's "
                           f"weights with torch.save(model.state_dict(), path)")


def other_format(path) -> str | None:
    """What a file is that none of torch.load's formats starts as ("text", "an empty file",
    "another format"); None for one of them."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(b"PK") or head[:1] == b"\x80" or head[8:9] == b"{" \
            or head[257:262] == b"ustar":
        return None
    return "an empty file" if not head else "text" if _is_text(head) else "another format"


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a character cut at the 512th byte is still text
        return exc.start > len(head) - 4
    return True


def read_state(path, label: str) -> Mapping:
    """The state_dict saved at ``path`` (a file, or a save_pretrained directory's weights).
    Memory-mapped where the file allows it, so that its tensors are read from the file while
    they are copied into a module rather than held as a second copy; ``label`` starts every
    error ("--weights 'ckpt.pt'")."""
    path = weights_file(path)
    try:
        check_format(path, label)  # text, or another format: said so, not as an unpickler's
    except FileNotFoundError:      # KeyError (sweep SY4)
        raise WeightsError(f"{label}: no such file") from None
    arrays = _numpy_archive(path, label)
    if arrays is not None:
        return arrays
    try:
        with warnings.catch_warnings():  # torch's warnings about a file that is not one of its
            warnings.simplefilter("ignore", UserWarning)  # own: the error below says what it is
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # files in torch's legacy format cannot be mapped
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{label}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - the unpickler raises anything on a file that is not
        # a checkpoint (a text file: KeyError from its memo)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, KeyError | IndexError | TypeError | AttributeError):
            first = f"not a torch file ({type(exc).__name__} {first} while unpickling it)"
        if first.startswith("Weights only load failed"):
            # torch's own line goes on to say the file "can still be loaded", which for a file
            # that is not a checkpoint (text, a pickled object) misleads.
            first = _not_weights_only(str(exc))
        elif isinstance(exc, OSError) and not isinstance(exc, PermissionError):
            # A zip cut short: "[Errno 22] Invalid argument", from where torch seeks (SX3).
            first = f"the file is cut short or corrupt ({first}): save it again"
        raise WeightsError(f"{label} is not a readable torch checkpoint: {first}") from None
    return unwrap_state(state, label)


def _numpy_archive(path: Path, label: str) -> dict | None:
    """A numpy .npz of named arrays (``np.savez(path, **state_dict)``, weights converted from
    another framework) as a state_dict; None for any other file. A zip too, it had reached
    torch.load, whose refusal named its archive's internals. Read without pickles."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if not names or not all(name.endswith(".npy") for name in names):
        return None
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: torch.from_numpy(np.array(arrays[key])) for key in arrays.files}
    except (ValueError, OSError) as exc:  # an object array needs pickles
        raise WeightsError(f"{label} is a numpy archive that DiagQL cannot read as weights "
                           f"({str(exc).splitlines()[0]}): save numeric arrays, "
                           f"np.savez(path, **state_dict)") from None


def _not_weights_only(message: str) -> str:
    """Why torch's weights-only unpickler refused a file, and what to do: a training loop's
    checkpoint that holds an object beside its tensors (its ``args``, a ``Path``) is named by
    that object's class, with how to pass its state_dict (the class had been left out, sweep
    SX3)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found is None:
        return ("it holds something other than tensors, or is not a torch file; DiagQL "
                "reads weights only, running no pickled code: save model.state_dict() with "
                "torch.save")
    return (f"it holds an object of type {found.group(1)}, and DiagQL reads weights only, "
            f"running no pickled code: if you trust the file, load it yourself (torch.load("
            f"path, weights_only=False)) and pass its state_dict: a training loop's dict's "
            f"'model' or 'state_dict' entry, or a whole pickled model's .state_dict()")


def unwrap_state(state, label: str) -> Mapping:
    for key in WRAPPER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            averaged = [other for other, value in state.items() if isinstance(other, str)
                        and _averaged(other) and isinstance(value, Mapping)]
            if averaged:  # timm's {"state_dict", "state_dict_ema"}: which was read, said
                warn(f"{label}: its {key!r} is read; it also holds {averaged[0]!r}, a moving "
                     f"average of the weights: to diagnose those, save that entry alone")
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise WeightsError(f"{label} holds {type(state).__name__}, not a state_dict")
    return state


# What wrappers put before every key: torch.compile's OptimizedModule, DataParallel and
# DistributedDataParallel. Saved from the wrapper, a state_dict loads into the bare module.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def load_state(model: nn.Module, state: Mapping, label: str) -> None:
    """Copy ``state`` into ``model``'s parameters and buffers; every key must fit."""
    odd = next((key for key in state if not isinstance(key, str)), None)
    if odd is not None:  # torch's own error had been an AttributeError on int.startswith
        raise WeightsError(f"{label} is no state_dict: its key {odd!r} is no parameter's name")
    ties = _ties(model)  # once: the parameters are loaded in place, so their ids hold
    state = _unprefixed(ties, state, label)
    _check_ties(ties, state, label)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise WeightsError(f"{label} does not fit the model: {detail}") from None
    problems = []
    missing = _untied(ties, result.missing_keys, state)
    if missing:
        problems.append(f"missing {_few(missing)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_few(result.unexpected_keys)}")
    if problems:
        raise WeightsError(f"{label} does not fit the model: " + "; ".join(problems))


def _ties(model: nn.Module) -> dict[str, int]:
    """Each state_dict key's tensor, as a number shared by the keys of one tensor: a tied
    weight (an LM head's and its embedding's) is one Parameter under two keys, of which
    save_pretrained and safetensors' save_model keep one."""
    return {key: id(value) for key, value in model.state_dict(keep_vars=True).items()}


def _check_ties(ties: dict[str, int], state: Mapping, label: str) -> None:
    """Refuse two different values under the keys of one tied tensor (``_ties``): the last
    loaded had won, unsaid (sweep SX5)."""
    first: dict[int, str] = {}
    for key, tensor in ties.items():
        if key not in state:
            continue
        other = first.setdefault(tensor, key)
        if other != key and isinstance(state[key], torch.Tensor) and \
                isinstance(state[other], torch.Tensor) and not torch.equal(state[key],
                                                                             state[other]):
            raise WeightsError(f"{label} holds two different values for {other!r} and "
                               f"{key!r}, which are one tied tensor in the model")


def _untied(ties: dict[str, int], missing: list[str], state: Mapping) -> list[str]:
    """The ``missing`` keys whose tensor (``_ties``) no key of ``state`` loaded (a tied weight's
    other key is not missing: BERT-MLM's decoder.weight had been refused, sweep SX3)."""
    if not missing:
        return []
    loaded = {ties[key] for key in state if key in ties}
    return [key for key in missing if ties.get(key) not in loaded]


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:4])
    return shown + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def _unprefixed(ties: dict[str, int], state: Mapping, label: str) -> Mapping:
    """``state`` with its keys' wrapper prefixes made the model's own: each saved from a
    wrapper (``module._orig_mod.``: DDP around a compiled model) or loaded into one (a
    DataParallel given a plain state_dict). Only prefixes that every key has count, so a
    model whose own child is named ``module`` keeps its keys. Else the model saved as one
    part of a bigger module: the keys under the one prefix that are exactly the model's
    (a LightningModule's ``model.``, swa_utils.AveragedModel's ``module.`` beside its
    ``n_averaged``), the rest left out."""
    keys = [k for k in state]
    if not keys or not all(isinstance(k, str) for k in keys):
        return state
    own = list(ties)  # the model's own keys (``_ties``)
    theirs, ours = _wrapping(keys), _wrapping(own)
    if theirs != ours:
        state = {ours + k[len(theirs):]: v for k, v in state.items()}
    if _covers(set(state), ties):
        return state
    return _part(state, ties, label)


def _covers(keys: set[str], ties: dict[str, int]) -> bool:
    """Whether ``keys`` are the model's own and name each of its tensors (a tied one under
    either of its keys, or both)."""
    return keys <= ties.keys() and {ties[key] for key in keys} == set(ties.values())


def _part(state: Mapping, ties: dict[str, int], label: str) -> Mapping:
    """The keys under the one dotted prefix whose keys are the model's own (``_covers``),
    unprefixed; ``state`` itself where no prefix fits (load_state then says what differs).
    Several that fit (a LightningModule's ``model.`` beside its ``ema_model.``) are refused
    by name. Each key is split at its dots once (a prefix was compared with every key: 4 s
    for 6,000 keys, sweep SX5)."""
    own, under, named = ties.keys(), {}, {}
    for key in state:
        dots = [i for i, c in enumerate(key) if c == "."]
        for i in dots:
            prefix, rest = key[:i + 1], key[i + 1:]
            under[prefix] = under.get(prefix, 0) + 1  # keys under the prefix
            if rest in own:
                named.setdefault(prefix, set()).add(rest)
    fitting = sorted(prefix for prefix, rests in named.items()
                     if len(rests) == under[prefix] and _covers(rests, ties))
    if fitting and _covers({key for key in state if key in own}, ties):
        fitting.insert(0, "")  # the model's own keys beside a copy (sweep SX9)
    if not fitting:
        return state
    plain = [prefix for prefix in fitting if not _averaged(prefix)]
    if len(fitting) > 1 and len(plain) == 1:  # the weights beside their moving average's
        warn(f"{label}: its {_part_name(plain[0])} weights are read; it also holds "
             f"{_part_name(next(p for p in fitting if p != plain[0]))}, a moving average of "
             f"the weights: to diagnose those, save that part alone")
        fitting = plain
    if len(fitting) > 1:
        example = next(p for p in fitting if p)
        raise WeightsError(f"{label} holds the model's weights under {len(fitting)} prefixes ("
                           f"{_few([_part_name(p) for p in fitting])}): save the one to "
                           f"diagnose alone, e.g. {{k[len({example!r}):]: v for k, v in "
                           f"state.items() if k.startswith({example!r})}}")
    (prefix,) = fitting
    if not prefix:
        return {k: v for k, v in state.items() if k in own}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _part_name(prefix: str) -> str:
    return repr(prefix) if prefix else "top-level"


def _averaged(name: str) -> bool:
    """A key or prefix of a moving average's weights (``state_dict_ema``, ``ema_model.``,
    ``swa.``)."""
    return bool({"ema", "swa"} & set(name.lower().replace(".", "_").split("_")))


def _wrapping(keys: list[str]) -> str:
    """The wrapper prefixes every one of ``keys`` begins with, outermost first."""
    found = ""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES
                       if keys and all(k.startswith(found + p) for k in keys)), None)
        if prefix is None:
            return found
        found += prefix
