"""Which positions of a batch's sequences are real tokens, from the model's input: its
``attention_mask`` (a decoder's ``decoder_attention_mask``), or each item's length where a
model takes lengths instead (``forward(self, x, lengths)``, as classic LSTM classifiers are
written); model/views.py reads a layer's real tokens with them (docs/ARCHITECTURE.md, "Data
model": real tokens).

Lengths mark padding only where the positions past them are padding: the sequence beside
them holds one value there (a padding collate's zeros). A model that takes lengths over
sequences stored whole (every position a real value, the lengths used for something else)
keeps every position, as it had.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

# Names under which a model takes each item's real length beside its padded sequences: its
# padding had counted in TOKENS MEAN of an LSTM over padded steps (7-11% off), unmasked.
LENGTH_KEYS = ("lengths", "lens", "seq_lens", "seq_lengths", "sequence_lengths",
               "input_lengths", "text_lengths", "src_lengths", "x_lengths", "x_lens")


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
        past = sequence[~real.to(sequence.device)]
        if not past.numel() or bool((past == past.reshape(-1)[0]).all()):
            return real
    return None


_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask")


def mask_key(inputs, module: str | None = None) -> str | None:
    """Which mask of a mapping model input marks the real tokens of ``module``'s outputs:
    ``attention_mask``; but in an encoder-decoder model's input (decoder_input_ids beside
    input_ids: T5's, Bart's), every module outside the encoder (its name has no "encoder"
    part: the decoder, the LM head) has the decoder's tokens, marked by
    ``decoder_attention_mask`` (None without one: every decoder position is real)."""
    if not isinstance(inputs, Mapping):
        return None
    if module is not None and any(key in inputs for key in _DECODER_INPUTS) and \
            "encoder" not in module.split("."):
        return "decoder_attention_mask" if "decoder_attention_mask" in inputs else None
    # Else each item's length, where the model takes those (``length_key``).
    return "attention_mask" if "attention_mask" in inputs else length_key(inputs) or \
        "attention_mask"


def input_attention_mask(inputs, module: str | None = None) -> torch.Tensor | None:
    """The mask (batch, sequence) of a mapping model input (1: a real token) that marks the
    real tokens of ``module``'s outputs (``mask_key``, maybe the items' lengths): a tuple's
    is named by ``named_inputs``."""
    key = mask_key(inputs, module)
    if key in LENGTH_KEYS:
        return lengths_mask(inputs, key)
    mask = None if key is None else inputs.get(key)
    return mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
