"""What a layer's output means per item: the module's activation found in what it returns, its
batch axis moved first, sequences unpacked with their real tokens, and ``View.rows``, the one
function that turns a module's output into one row per item (docs/ARCHITECTURE.md, "Data
model"). The executor's consumers, EVALUATE and the profile all read outputs through it."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from diagql.errors import ExecutionError
from diagql.model.input_masks import NoRealToken, input_attention_mask
from diagql.model.neuron_labels import neuron_labels

FLAT = "flat"  # neurons are the per-item output's elements in C order; CHANNELS: axis 0's means
SEQUENCE = "sequence"  # (sequence, hidden) per item: neurons are the hidden units
# A map of rank >= 3 per item whose channels are its last axis, (H, W, C): a permuted map, as
# ConvNeXt's blocks and Swin's stages make. Neurons as FLAT's; CHANNELS: the last axis' means.
CHANNELS_LAST = "channels_last"
REDUCTIONS = ("mean", "max", "token", "all")  # how a sequence's tokens become one row


def first_output(output):
    """The activation in what a module returns: a tensor (nested ones included) or a
    PackedSequence, itself or the first one in a tuple, list, dict or dataclass (in order; a
    0-d tensor beside it, an auxiliary loss, is passed over), or the ``logits``/
    ``last_hidden_state`` of a Hugging Face output or a dict; None when there is none.
    A PackedSequence is one activation, never searched for its ``data``. A quantized tensor (a
    statically quantized model's layers) is its dequantized values: its integer codes are no
    activations, and a cast of them neither."""
    if isinstance(output, torch.Tensor) and output.is_quantized:
        return output.dequantize()
    if isinstance(output, (torch.Tensor, PackedSequence)):
        return output
    for attr in ("logits", "last_hidden_state"):
        # A plain dict's too: {"hidden": h, "logits": z} is a model's logits, not h.
        value = output.get(attr) if isinstance(output, Mapping) else getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return first_output(value)
    if isinstance(output, Mapping):
        values = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        # A plain dataclass output, read as a Hugging Face output (also a Mapping) is: fields
        # in order (getattr, not asdict, which would deep-copy every tensor).
        values = [getattr(output, f.name) for f in dataclasses.fields(output)]
    else:
        return None
    scalar = None  # a 0-d tensor (a loss, a count) is never one row per item: passed over
    for value in values:
        found = first_output(value)
        if isinstance(found, torch.Tensor) and found.ndim == 0:
            scalar = found if scalar is None else scalar
        elif found is not None:
            return found
    return scalar


def describe_output(output) -> str:
    """What a module returned, for messages: 'a tuple holding a tensor of shape (5, 3, 16)'."""
    first = first_output(output)
    if first is None:
        return f"{_a(type(output).__name__)} holding no tensor"
    if isinstance(first, PackedSequence):
        what = (f"a PackedSequence of {int(first.batch_sizes[0])} sequences (data "
                f"{tuple(first.data.shape)})")
    elif first.is_nested:
        what = f"a nested tensor of {first.size(0)} components"
    else:
        what = f"a tensor of shape {tuple(first.shape)}"
    if first is output:
        return what
    where = _place_of(output, first)
    return f"{_a(type(output).__name__)} holding {what}" + (f" at {where}" if where else "")


def _place_of(output, found) -> str | None:
    """Where in ``output`` the tensor ``found`` is: "key 'attn'", "position 0", "field
    'hidden'"; None where it is deeper than one level, or not there at all."""
    if isinstance(output, Mapping):
        entries = [(f"key {key!r}", value) for key, value in output.items()]
    elif isinstance(output, (tuple, list)):
        entries = [(f"position {i}", value) for i, value in enumerate(output)]
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        entries = [(f"field {f.name!r}", getattr(output, f.name))
                   for f in dataclasses.fields(output)]
    else:
        return None
    return next((place for place, value in entries if value is found), None)


def _a(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


# --- padding masks --------------------------------------------------------------------------

# Modules that take a key padding mask (True or -inf: padding), and the argument holding it.
_PADDING_ARGS = ((nn.Transformer, "tgt_key_padding_mask"),
                 (nn.TransformerEncoder, "src_key_padding_mask"),
                 (nn.TransformerEncoderLayer, "src_key_padding_mask"),
                 (nn.TransformerDecoder, "tgt_key_padding_mask"),
                 (nn.TransformerDecoderLayer, "tgt_key_padding_mask"),
                 (nn.MultiheadAttention, "key_padding_mask"))


def padding_argument(module: nn.Module) -> str | None:
    """The name of the key padding mask argument ``module`` takes, or None."""
    return next((arg for cls, arg in _PADDING_ARGS if isinstance(module, cls)), None)


@functools.lru_cache(maxsize=None)
def _position(cls: type, arg: str) -> int | None:
    params = list(inspect.signature(cls.forward).parameters)[1:]  # less self
    return params.index(arg) if arg in params else None


NOT_GOVERNING = object()  # padding_mask's answer for a call whose mask is not its outputs'


def padding_mask(module: nn.Module, args: tuple, kwargs: dict):
    """The key padding mask (batch, sequence) a module was called with, None when it was
    called without one, or NOT_GOVERNING when its mask does not say which positions of its
    output (and of its submodules' outputs) are real: a cross-attention's mask covers its
    keys (the encoder's memory), while its output has one row per query.

    The innermost module around a layer that takes a mask and governs decides, None
    included: an nn.Transformer's encoder called without src_key_padding_mask has no padding,
    whatever the tgt_key_padding_mask given to the nn.Transformer around it (hooks.py and the
    catalog's probe read it so)."""
    arg = padding_argument(module)
    if arg is None:
        return NOT_GOVERNING
    if isinstance(module, nn.MultiheadAttention) and not _self_attention(module, args, kwargs):
        return NOT_GOVERNING
    value = kwargs.get(arg)
    if value is None:
        index = _position(type(module), arg)
        value = args[index] if index is not None and index < len(args) else None
    return value if isinstance(value, torch.Tensor) and value.ndim == 2 else None


def _self_attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> bool:
    """Whether the attention's queries are its keys (one tensor, or one view of the same
    memory), so that its key padding mask covers its output's positions too."""
    def argument(name, index):
        return kwargs[name] if name in kwargs else args[index] if len(args) > index else None

    query, key = argument("query", 0), argument("key", 1)
    if query is key:
        return True
    return (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)
            and query.shape == key.shape and query.stride() == key.stride()
            and query.data_ptr() == key.data_ptr())


def named_inputs(inputs, model: nn.Module):
    """A batch input that DiagQL spreads over the model's positional arguments (a tuple or
    list) as a mapping of their names (``forward(self, input_ids, attention_mask)``), so that
    its ``attention_mask`` is found as a mapping's is; any other input as it is."""
    if not isinstance(inputs, (tuple, list)):
        return inputs
    names = _positional_names(type(model))
    return dict(zip(names, inputs)) if names is not None and len(inputs) <= len(names) \
        else inputs


@functools.lru_cache(maxsize=None)
def _positional_names(cls: type) -> tuple[str, ...] | None:
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # less self
    except (TypeError, ValueError):
        return None
    return tuple(p.name for p in params
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


@dataclass(frozen=True)
class ModuleCall:
    """One call of a hooked module, as a hook sees it: what it returned, the innermost key
    padding mask given to it or to a module around it, and the batch (input, item count);
    ``args``: the call's positional arguments (the first tensor among them: the ids whose
    tokens an encoder-decoder's shared embedding reads, model/input_masks.py ``mask_key``)."""

    output: object
    padding: torch.Tensor | None
    inputs: object
    size: int
    args: tuple = ()

    @property
    def ids(self):
        return next((a for a in self.args if isinstance(a, torch.Tensor)), None)


def sequence_of(layer, call: ModuleCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A sequence layer's output as (batch, sequence, hidden) values and the real tokens
    (batch, sequence) bool, or None when every position counts. Real tokens come from the
    output itself (PackedSequence or nested tensor lengths), else from a key padding mask given
    to the module or a module around it, else from the ``attention_mask`` of a mapping batch
    input, each used only when its length is the output's sequence length."""
    out = first_output(call.output)
    lengths = None
    if isinstance(out, PackedSequence):
        # pad_packed_sequence puts the sequences back in the order the batch had.
        values, lengths = pad_packed_sequence(out, batch_first=True)
    elif isinstance(out, torch.Tensor) and out.is_nested:
        parts = out.unbind()
        if any(p.ndim != 2 for p in parts):
            raise _unexpected(layer, call, "a nested tensor of (sequence, hidden) items")
        lengths = torch.tensor([p.shape[0] for p in parts])
        values = torch.nested.to_padded_tensor(out, 0.0)
    else:
        values = batch_first(layer, call)
        if values.ndim != 3:
            raise _unexpected(layer, call, "(batch, sequence, hidden) values")
    if values.shape[0] != call.size:
        raise _unexpected(layer, call, f"{call.size} sequences, one per item of the batch")
    if values.shape[2] != layer.shape[-1]:
        raise _unexpected(layer, call, f"a hidden size of {layer.shape[-1]}")
    length = values.shape[1]
    if lengths is not None:
        real = torch.arange(length, device=values.device)[None, :] < \
            lengths.to(values.device)[:, None]
        return values, real
    padding = call.padding
    if padding is not None and tuple(padding.shape) == tuple(values.shape[:2]):
        real = ~padding if padding.dtype == torch.bool else padding == 0
        return values, real.to(values.device)
    mask = input_attention_mask(call.inputs, layer.module or layer.name, call.ids,
                                layer.input_mask_key, length)
    if mask is not None and tuple(mask.shape) == tuple(values.shape[:2]):
        return values, (mask != 0).to(values.device)
    return values, None


def batch_first(layer, call: ModuleCall) -> torch.Tensor:
    """A tensor output with the catalog's batch axis first, checked against the batch."""
    out = first_output(call.output)
    if not isinstance(out, torch.Tensor) or out.is_nested:
        raise _unexpected(layer, call, "a tensor, as in the catalog probe")
    if out.ndim != len(layer.shape) + 1:
        raise _unexpected(layer, call, f"{len(layer.shape) + 1} dimensions, as in the catalog "
                                       f"probe")
    if out.shape[layer.batch_axis] != call.size:
        raise _unexpected(layer, call, f"{call.size} items along axis {layer.batch_axis}, its "
                                       f"batch axis")
    if not (out.is_floating_point() or out.is_complex()):
        # A mask or indices (bool, int) are numbers too; ARGMAX and the samplers' reductions
        # take no bool, so rows are floats: float64 holds every int32 exactly.
        out = out.to(torch.float32 if out.dtype in (torch.bool, torch.uint8, torch.int8)
                     else torch.float64)
    return out.movedim(layer.batch_axis, 0) if layer.batch_axis else out


def _unexpected(layer, call: ModuleCall, wanted: str) -> ExecutionError:
    return ExecutionError(f"layer {layer.name!r} returned {describe_output(call.output)} for a "
                          f"batch of {call.size} items, where DiagQL expected {wanted}")


def input_rows(call: ModuleCall, module: str | None = None) -> torch.Tensor:
    """The input of the final linear layer (``module``) as one row per item (the profile's
    latent): a (batch, sequence, features) input is averaged over its real tokens, as a
    sequence layer's output is (the layer maps its last axis)."""
    x = first_output(call.output)
    if not isinstance(x, torch.Tensor) or x.is_nested or x.ndim < 1 or x.shape[0] != call.size:
        rows = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim else 0
        several = rows > call.size and rows % call.size == 0  # a multiple-choice model's (SS2)
        raise ExecutionError(
            f"the input of the latent layer{'' if module is None else f' {module!r}'} (the final "
            f"Linear's, by default) is {describe_output(call.output)}, not a tensor of one row "
            f"per item of the batch of {call.size}" + (
                f", {rows // call.size} rows an item (a multiple-choice model's choices "
                f"flattened into the batch?), where the latent DiagQL samples in is one row "
                f"per item; if a layer is, name it" if several else " (a head applied before "
                "the batch axis comes first?): name a layer whose output is one row per item") +
            " as the latent, connect(..., latent=NAME), --latent NAME or SET latent = NAME")
    if x.ndim != 3:
        return x.flatten(1)
    mask = input_attention_mask(call.inputs, module)
    real = (mask != 0).to(x.device) if mask is not None and mask.shape == x.shape[:2] else None
    return _mean(x, real, "the input of the latent layer")


# --- views ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """How a query sees a layer: which row per item the hook makes (``rows``) and which
    neurons a query ranks (``finish``). ``layer`` is a LayerInfo (model/layers.py).

    A flat layer's rows are its outputs flattened; a sequence layer's rows are one hidden
    vector per item by ``reduction`` (``mean`` or ``max`` over its real tokens, ``token`` the
    ``position``-th real token, -1 the last), or every (position, unit) for ``all``."""

    layer: object
    reduction: str | None = None  # sequence layers only; None: "mean"
    position: int | None = None  # TOKEN n
    channels: bool = False

    def __post_init__(self):
        if self.sequence and self.reduction is None:
            object.__setattr__(self, "reduction", "mean")

    @property
    def sequence(self) -> bool:
        return self.layer.layout == SEQUENCE

    @property
    def _early_channels(self) -> bool:
        # A flat layer whose shape changes with the batch has no fixed rows to keep: its
        # channel means are taken inside the hook instead.
        return self.channels and self.layer.varies

    @property
    def key(self) -> str:
        """The activation cache's row key: the layer, and for sequences how tokens reduce."""
        parts = [self.layer.name]
        if self.sequence:
            parts.append(self.text())
        elif self._early_channels:
            parts.append("CHANNELS")
        return json.dumps(parts)

    @property
    def held_key(self) -> str:
        """The key the profile holds this view's rows under (model/same_rows.py): a CHANNELS
        view's channel means have their own (a fixed map's ``key`` is its whole rows')."""
        if self.channels and not self._early_channels:
            return json.dumps([self.layer.name, "CHANNELS"])
        return self.key

    @property
    def width(self) -> int:
        """Values per item in ``rows``."""
        shape = self.layer.shape
        if self.sequence:
            return int(np.prod(shape)) if self.reduction == "all" else shape[-1]
        return self.layer.channels if self._early_channels else int(np.prod(shape))

    @property
    def neurons(self) -> int:
        """Values per item after ``finish``: what a query ranks and averages."""
        return self.layer.channels if self.channels else self.width

    def text(self) -> str:
        """The clause that asks for this view (empty for a flat layer)."""
        if not self.sequence:
            return ""
        if self.reduction == "token":
            return f"TOKEN {self.position}"
        return f"TOKENS {self.reduction.upper()}"

    def describe(self) -> str:
        """What one item's row is, for EXPLAIN."""
        if not self.sequence:
            if self.channels:
                return "each channel's mean over the rest of the item's output"
            return "the item's output, flattened in C order"
        real = f"real tokens ({self.layer.mask})"
        if self.reduction == "all":
            return "every (position, unit) of the item's output, padding included"
        if self.reduction == "token":
            n = self.position
            which = {0: "first", -1: "last"}.get(n, f"number {n} (from 0)" if n >= 0 else
                                                 f"number {-n} from the end")
            return f"each hidden unit at the item's {which} real token; {real}"
        return f"each hidden unit's {self.reduction} over the item's {real}"

    def labels(self, neurons) -> list[str]:
        """``fc1[5]``, ``conv2[3,1,4]`` (C-order), ``conv2[3]`` (channels), ``enc[u]``
        (a sequence's hidden unit) or ``enc[pos,u]`` (TOKENS ALL)."""
        shape = self.layer.shape
        flat = self.channels or (self.sequence and self.reduction != "all")
        return neuron_labels(self.layer.name, shape, neurons, flat)

    def rows(self, call: ModuleCall) -> torch.Tensor:
        """One row of ``width`` values per item of the batch, reduced or copied here, inside
        the hook, before a later in-place op can overwrite the output."""
        layer = self.layer
        if self.sequence:
            values, real = sequence_of(layer, call)
            return self._reduce(values, real)
        values = batch_first(layer, call)
        if self._early_channels:
            last = layer.layout == CHANNELS_LAST
            if values.shape[-1 if last else 1] != layer.channels:
                raise _unexpected(layer, call, f"{layer.channels} channels")
            if last:
                return values.flatten(1, -2).mean(dim=1, dtype=torch.float64)
            return values.flatten(2).mean(dim=2, dtype=torch.float64)
        if tuple(values.shape[1:]) != layer.shape:
            if len(values.shape[1:]) == len(layer.shape):  # the data padded per batch?
                raise ExecutionError(
                    f"layer {layer.name!r} gave each item an output of shape "
                    f"{tuple(values.shape[1:])} in a batch of {call.size} items, where the "
                    f"probe's batches of the data's first items gave {tuple(layer.shape)}: its "
                    f"shape changes with the batch (data padded to each batch's longest "
                    f"item, which the first items did not show), so its neurons are not fixed; "
                    f"pad every item to one length")
            raise _unexpected(layer, call, "each item's output of shape "
                                           f"{tuple(layer.shape)}, as in the catalog probe")
        # reshape, not flatten(1): an output of one value per item, shape (batch,), is one neuron.
        return values.reshape(len(values), -1)

    def unit_rows(self, call: ModuleCall, unit: int) -> torch.Tensor:
        """``rows``' column ``unit`` of a sequence view reduced per hidden unit (TOKENS MEAN,
        MAX or TOKEN n), that unit's tokens reduced alone: TOPK INPUTS of one neuron of a
        50,257-unit output need not reduce the others (1.5 s for 200 items of 8 tokens,
        five times the model's pass; docs/ARCHITECTURE.md, "Top inputs")."""
        values, real = sequence_of(self.layer, call)
        return self._reduce(values[..., unit:unit + 1], real)

    def finish(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows to the neurons a query aggregates (the channel means of a fixed shape)."""
        if not self.channels or self._early_channels:
            return rows
        if self.layer.layout == CHANNELS_LAST:
            return rows.reshape(len(rows), -1, self.layer.channels).mean(dim=1,
                                                                         dtype=torch.float64)
        return rows.reshape(len(rows), self.layer.channels, -1).mean(dim=2, dtype=torch.float64)

    def _reduce(self, values: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        name = self.layer.name
        if self.reduction == "all":
            if values.shape[1] != self.layer.shape[0]:
                raise ExecutionError(
                    f"TOKENS ALL needs one sequence length, but layer {name!r} has "
                    f"{values.shape[1]} positions in this batch and {self.layer.shape[0]} in the "
                    f"catalog probe (padded to each batch's longest item); use TOKENS MEAN, "
                    f"TOKENS MAX or TOKEN n")
            return values.flatten(1)
        if real is not None and not bool(real.any(dim=1).all()):
            raise NoRealToken(name, int((~real.any(dim=1)).nonzero()[0, 0]))
        if self.reduction == "mean":
            return _mean(values, real, f"layer {name!r}")
        if self.reduction == "max":
            if real is not None:
                values = torch.where(real[:, :, None], values, float("-inf"))
            return values.amax(dim=1)
        return values[torch.arange(len(values), device=values.device),
                      self._positions(values, real)]

    def _positions(self, values: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Each item's position of TOKEN n: its n-th real token (from 0; -1 the last)."""
        n, length = self.position, values.shape[1]
        if real is None:
            real = torch.ones(values.shape[:2], dtype=torch.bool, device=values.device)
        counts = real.sum(dim=1)
        wanted = counts + n + 1 if n < 0 else torch.full_like(counts, n + 1)
        if not bool(((wanted >= 1) & (wanted <= counts)).all()):
            f = int(counts.min())
            raise ExecutionError(f"TOKEN {n} is past the end of an item with {f} real token"
                                 f"{'s' * (f != 1)} of {length} at layer {self.layer.name!r}: "
                                 f"TOKEN n reads every matching item's, so n runs from -{f} "
                                 f"to {f - 1} for it; TOKEN -1 reads each item's last")
        hit = (real.cumsum(dim=1) == wanted[:, None]) & real
        return hit.to(torch.int8).argmax(dim=1)


def _mean(values: torch.Tensor, real: torch.Tensor | None, where: str) -> torch.Tensor:
    """The mean over axis 1 (the real tokens only); float32 rows at least, so that a mean of
    float16 values keeps its digits. Summed in float64, but float32 values with their mask by a
    float32 batched product (in float64 20-30x as long: a BERT layer's batch 4 ms to 90 ms), so
    two items of the same tokens in another order may differ in the last bit."""
    wide = torch.float64 if values.dtype == torch.float64 else torch.float32
    if real is None:
        return values.mean(dim=1, dtype=torch.float64).to(wide)
    counts = real.sum(dim=1, keepdim=True)
    if not bool((counts > 0).all()):
        raise ExecutionError(f"an item of this batch has no real token at {where}")
    if values.dtype in (torch.float32, torch.float64) and values.ndim == 3:
        # The mask's product with the values, batch by batch: no copy of them (a 50,257-token
        # LM head's (256, 8, V) output: 2.5 s of the profile's 4.2 s in where() and sum()).
        total = torch.bmm(real[:, None, :].to(values.dtype), values)[:, 0]
        if bool(torch.isfinite(total).all()):
            return (total.to(torch.float64) / counts).to(wide)
    # where(), not a product: a padding position may hold NaN (a fully masked attention row).
    total = torch.where(real[:, :, None], values, 0).sum(dim=1, dtype=torch.float64)
    return (total / counts).to(wide)
