"""Which positions of a batch's sequences are real tokens, from the model's input: its
``attention_mask`` (a decoder's ``decoder_attention_mask``), each item's length where a
model takes lengths instead (``forward(self, x, lengths)``, as classic LSTM classifiers are
written), or a padding mask under another name (``forward(self, points, mask)``, as point
cloud and set models are written); model/views.py reads a layer's real tokens with them
(docs/ARCHITECTURE.md, "Data model": real tokens).

A mask under another name has no fixed meaning (torch's key_padding_mask is True at padding,
a PointNet's mask True at real points), so which of its two values marks real positions is
read from the mask and the input beside it (``real_positions``): in every row the real
positions are one run at an end, and the rest hold padding, one value, in the input.

Lengths mark padding only where the positions past them are padding: the sequence beside
them holds one value there (a padding collate's zeros). A model that takes lengths over
sequences stored whole (every position a real value, the lengths used for something else)
keeps every position, as it had.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from diagql.errors import ExecutionError, warn


class NoRealToken(ExecutionError):
    """An item whose padding mask covers every position of a sequence layer (an empty text):
    its TOKENS MEAN, MAX or TOKEN n is undefined. ``row``: its place in the batch, which
    ``forward.call_model`` turns into the item's index (``at_item``)."""

    def __init__(self, layer: str, row: int, item: str | None = None):
        self.layer, self.row, self.item = layer, row, item
        which = f"item {item}" if item is not None else f"item {row + 1} of its batch"
        super().__init__(f"{which} has no real token at layer {layer!r} (its padding mask "
                         f"covers every position), so its tokens' mean, maximum or n-th is "
                         f"undefined; leave the items with no real token (empty texts) out of "
                         f"the data, or, if it has tokens, give a mask that is 1 at them (an "
                         f"attention_mask is 1 at real tokens; one that is True at padding, as "
                         f"torch's key_padding_mask is, reads as the reverse)")

    def at_item(self, item: str) -> NoRealToken:
        return NoRealToken(self.layer, self.row, item)

    def __reduce__(self):  # a Ray worker's error is pickled back to the driver
        return NoRealToken, (self.layer, self.row, self.item)


# Names under which a model takes each item's real length beside its padded sequences: its
# padding had counted in TOKENS MEAN of an LSTM over padded steps (7-11% off), unmasked.
LENGTH_KEYS = ("lengths", "lens", "seq_lens", "seq_lengths", "sequence_lengths",
               "input_lengths", "text_lengths", "src_lengths", "x_lengths", "x_lens")


# Names under which a model takes a padding mask of each item's positions, besides
# ``attention_mask`` (1 at real tokens): a PointNet's ``forward(points, mask)`` had counted
# its padded points in TOKENS MEAN and TOKEN -1 (30-98% off), unwarned.
MASK_KEYS = ("mask", "padding_mask", "pad_mask", "key_padding_mask", "src_key_padding_mask",
             "input_mask", "seq_mask", "sequence_mask", "point_mask", "points_mask", "x_mask")


def length_key(inputs: Mapping) -> str | None:
    """The key of the items' lengths (an integer per item) in a mapping model input, if any;
    whether they mark padding, ``lengths_mask`` tells."""
    return next((key for key in LENGTH_KEYS if _per_item(inputs.get(key))), None)


def _per_item(lengths) -> bool:
    return isinstance(lengths, torch.Tensor) and lengths.ndim == 1 and len(lengths) > 0 and \
        not lengths.is_floating_point() and lengths.dtype != torch.bool


def lengths_mask(inputs: Mapping, key: str) -> torch.Tensor | None:
    """(batch, sequence) True at each item's real positions, the sequence the batch's own
    (batch-first or time-first) sequence input's; None where ``inputs[key]`` is no integer per
    item or the positions past the lengths are no padding (every position then counts, as
    with no mask)."""
    lengths = inputs.get(key)
    if not _per_item(lengths):
        return None
    n = len(lengths)
    for name, value in inputs.items():
        if name == key or not isinstance(value, torch.Tensor) or value.ndim < 2:
            continue
        sequence = value if value.shape[0] == n else \
            value.transpose(0, 1) if value.shape[1] == n else None
        if sequence is None or int(lengths.min()) < 1 or \
                int(lengths.max()) > sequence.shape[1]:
            continue
        steps = torch.arange(sequence.shape[1], device=lengths.device)
        real = steps[None, :] < lengths[:, None]
        if _one_value_past(sequence, real):
            return real
    return None


def _one_value_past(sequence: torch.Tensor, real: torch.Tensor) -> bool:
    """Whether the positions of ``sequence`` (batch, length, ...) that ``real`` leaves out (at
    one end of each row) hold padding: one value in the whole batch (a padding collate's
    zeros), or one in each row (padded items standardised each on its own: sweep SX1, whose
    mask had been read as no padding and its padding averaged in, 0.12-0.23 off) where that
    tells: some row pads two positions or more (one position is always one value: a
    forecast's one masked step had read as padding), and no row's value is its last real
    position's (a forecast window filled forward). An input's own values there (a forecast's
    last steps, a masked language model's tokens) differ."""
    past = ~real.to(sequence.device)
    if not bool(past.any()):
        return True
    values = sequence[past]
    if bool((values == values[:1]).all()):
        return True
    counts = past.sum(dim=1)
    if int(counts.max()) < 2:
        return False
    rows = torch.arange(len(sequence), device=sequence.device)
    right = bool(real[:, 0].all())  # real, then padding; else padding, then real
    first = past.to(torch.int8).argmax(dim=1)  # each row's first padded position
    reference = sequence[rows, first]
    if not bool((sequence == reference.unsqueeze(1))[past].all()):
        return False
    padded = counts > 0
    beside = (first - 1 if right else counts).clamp(0, sequence.shape[1] - 1)
    same = (sequence[rows, beside] == reference).reshape(len(sequence), -1).all(dim=1)
    return not bool((same & padded).any())


def fit_longest(real: torch.Tensor | None, length: int | None) -> torch.Tensor | None:
    """A lengths mask (each row's real positions a run from the start) for a layer of
    ``length`` positions where that is the batch's longest item's (pad_packed_sequence's
    output inside the forward, of ids padded further: a GRU's TOKEN -1 had read padding, 10-15%
    off, under a warning that the lengths marked none of its positions: sweep SS9)."""
    if real is None or length is None or real.shape[1] == length:
        return real
    lengths = real.sum(dim=1)
    if int(lengths.max()) != length:
        return real
    return torch.arange(length, device=real.device)[None, :] < lengths[:, None]


_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask")


def mask_key(inputs, module: str | None = None, ids=None) -> str | None:
    """Which mask of a mapping model input marks the real tokens of ``module``'s outputs:
    ``attention_mask``; but in an encoder-decoder model's input (decoder_input_ids beside
    input_ids: T5's, Bart's), every module outside the encoder (its name has no "encoder"
    part: the decoder, the LM head) has the decoder's tokens, marked by
    ``decoder_attention_mask`` (None without one: every decoder position is real), unless
    it was called on the encoder's ``input_ids`` (``ids``: the call's first tensor
    argument): the shared embedding both stacks call, whose first call's tokens are the
    encoder's."""
    if not isinstance(inputs, Mapping):
        return None
    if module is not None and any(key in inputs for key in _DECODER_INPUTS) and \
            "encoder" not in module.split(".") and not _encoder_ids(inputs, ids):
        return "decoder_attention_mask" if "decoder_attention_mask" in inputs else None
    # Else each item's length, where the model takes those (``length_key``), or a padding
    # mask under another name.
    if "attention_mask" in inputs:
        return "attention_mask"
    return length_key(inputs) or next((key for key in MASK_KEYS if _two_dimensional(
        inputs.get(key))), "attention_mask")


def _encoder_ids(inputs: Mapping, ids) -> bool:
    """Whether ``ids`` are the input's ``input_ids`` (the encoder's tokens) and not its
    ``decoder_input_ids``: equal values, as a view or a reshape of them is."""
    return isinstance(ids, torch.Tensor) and _same_ids(inputs.get("input_ids"), ids) and \
        not _same_ids(inputs.get("decoder_input_ids"), ids)


def _same_ids(given, ids: torch.Tensor) -> bool:
    """Whether ``given`` is a tensor of ``ids``'s values (the very tensor, or a copy)."""
    return given is ids or (isinstance(given, torch.Tensor) and given.shape == ids.shape and
                            given.dtype == ids.dtype and given.device == ids.device and
                            bool(torch.equal(given, ids)))


def token_mask(inputs, ids) -> str | None:
    """The mask of a mapping model input that marks the tokens of its ids tensor ``ids`` is
    (by identity, else equal values): ``attention_mask`` for ``input_ids``, a named one for
    ``doc_ids`` or ``doc_input_ids`` (``doc_attention_mask``: a dual encoder's second input),
    ``decoder_attention_mask`` for ``decoder_input_ids``. None where ``ids`` is none of the
    input's ids (or several alike), or the input holds no such mask. A module called on them,
    and every module it calls, has those tokens (model/probing.py)."""
    if not isinstance(inputs, Mapping) or not isinstance(ids, torch.Tensor):
        return None
    keys = [key for key, value in inputs.items() if isinstance(key, str) and key.endswith("ids")
            and value is ids]
    if not keys:
        keys = [key for key, value in inputs.items() if isinstance(key, str)
                and key.endswith("ids") and _same_ids(value, ids)]
    if len(keys) != 1:
        return None
    stem = keys[0].removesuffix("ids").removesuffix("input_")
    mask = f"{stem}attention_mask"
    return mask if _two_dimensional(inputs.get(mask)) else None


def rival_masks(inputs) -> list[str]:
    """The other attention masks of a mapping model input (keys ending in "attention_mask",
    a decoder's aside) of the shape of the one ``mask_key`` reads outside a decoder: a dual
    encoder's ``doc_attention_mask`` beside ``attention_mask``, both padded to one length. Every
    sequence layer's real tokens are read from that one, so a layer over the other input's
    tokens would be averaged over the wrong positions, which no shape reveals."""
    key = mask_key(inputs)
    chosen = inputs.get(key) if key is not None else None
    if not isinstance(chosen, torch.Tensor):
        return []
    return [other for other, value in inputs.items()
            if isinstance(other, str) and other != key and other.endswith("attention_mask")
            and other != "decoder_attention_mask" and isinstance(value, torch.Tensor)
            and value.shape == chosen.shape]


def _two_dimensional(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.numel() > 0


def input_attention_mask(inputs, module: str | None = None, ids=None,
                         key: str | None = None, length: int | None = None
                         ) -> torch.Tensor | None:
    """The mask (batch, sequence) of a mapping model input (1: a real token) that marks the
    real tokens of ``module``'s outputs (``mask_key``, maybe the items' lengths; ``ids``: the
    call's first tensor argument; ``key``: the input's mask the probe found the layer's tokens
    to follow, ``token_mask``): a tuple's is named by ``named_inputs``. ``length``: the
    layer's sequence length, where known: items' lengths mark a layer as long as the padded
    input, or one as long as the batch's longest item (``fit_longest``)."""
    if key is None or not isinstance(inputs, Mapping) or key not in inputs:
        key = mask_key(inputs, module, ids)
    if key in LENGTH_KEYS:
        return fit_longest(lengths_mask(inputs, key), length)
    if key in MASK_KEYS:
        return real_positions(inputs, key)
    mask = None if key is None else inputs.get(key)
    return mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None


def real_positions(inputs: Mapping, key: str) -> torch.Tensor | None:
    """(batch, sequence) True at the real positions of the padding mask ``inputs[key]``, whose
    name does not fix which of its values marks them (``MASK_KEYS``). A value is real if,
    taking it so, each row's real positions are one run at an end (right or left padding)
    and the positions left hold one value in a sequence input beside the mask (a padding
    collate's zeros): a mask of something else (a forecast's last steps, a masked language
    model's tokens, an inpainting mask) leaves the input's own values there, and had been
    read as padding. Where both values pass, the one of a whole row (the batch's longest
    item), else the value that is not zero unless the name says padding (torch's
    key_padding_mask: True at padding). None where neither passes, or the mask holds more
    than two values."""
    mask = inputs.get(key)
    values = torch.unique(mask)
    if len(values) > 2:
        return None
    if len(values) == 1:
        return torch.ones(mask.shape, dtype=torch.bool, device=mask.device)
    fits = [value for value in values.tolist()
            if _padding_at(inputs, key, mask == value)]
    if len(fits) != 1:
        whole = (mask == mask[:, :1]).all(dim=1)
        truthy = values[1] if bool(values[0] == 0) else values[0]
        falsy = values[0] if bool(truthy == values[1]) else values[1]
        preferred = mask[whole][0, 0] if bool(whole.any()) else \
            falsy if "pad" in key else truthy
        fits = [value for value in fits if value == preferred.item()]
    return mask == fits[0] if fits else None


def _padding_at(inputs: Mapping, key: str, real: torch.Tensor) -> bool:
    """Whether ``real`` marks right or left padding: each row's real positions one run at an
    end (``_runs_at_an_end``), and the others holding padding in a sequence input beside the
    mask (batch-first or time-first: ``_one_value_past``)."""
    if not _runs_at_an_end(real):
        return False
    batch, length = real.shape
    for name, value in inputs.items():
        if name == key or not isinstance(value, torch.Tensor) or value.ndim < 2:
            continue
        # Both ways where the batch is as long as the sequence.
        for sequence in ([value] if tuple(value.shape[:2]) == (batch, length) else []) + \
                ([value.transpose(0, 1)] if tuple(value.shape[:2]) == (length, batch) else []):
            if _one_value_past(sequence, real):
                return True
    return False


def _beside_a_sequence(inputs: Mapping, key: str, shape) -> bool:
    """Whether another input is a sequence of ``shape`` (batch, length), batch-first or
    time-first, as a padding mask's is (a causal mask, (length, length), is no item's)."""
    return any(name != key and isinstance(value, torch.Tensor) and value.ndim >= 2 and
               tuple(shape) in (tuple(value.shape[:2]), tuple(value.shape[1::-1]))
               for name, value in inputs.items())


def _runs_at_an_end(real: torch.Tensor) -> bool:
    """Each row's True positions one run, at least one long, at its start (right padding)
    or at its end (left padding), the same end in every row."""
    steps = real.to(torch.int8).diff(dim=1)
    right = bool(real[:, 0].all()) and bool((steps <= 0).all())  # real, then padding
    left = bool(real[:, -1].all()) and bool((steps >= 0).all())  # padding, then real
    return right or left


def warn_unread_masks(inputs) -> None:
    """Warn where a padding mask under the model's own name (``MASK_KEYS``) looks like padding
    (a run at an end of each row, of lengths that differ) but the input beside it holds no
    padding there (neither one value nor one per row), so that ``real_positions`` cannot tell
    which value marks the real positions: every position then counts as a token, padding
    included (sweep SX1: random values in the padded steps, averaged in unwarned)."""
    if not isinstance(inputs, Mapping):
        return
    for key in MASK_KEYS:
        mask = inputs.get(key)
        if not _two_dimensional(mask) or len(torch.unique(mask)) != 2 or \
                not _beside_a_sequence(inputs, key, mask.shape) or \
                real_positions(inputs, key) is not None:
            continue
        values = torch.unique(mask).tolist()
        if any(_runs_at_an_end(mask == value) and len(set((mask == value).sum(dim=1).tolist())) > 1
               for value in values):
            warn(f"the model's {key!r} argument looks like a padding mask, but the input's "
                 f"positions it would mark as padding hold differing values (not one padding "
                 f"value, nor one per item), so DiagQL cannot tell which of its values, "
                 f"{values[0]!r} or {values[1]!r}, marks the real positions: TOKENS MEAN, MAX "
                 f"and TOKEN -1 count every position, padding included; pad the items with "
                 f"one value (zeros) where the mask marks padding")


def warn_untraced(inputs, untraced: list[str]) -> None:
    """Warn where the input holds several attention masks of one shape (a dual encoder's
    ``doc_attention_mask``) and the sequence layers ``untraced`` could not be traced to the
    ids they run on (over embeddings the model's own forward looked up): their real tokens
    are read from ``mask_key``'s mask, which may be the other input's (model/probing.py)."""
    rivals = rival_masks(inputs)
    if rivals and untraced:
        names = ", ".join(untraced[:3]) + (", …" if len(untraced) > 3 else "")
        chosen = mask_key(inputs)
        warn(f"the model's input holds several attention masks of one shape ({chosen!r}, "
             f"{', '.join(repr(key) for key in rivals)}): DiagQL reads a sequence layer's real "
             f"tokens from the mask of the ids it runs on, but could not trace {names} to an "
             f"input's ids, so their mean over tokens (the default), TOKENS MAX and TOKEN -1 "
             f"are taken over {chosen!r}'s positions; TOKEN 0 is not affected, and a "
             f"connection of that part of the model alone reads its own mask")


def warn_unmasked_padding(model, inputs) -> None:
    """Warn where the items' ``input_ids`` end in the model's pad token (a Hugging Face
    config's ``pad_token_id``) and no mask or lengths come beside them: the model attends to
    that padding, and the token views count its positions as tokens (SW2: a BERT's padded
    items without their mask, 0.14-0.38 off, unwarned)."""
    import inspect

    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if not isinstance(pad, int) or isinstance(pad, bool) or not isinstance(ids, torch.Tensor) \
            or ids.ndim != 2 or length_key(inputs) or \
            any(key in inputs for key in ("attention_mask", *MASK_KEYS)):
        return
    try:  # advice a forward without the argument would refuse
        if "attention_mask" not in inspect.signature(model.forward).parameters:
            return
    except (TypeError, ValueError):
        return
    # Padding: trailing runs of the pad token, of lengths that differ between items (a text
    # may end in the token when it is also the end of text, GPT-2's, or a real token 0).
    padded = ids == pad
    runs = torch.flip(padded, dims=[1]).long().cumprod(dim=1).sum(dim=1)
    if int(runs.max()) >= 1 and len(set(runs.tolist())) > 1 and not bool(padded.all()):
        warn(f"the items' input_ids end in the model's pad token ({pad}, its config's "
             f"pad_token_id) and come with no attention_mask: the model attends to that "
             f"padding, and TOKENS MEAN, MAX and TOKEN -1 count its positions as tokens; give "
             f"each item its attention_mask (input_ids != {pad}) beside its input_ids")


def longest(mask: torch.Tensor | None, key: str | None) -> int | None:
    """The batch's longest item, where ``mask`` is made of the items' lengths (``key``)."""
    return int(mask.sum(dim=1).max()) if mask is not None and key in LENGTH_KEYS else None
