"""The layers a query can name: every submodule, with what its output is per item (found by
model/probing.py; docs/ARCHITECTURE.md, "Data model"), and the catalog of them."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from torch import nn

from diagql.model.hooks import call_name
from diagql.model.repeatable import UNREPEATABLE
from diagql.model.scores import Scores
from diagql.model.views import CHANNELS_LAST, FLAT, SEQUENCE


@dataclass(frozen=True)
class LayerInfo:
    """A queryable layer: its name, type, per-item output shape (batch axis removed) and how
    its output is read (model/views.py). A layer is a module that runs once per forward pass,
    or one call of a module that runs ``calls`` times (``block.relu#2``: ``call`` 2 of
    ``module``); such a module's own entry has no shape and lists its calls."""

    name: str
    type_name: str
    shape: tuple[int, ...] | None  # None: the module does not run, or cannot be queried
    calls: int  # the module's calls per forward pass
    batch_axis: int = 0  # the axis of the module's output that indexes items
    form: str = "tensor"  # "tensor" | "packed" (PackedSequence) | "nested" (nested tensor)
    layout: str = FLAT  # FLAT; SEQUENCE: shape is (sequence, hidden); or CHANNELS_LAST
    found: str = ""  # how the batch axis (and the layout) were found, for DESCRIBE
    varies: bool = False  # a per-item size other than the batch changed between probes
    mask: str = ""  # a sequence's real tokens: where they come from, for DESCRIBE and EXPLAIN
    refused: str = ""  # why a module that runs cannot be queried ("" when it can)
    call: int = 0  # n >= 1: this layer is the module's n-th call; 0: the module itself
    module: str = ""  # the module's qualified name ("" becomes ``name``)
    # The module whose output, unchanged since, was its call's one tensor in the probe ("":
    # several tensors, the model's input, or one made or changed between modules): whose
    # function of its output the layer is (model/probing.py, ``_fed_by``).
    fed_by: str = ""

    def __post_init__(self):
        if not self.module:
            object.__setattr__(self, "module", self.name)

    @property
    def shared(self) -> bool:
        """A module that runs several times per pass, named as a whole: a query names a call."""
        return self.call == 0 and self.calls > 1

    @property
    def batch_padded(self) -> bool:
        """Whether a sequence's length changes with the batch and its padding counts as tokens
        (no mask reaches it, or one of another length): an item's rows then depend on which
        items share its batch (the binder warns)."""
        return self.layout == SEQUENCE and self.form == "tensor" and self.varies and \
            (self.mask == NO_MASK or self.mask.startswith(UNFIT_MASK))

    @property
    def input_mask_key(self) -> str | None:
        """The batch input's mask whose positions this sequence layer's real tokens are, as
        the probe found them (``mask``: ``INPUT_MASK``); None where they come otherwise."""
        head, tail = INPUT_MASK.split("{}")
        if self.mask.startswith(head) and self.mask.endswith(tail):
            return self.mask[len(head):len(self.mask) - len(tail)]
        return None

    @property
    def neurons(self) -> int:
        """Neurons of the default view: a sequence's hidden units, else every element."""
        if self.shape is None:
            return 0
        return self.shape[-1] if self.layout == SEQUENCE else int(np.prod(self.shape))

    @property
    def channels(self) -> int | None:
        """Channel count for a map, a flat output of rank >= 2 (its first axis; a
        channels-last map's last), else None."""
        if self.shape is None or self.layout == SEQUENCE or len(self.shape) < 2:
            return None
        return self.shape[-1] if self.layout == CHANNELS_LAST else self.shape[0]

    def shape_text(self) -> str:
        if self.shape is None:
            if self.shared:
                return f"({self.calls} calls)"
            return "(never runs)" if self.calls == 0 else "(not queryable)"
        if self.layout == SEQUENCE:
            length = "L" if self.varies else str(self.shape[0])
            return f"{length} tokens × {self.shape[1]}"
        return "×".join(str(d) for d in self.shape) if self.shape else "scalar"

    def axes_text(self) -> str:
        """Which axes of the module's output are batch, sequence and hidden, for DESCRIBE."""
        if self.shape is None:
            return self.refused or "(never runs)"
        if self.form != "tensor":
            return f"batch, sequence, hidden after unpacking: {self.found}"
        rank = len(self.shape) + 1
        rest = [axis for axis in range(rank) if axis != self.batch_axis]
        text = f"batch: axis {self.batch_axis} of {rank} ({self.found})"
        if self.layout == SEQUENCE:
            length = (f"{self.shape[0]} in the probe, changing with the batch" if self.varies
                      else f"{self.shape[0]}")
            return (f"{text}; sequence: axis {rest[0]} (length {length}); hidden: axis "
                    f"{rest[1]} ({self.shape[1]} units)")
        if self.layout == CHANNELS_LAST:
            text += (f"; channels: the last axis ({self.channels}), as a Linear or LayerNorm "
                     f"over a permuted map makes them")
        return text + ("; the per-item shape changes with the batch" if self.varies else "")


class LayerCatalog:
    """Layers in module-registration order, found by probing the model."""

    def __init__(self, layers: list[LayerInfo], output_shape: tuple[int, ...],
                 scores: Scores | None = None, head: str = "", notices: tuple[str, ...] = ()):
        self.layers = layers
        # A module's own name wins over a call's of the same text (the probe refuses that call).
        self.by_name = {layer.name: layer for layer in layers if not layer.call}
        for layer in layers:
            self.by_name.setdefault(layer.name, layer)
        self._calls = {(layer.module, layer.call): layer for layer in layers if layer.call}
        self.output_shape = output_shape  # the class scores' per-item shape
        self.scores = scores or Scores()  # where the probe found them in the model's output
        self.head = head  # the module that returned the scores ("" when none did)
        # What the probe warned of about the model and the data (outputs that depend on the
        # batch, reads that differ): warned of again when the catalog is read from the cache.
        self.notices = tuple(notices)
        # A module registered under several names (``self.b = self.a``, a Sequential holding it
        # twice, T5's ``encoder.embed_tokens`` beside ``shared``) is catalogued once, by its
        # first name; its other names map to that one (``module_aliases``, set by the session
        # from the model: a catalog read from the cache gets them too).
        self.aliases: dict[str, str] = {}

    def __repr__(self) -> str:
        names = self.running_names()
        shown = ", ".join(names[:8]) + (f", … ({len(names) - 8} more)" if len(names) > 8 else "")
        return f"<LayerCatalog of {len(names)} layers: {shown}>"

    @property
    def repeatable(self) -> bool:
        """Whether the probe found every pass's rows alike (no notice of reads, passes or
        batches that differ: model/repeatable.py), so that the rows the profile pass kept are
        any pass's: a block's rows rebuilt from its projections are then the exact ones."""
        return not any(notice.startswith(UNREPEATABLE) for notice in self.notices)

    @property
    def batch_dependent(self) -> bool:
        """Whether the probe found an item's outputs changed by the items sharing its batch
        (model/repeatable.py's notice)."""
        return any(notice.startswith(UNREPEATABLE[2]) for notice in self.notices)

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def __getitem__(self, name: str) -> LayerInfo:
        return self.by_name[name]

    def running_names(self) -> list[str]:
        """Names of the layers that can be queried, in order (what messages list)."""
        return [layer.name for layer in self.layers if layer.shape is not None]

    def upstream(self, name: str) -> tuple[str, ...]:
        """The modules whose outputs a layer's input was made from, nearest first, as far as
        each was fed by a module's output (``fed_by``): the chain a layer after a block is a
        function of that block through (engine/extrapolation.py)."""
        chain: list[str] = []
        layer = self.by_name.get(name)
        while layer is not None and layer.fed_by and layer.fed_by not in chain \
                and len(chain) < 64:
            chain.append(layer.fed_by)
            layer = self.by_name.get(layer.fed_by)
        return tuple(chain)

    def module(self, name: str) -> LayerInfo | None:
        """The entry of the module named ``name`` (not one of its calls), or None."""
        layer = self.by_name.get(name)
        return layer if layer is not None and not layer.call else None

    def call(self, module: str, call: int) -> LayerInfo | None:
        """The entry of ``module``'s ``call``-th call per pass, or None."""
        return self._calls.get((module, call))

    def calls_of(self, module: str) -> list[LayerInfo]:
        """The entries of a module's calls, first to last ([] unless it runs several times)."""
        layer = self.module(module)
        calls = layer.calls if layer is not None and layer.shared else 0
        return [self._calls[module, n] for n in range(1, calls + 1) if (module, n) in self._calls]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The disk cache's encoding (storage/store.py stores dicts of arrays, no pickle)."""
        layers = [[layer.name, layer.type_name, None if layer.shape is None else list(layer.shape),
                   layer.calls, layer.batch_axis, layer.form, layer.layout, layer.found,
                   layer.varies, layer.mask, layer.refused, layer.call, layer.module,
                   layer.fed_by]
                  for layer in self.layers]
        # A function given as scores= is not stored: the connection gives it again.
        scores = [None if self.scores.pick else self.scores.at, self.scores.given,
                  self.scores.refusal, self.scores.why, self.scores.probabilities]
        return {"layers": np.str_(json.dumps(layers)),
                "output_shape": np.array(self.output_shape, dtype=np.int64),
                "scores": np.str_(json.dumps(scores)), "head": np.str_(self.head),
                "notices": np.str_(json.dumps(list(self.notices)))}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "LayerCatalog":
        """Decode ``to_arrays``'s output, raising ValueError when it does not list layers."""
        layers = []
        for entry in json.loads(str(arrays["layers"])):
            if not (isinstance(entry, list) and len(entry) in (13, 14)):
                raise ValueError("it does not list layers")
            name, type_name, shape, calls, axis, form, layout, found, varies, mask, refused, \
                call, module, *fed_by = entry  # an older entry's knows no feeder
            fed_by = fed_by[0] if fed_by else ""
            if not (all(isinstance(v, str) for v in (name, type_name, found, mask, refused,
                                                     module, fed_by))
                    and isinstance(calls, int) and isinstance(axis, int)
                    and isinstance(call, int) and not isinstance(call, bool)
                    and isinstance(varies, bool) and form in ("tensor", "packed", "nested")
                    and layout in (FLAT, SEQUENCE, CHANNELS_LAST)
                    and (shape is None or all(isinstance(d, int) for d in shape))):
                raise ValueError("it does not list layers")
            layers.append(LayerInfo(name, type_name, None if shape is None else tuple(shape),
                                    calls, axis, form, layout, found, varies, mask, refused,
                                    call, module, fed_by))
        at, given, refusal, why, probabilities = json.loads(str(arrays["scores"]))
        if not (isinstance(at, (int, str, type(None))) and isinstance(given, bool)
                and isinstance(probabilities, bool)
                and isinstance(refusal, (str, type(None))) and isinstance(why, str)):
            raise ValueError("its scores are not a place in the output")
        notices = json.loads(str(arrays.get("notices", "[]")))
        if not (isinstance(notices, list) and all(isinstance(n, str) for n in notices)):
            raise ValueError("its notices are not text")
        return cls(layers, tuple(int(d) for d in arrays["output_shape"]),
                   Scores(at, None, given, refusal, why, probabilities), str(arrays["head"]),
                   tuple(notices))


def module_aliases(model: nn.Module) -> dict[str, str]:
    """Every other name of a module registered under several: {alias: its first name}, the
    name ``named_modules()`` (and so the catalog) gives it."""
    first: dict[int, str] = {}
    aliases = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        known = first.setdefault(id(module), name)
        if known != name:
            aliases[name] = known
    return aliases


# --- the probe --------------------------------------------------------------------------------

# Outputs of rank 3 (batch, a, b) are sequences (batch, sequence, hidden) unless they come from
# a module that keeps channels first (batch, channels, length), or inherit its output.


NO_MASK = "every position: no padding mask reached it in the probe"
# A sequence layer whose real tokens are those a mask of the batch input marks: its key.
INPUT_MASK = "the {} of the batch input"
# A mask in the batch input of another length than the layer's sequence (an audio encoder's
# samples beside its frames): it marks none of the layer's tokens.
UNFIT_MASK = "every position: the batch input's"


def _linear(module) -> bool:
    """A Linear, a quantized one too (static or dynamic: torch.ao's, no nn.Linear)."""
    if isinstance(module, nn.Linear):
        return True
    from torch.ao.nn.quantized import Linear as QuantizedLinear  # dynamic's is a subclass

    return isinstance(module, QuantizedLinear)


def default_latent(model: nn.Module, catalog: LayerCatalog | None = None) -> str | None:
    """The final linear layer, whose input is the latent vector the paper samples in: the
    Linear that returned the class scores (``catalog.head``, the probe's), else the last in
    the model's own order that runs once per forward pass; one it defines and never calls,
    or calls several times (a siamese encoder's, whose input is no one vector per item),
    only when no other runs."""
    modules = dict(model.named_modules())
    if catalog is not None and catalog.head:
        layer = catalog.module(catalog.head)
        if _linear(modules.get(catalog.head)) and layer is not None and \
                layer.calls == 1:
            return catalog.head
    once = runs = None
    for name, module in modules.items():
        if _linear(module):
            layer = None if catalog is None else catalog.module(name)
            if catalog is None or (layer is not None and layer.calls > 0):
                # Several calls (a per-step head in a loop, a siamese encoder's): the input
                # of its last (``head#6``), one vector per item where the whole is not.
                runs = name if catalog is None or layer.calls == 1 else \
                    call_name(name, layer.calls)
                if catalog is None or layer.calls == 1:
                    once = name
    return once or runs


def mask_source(seen, batch: tuple[int, int]) -> str:
    """Where a sequence layer's real tokens came from in the probe (``seen``: what the probe
    saw of the layer, model/probing.py; views.sequence_of looks in the same places, in the
    same order, in every batch of a query)."""
    if seen.form == "packed":
        return "the PackedSequence's lengths"
    if seen.form == "nested":
        return "the nested tensor's lengths"
    # The innermost module that governs decides, a call without a mask included
    # (views.padding_mask).
    for owner, arg, shape in seen.masks[:1]:
        if shape == batch:
            return f"the {arg} given to {owner or 'the model'}"
    if seen.input_mask == batch or (seen.input_mask is not None and seen.input_mask[0] ==
                                    batch[0] and seen.input_longest == batch[1]):
        return INPUT_MASK.format(seen.input_mask_key)
    if seen.input_mask is not None and seen.input_mask[0] == batch[0]:
        return (f"{UNFIT_MASK} {seen.input_mask_key} marks {seen.input_mask[1]} positions, "
                f"where this layer has {batch[1]}, so it marks none of them")
    return NO_MASK
