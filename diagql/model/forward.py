"""Calling the model on a batch: the batch moved to the model's device and dtype, its inputs
spread over forward's arguments as the batch's form asks, and a failure of the user's forward
reported with the items it failed on; a batch kept as it was read (``kept_copy``)."""
from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from diagql.errors import DiagQLError, ExecutionError
from diagql.model.data import NAME_LABEL_KEY
from diagql.model.data_forms import tensors_in
from diagql.model.hooks import HookFailure
from diagql.model.input_masks import NoRealToken
from diagql.model.labels import LABEL_KEYS


class Cast(NamedTuple):
    """The floating inputs of a model of mixed dtypes: one of its parameters' dtypes
    (``keep``) stays as given, as the model itself takes it; any other takes ``to``, its
    widest (numpy's float64 on a float32-and-half model: review NN3)."""

    to: torch.dtype
    keep: frozenset


def to_device(x, device: torch.device, dtype):
    """Move model inputs, nested in mappings, tuples and lists, to the model's device; floating
    tensors take ``dtype`` (a Cast: as it says; None: their own), integer ones (token ids,
    masks) keep theirs."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            if isinstance(dtype, Cast):
                dtype = None if x.dtype in dtype.keep else dtype.to
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device, dtype) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple takes its fields apart
        return type(x)(*(to_device(v, device, dtype) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, dtype) for v in x)
    return x


FORWARDS = [0]  # calls of call_model in this process: whether a statement ran the model


def batch_text(idx) -> str:
    """Which items a batch holds, for an error: ``items 16..31`` (a run), else the count and
    range of the sampled items it holds."""
    first, last = int(idx[0]), int(idx[-1])
    if last - first + 1 == len(idx):
        return f"item {first:,}" if first == last else f"items {first:,}..{last:,}"
    return f"a batch of {len(idx):,} items from {first:,} to {last:,}"


def call_model(model, x, idx=None):
    """Models take one input; a tuple or list of inputs is spread over the positional
    arguments, a mapping is passed as keyword arguments (a mapping of one entry whose key is
    no argument of forward, such as {"image": ...}, is that one input).

    An exception from the user's forward becomes an ExecutionError that names it and the
    batch's items (``idx``, when known; the original stays chained for --debug); our own
    errors raised in hooks pass through.
    """
    if isinstance(x, Mapping):
        args, kwargs = _arguments(model, x)
    elif isinstance(x, (tuple, list)):
        args, kwargs = tuple(x), {}
    else:
        args, kwargs = (x,), {}
    FORWARDS[0] += 1
    try:
        return model(*args, **kwargs)
    except DiagQLError:
        raise
    except HookFailure as failure:  # an item with no real token named by its index, not row
        if isinstance(failure.error, NoRealToken) and idx is not None and len(idx):
            failure.error = failure.error.at_item(f"{int(idx[failure.error.row]):,}")
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported, not crashed on
        spread = " (a list of inputs is spread over forward's arguments, as a tuple is; to " \
            "pass one list whole, give each item as ((inputs,), y))" \
            if isinstance(x, list) and isinstance(exc, TypeError) else ""
        if isinstance(x, torch.Tensor) and isinstance(exc, TypeError) and \
                "required positional argument" in str(exc):  # forward(cat_ids, numeric)
            spread = (" (each batch is one tensor here, a DataFrame's columns too; for a "
                      "forward of several inputs give each item as ((x1, x2), y), whose "
                      "tuple is spread over its arguments, or a mapping of them by name)")
        if isinstance(x, Mapping) and not kwargs:  # forward(batch) reading batch["x"]
            spread = (f" (the mapping's one entry {next(iter(x))!r} was passed as forward's "
                      f"argument, since forward has no argument of that name; to pass the "
                      f"mapping whole, give each item as ((mapping,), y))")
        where = "" if idx is None or not len(idx) else f" on {batch_text(idx)}"
        raise ExecutionError(f"the model's forward raised {type(exc).__name__}{where}: {exc}"
                             f"{_integer_hint(x, exc)}{_layout_hint(x, exc)}"
                             f"{_features_hint(x, exc)}{spread}") from exc


def _tensors_where(x, kind: Callable[[torch.Tensor], bool]) -> list[torch.Tensor]:
    """The tensors of ``kind`` in a batch's inputs (in its mappings, tuples and lists too)."""
    return [v for v in tensors_in(x) if kind(v)]


_CHANNELS = re.compile(r"to have (\d+) channels")  # torch's conv error on the input's layout


def _integer_hint(x, exc: Exception | None = None) -> str:
    """Raw images come as uint8, which DiagQL passes on unchanged (integer inputs are token
    ids and masks): a float model then fails on the dtype, which this names. Not where the
    error is a convolution's about channels: the dtype got that far (a model that calls
    ``x.float()`` itself), and the layout is to blame (sweep SY2)."""
    if not _tensors_where(x, lambda v: v.dtype == torch.uint8 and v.ndim >= 3) or \
            (exc is not None and _CHANNELS.search(str(exc))):
        return ""
    return (" (the data's inputs are uint8, which DiagQL passes on unchanged: convert them to "
            "floats, scaled as the model was trained, in the data)")


def _layout_hint(x, exc: Exception) -> str:
    """Images as a PIL or numpy pipeline leaves them, (N, H, W, C), fed to a convolution that
    takes (N, C, H, W): torch's error names the channels it got, not the layout, or the
    uint8 dtype first, whose remedy then meets the layout's error (SW2)."""
    expected = _CHANNELS.search(str(exc))
    if expected is not None:
        wanted = int(expected.group(1))
        kind = (lambda v: v.ndim == 4 and v.shape[3] == wanted != v.shape[1])
    elif _integer_hint(x):  # the dtype's error comes first
        kind = (lambda v: v.ndim == 4 and v.shape[3] in (1, 3, 4) and v.shape[1] not in (1, 3, 4))
    else:
        return ""
    if not _tensors_where(x, kind):
        return ""
    return (" (the images look channels-last, (N, H, W, C), as PIL and numpy hold them: "
            "permute them to (N, C, H, W) in the data, e.g. x.permute(2, 0, 1) per item)")


_PRODUCT = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x")


def _features_hint(x, exc: Exception) -> str:
    """A Linear given rows of another width than its own: torch names the two widths, not the
    data, whose items' shape is then said (sweep S36: data of 7 features for a model of 10)."""
    found = _PRODUCT.search(str(exc))
    if found is None or not isinstance(x, torch.Tensor) or x.ndim < 2:
        return ""
    given, takes = int(found.group(2)), int(found.group(3))
    return (f" (a Linear layer got rows of {given} value{'s' * (given != 1)} where it takes "
            f"{takes}: the data's items have shape {tuple(x.shape[1:])}; check that they are "
            f"what the model takes)")


def _arguments(model, inputs: Mapping) -> tuple[tuple, dict]:
    """The arguments a mapping makes; refused when forward takes no argument of such a name
    (the model's own TypeError would blame the model)."""
    inputs = dict(inputs)
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return (), inputs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return (), inputs
    names = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)]
    unknown = [k for k in inputs if k not in names]
    if not unknown:
        return (), inputs
    if len(inputs) == 1:
        return (next(iter(inputs.values())),), {}
    # A key that reads as labels left among the inputs: another key was taken as the labels.
    labels = [k for k in unknown if k in LABEL_KEYS]
    taken = [k for k in names if k in LABEL_KEYS and k not in inputs]  # forward's, popped
    also = "" if not labels else (
        f" ({labels[0]!r} reads as labels, but "
        f"{f'{taken[0]!r}, which forward takes,' if taken else 'another key'} was taken as "
        f"them: if {labels[0]!r} holds the labels, say label_key={labels[0]!r})")
    raise DiagQLError(
        f"the model's forward({', '.join(p.name for p in params)}) has no argument named "
        f"{', '.join(map(repr, unknown))}{also}; the entries of a mapping batch (all but the "
        f"labels) are passed as keyword arguments: rename or drop those keys (a collate_fn "
        f"can), {NAME_LABEL_KEY} if they are the labels, or hand the mapping whole as ((mapping,), y)")


def kept_copy(batch):
    """A deep copy of a batch as read, each tensor with autograd history (inputs made from a
    gradient and not detached: ``X + eps * X.grad.sign()``) copied detached, which deepcopy
    refuses for a tensor that is no leaf: every query had failed with its traceback (sweep
    LL1). The tensors are found in mappings, sequences and objects' attributes."""
    memo: dict = {}
    seen: set = set()
    stack = [batch]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                memo[id(value)] = value.detach().clone()
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif not isinstance(value, type):  # an object's attributes, __slots__ ones too
            stack.extend(vars(value).values() if hasattr(value, "__dict__") else ())
            stack.extend(getattr(value, name) for cls in type(value).__mro__
                         for name in _slots(cls) if hasattr(value, name))
    return copy.deepcopy(batch, memo)


def _slots(cls) -> tuple:
    slots = cls.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)
