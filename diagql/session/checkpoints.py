"""Checkpoints of one architecture: named state_dicts (files or mappings) loaded one at a time
into a single copy of the final model, so that a hundred checkpoints never sit in memory at
once (docs/ARCHITECTURE.md, "several models")."""
from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

from diagql.errors import DiagQLError, WeightsError
from diagql.model.weights import check_format, load_state, read_state, unwrap_state
from diagql.storage.hook_effects import is_diagql_hook, users_changing

FINAL = "final"  # the name of the model given beside its checkpoints
NAME = re.compile(r"[A-Za-z_]\w*")


def natural_key(text: str) -> list:
    """Sorts epoch2 before epoch10: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def stem_name(path) -> str:
    """A checkpoint's name from its file (``ckpt/epoch-3.pt`` → ``epoch_3``): a name that
    statements can write (``epoch_3.fc2``)."""
    name = re.sub(r"\W", "_", Path(path).stem)
    return name if NAME.fullmatch(name) else "c" + name


def check_name(name, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DiagQLError(f"{what} name {name!r} cannot be written in a statement: use letters, "
                          f"digits and _, not starting with a digit")
    return name


# How to name checkpoints whose file names collide, in both ways in (sweep SY4: the command
# line had been told to pass a mapping).
_NAME_THEM = ("name them: checkpoints={'epoch3': path, ...} in Python, --checkpoint "
              "epoch3=PATH on the command line")


def checkpoint_specs(checkpoints) -> dict[str, object]:
    """``checkpoints=``: a mapping of names to state_dict paths, state_dicts or modules (their
    state_dicts), a list of paths (each named by its stem), or a glob text (``"ckpt/*.pt"``, in
    natural order)."""
    if isinstance(checkpoints, (str, Path)):
        import glob

        files = sorted(glob.glob(str(checkpoints)), key=natural_key)
        if not files:
            raise DiagQLError(f"checkpoints {str(checkpoints)!r}: no file matches")
        checkpoints = files
    if isinstance(checkpoints, Mapping):
        specs = {check_name(name, "checkpoint"): value for name, value in checkpoints.items()}
    elif not isinstance(checkpoints, Iterable) or isinstance(checkpoints, (bytes, nn.Module)):
        raise DiagQLError(f"checkpoints= takes a mapping of names to paths (or state_dicts, or "
                          f"models), a list of paths, or a glob, not "
                          f"{type(checkpoints).__name__}")
    else:
        paths = list(checkpoints)
        names = [stem_name(path) for path in paths]
        if len(set(names)) < len(names):  # hf/*/model.safetensors: named by their folders
            folders = [stem_name(Path(path).parent) for path in paths]
            names = folders if len(set(folders)) == len(folders) else names
        specs = {}
        for name, path in zip(names, paths):
            if name in specs:
                raise DiagQLError(f"two checkpoints are named {name!r} ({str(specs[name])!r} "
                                  f"and {str(path)!r}); {_NAME_THEM}")
            specs[name] = path
    if FINAL in specs:
        given = specs[FINAL]
        what = f" ({str(given)!r})" if isinstance(given, (str, Path)) else ""
        raise DiagQLError(f"a checkpoint is named {FINAL!r}{what}, which is the given model's "
                          f"name; {_NAME_THEM}")
    if not specs:
        raise DiagQLError("checkpoints= names no checkpoint")
    for name, value in list(specs.items()):
        # A model of the same architecture: its weights, read at each load (a module trained
        # or given new parameters after connect is read as it is then: changes.py stamps it).
        if not isinstance(value, (str, Path, Mapping, nn.Module)):
            raise DiagQLError(f"checkpoint {name!r} is {type(value).__name__}: give a path to a "
                              f"saved state_dict, a state_dict, or a model holding the weights")
        # Loaded lazily, one at a time: a path that is not there would otherwise fail every
        # statement later, SHOW MODELS included, instead of the connect that named it.
        if isinstance(value, (str, Path)) and not Path(value).exists():
            raise DiagQLError(f"checkpoint {name!r}: {str(value)!r} is not a file")
        if isinstance(value, (str, Path)):  # a save_pretrained directory: its weights file
            try:
                check_format(value, repr(str(value)))
            except WeightsError as exc:
                raise DiagQLError(f"checkpoint {name!r}: {exc.message}") from None
    return specs


def describe_weights(weights) -> str:
    return str(weights) if isinstance(weights, (str, Path)) else \
        "a module" if isinstance(weights, nn.Module) else "a state_dict"


class CheckpointSlot:
    """Copies of the final model (made at first use) holding one checkpoint's weights each:
    ``hold`` loads a checkpoint into one unless one already holds it. A statement runs one
    checkpoint at a time in one copy; a pass that runs two checkpoints side by side
    (``SIMILARITY a.fc2, b.fc2``) asks for a copy besides the one in use, made once."""

    def __init__(self, final: nn.Module):
        self.final = final
        self.copies: list[list] = []  # [name held or None, module], the first the usual one
        self.loads = 0  # state_dicts loaded so far (the tests count them)

    @property
    def module(self) -> nn.Module | None:
        return self.copies[0][1] if self.copies else None

    @property
    def holding(self) -> str | None:
        return self.copies[0][0] if self.copies else None

    def forget(self, name: str) -> None:
        """Checkpoint ``name``'s weights changed (its file was saved again): no copy holds
        them any more."""
        for copy_ in self.copies:
            if copy_[0] == name:
                copy_[0] = None

    def hold(self, name: str, weights, besides: tuple = ()) -> nn.Module:
        """The module with checkpoint ``name``'s weights, none of ``besides`` (modules that
        the same pass runs with other weights)."""
        free = [copy_ for copy_ in self.copies if not any(copy_[1] is m for m in besides)]
        for copy_ in free:
            if copy_[0] == name:
                mirror_hooks(self.final, copy_[1])
                return copy_[1]
        if not free:
            free = [[None, copy.deepcopy(self.final)]]
            self.copies += free
        copy_ = free[0]
        copy_[0] = None  # a load that fails half way leaves no checkpoint's weights whole
        label = f"checkpoint {name!r} ({describe_weights(weights)})"
        state = read_state(weights, label) if isinstance(weights, (str, Path)) else \
            unwrap_state(weights.state_dict() if isinstance(weights, nn.Module) else weights,
                         label)
        load_state(copy_[1], state, label)
        del state  # the only reference: a file's mapped tensors go with it
        copy_[0] = name
        self.loads += 1
        mirror_hooks(self.final, copy_[1])
        return copy_[1]


# A module's forward hook tables, and the tables of flags keyed by a hook's id beside each.
_HOOKS = {"_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
          "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")}


def mirror_hooks(final: nn.Module, copy_: nn.Module) -> None:
    """The final model's hooks that may change what a module returns (an ablation's), on the
    copy's modules as they are now, so that a checkpoint runs as the final model does: the
    copy had kept the hooks of the moment it was made (a deepcopy at first use), one the user
    removed since included, and none added after. DiagQL's own hooks on the copy (a pass's)
    stay, after the user's as on the final model; hooks that only record are not copied, so
    that the user's lists never gather checkpoints' outputs."""
    theirs = dict(copy_.named_modules())
    for name, mine in final.named_modules():
        other = theirs.get(name)
        if other is None:
            continue
        for table, flags in _HOOKS.items():
            source, target = getattr(mine, table, None), getattr(other, table, None)
            if source is None or target is None:
                continue
            user = {key: hook for key, hook in source.items() if users_changing(hook)}
            own = {key: hook for key, hook in target.items() if is_diagql_hook(hook)}
            if not user and len(own) == len(target):
                continue  # nothing to mirror, nothing stale: the common case, untouched
            # In place: the handles of DiagQL's hooks on the copy hold these very tables.
            target.clear()
            target.update({**user, **own})
            for flag in flags:
                mine_flags, their_flags = getattr(mine, flag, None), getattr(other, flag, None)
                if mine_flags is None or their_flags is None:
                    continue
                values = {**{key: v for key, v in mine_flags.items() if key in user},
                          **{key: v for key, v in their_flags.items() if key in own}}
                their_flags.clear()
                their_flags.update(values)
