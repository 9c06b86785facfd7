"""What an item looks like to a person: an image to draw as a thumbnail, or its tokens.

Read from the item's model input as the data source serves it: an image-shaped tensor of
float or 8-bit pixels ((C, H, W) with 1 or 3 channels, (H, W, C), (H, W), or a flat square
such as MNIST's 784), alone or under a mapping's key (``pixel_values`` first: IMAGE_KEYS);
integer token ids (a tensor, or ``input_ids`` of a mapping, padding left out by its
``attention_mask``), shown as tokens through the connection's ``tokenizer`` (a Hugging Face
tokenizer, or a vocabulary: a sequence or mapping from id to token) or as ids without one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from diagql.errors import ItemsElsewhere

MAX_TOKENS = 64  # tokens shown per item


def previews(source, items: np.ndarray, tokenizer=None) -> tuple:
    """Per item of ``items`` (any order): a float array (H, W) or (H, W, 3), a list of token
    strings, or None when the input is neither an image nor tokens."""
    items = np.asarray(items, dtype=np.int64)
    shown: list = [None] * len(items)
    if len(items) == 0:
        return ()
    order = np.argsort(items, kind="stable")
    try:
        for idx, x, _ in source.batches(items[order], len(items)):
            for j in range(len(idx)):
                shown[order[j]] = _preview(x, j, tokenizer)
    except ItemsElsewhere:  # a Ray Dataset's items live on the workers: nothing to show
        return tuple([None] * len(items))
    return tuple(shown)


# The keys of a mapping's image, tried in this order before its other tensors.
IMAGE_KEYS = ("pixel_values", "image", "images", "img", "x", "inputs", "input")


def _preview(x, j: int, tokenizer):
    if isinstance(x, Mapping):
        ids = x.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            # An image under any key (Hugging Face's pixel_values, a datasets Image column):
            # a mapping without input_ids had been shown blank (the sweep SS7).
            keys = [k for k in IMAGE_KEYS if k in x] + [k for k in x if k not in IMAGE_KEYS]
            return next((shown for shown in (_image_of(x[k], j) for k in keys)
                         if shown is not None), None)
        mask = x.get("attention_mask")
        row = ids[j]
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
            row = row[mask[j] != 0]
        return _tokens(row, tokenizer)
    if isinstance(x, (tuple, list)):
        return _preview(x[0], j, tokenizer) if x else None
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        return None
    item = x[j].detach().cpu()
    if not item.is_floating_point() and item.dtype != torch.uint8:
        return _tokens(item, tokenizer) if item.ndim == 1 else None
    return image(item.to(torch.float32).numpy())


def _image_of(x, j: int) -> np.ndarray | None:
    """Item j of a batch tensor as an image, where it is float or 8-bit pixels (an image
    file's decoded bytes) and image-shaped; else None."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        return None
    item = x[j].detach().cpu()
    if not item.is_floating_point() and item.dtype != torch.uint8:
        return None
    return image(item.to(torch.float32).numpy())


def image(a: np.ndarray) -> np.ndarray | None:
    """An input as an image (H, W) or (H, W, 3), or None when it does not look like one."""
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[2] in (1, 3):
        a = a[:, :, 0] if a.shape[2] == 1 else a
    elif a.ndim == 1:
        side = math.isqrt(len(a))
        if side < 4 or side * side != len(a):
            return None
        a = a.reshape(side, side)
    if a.ndim not in (2, 3) or min(a.shape[:2]) < 4:
        return None
    return a


def _tokens(ids: torch.Tensor, tokenizer) -> list[str]:
    ids = [int(i) for i in ids[:MAX_TOKENS].tolist()]
    if tokenizer is None:
        return [str(i) for i in ids]
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return [str(tokenizer[i]) if _has(tokenizer, i) else str(i) for i in ids]


def _has(vocabulary, i: int) -> bool:
    if isinstance(vocabulary, Mapping):
        return i in vocabulary
    return 0 <= i < len(vocabulary)
