"""How a layer's per-item axes are laid out, from the module that returned it: FLAT (a
vector, or a map with its channels first), SEQUENCE (tokens × hidden) or CHANNELS_LAST (a map
permuted to (H, W, C)); the probe (model/probing.py) decides each layer's, and model/views.py
reads its rows and channels by it (docs/ARCHITECTURE.md, "Data model")."""
from __future__ import annotations

import torch
from torch import nn

from diagql.model.views import CHANNELS_LAST, FLAT, SEQUENCE

_CHANNELS_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d, nn.LPPool1d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.MaxUnpool1d, nn.BatchNorm1d,
                   nn.LazyBatchNorm1d, nn.InstanceNorm1d, nn.LazyInstanceNorm1d, nn.GroupNorm,
                   nn.SyncBatchNorm, nn.Dropout1d, nn.Upsample, nn.ConstantPad1d,
                   nn.ReflectionPad1d, nn.ReplicationPad1d, nn.ZeroPad1d, nn.CircularPad1d)
# Modules whose output's last axis is their features: a map they return is channels-last.
_LAST_AXIS = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Bilinear,
              *[getattr(nn, name) for name in ("RMSNorm",) if hasattr(nn, name)])
# Modules of maps with channels first, beyond the 1-D ones (_CHANNELS_FIRST).
_MAPS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.BatchNorm2d,
         nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.MaxPool2d, nn.MaxPool3d,
         nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout2d, nn.Dropout3d,
         nn.PixelShuffle, nn.PixelUnshuffle)
_SEQUENCES = (nn.RNNBase, nn.Transformer, nn.TransformerEncoder, nn.TransformerEncoderLayer,
              nn.TransformerDecoder, nn.TransformerDecoderLayer, nn.MultiheadAttention,
              nn.Embedding, nn.Linear)


def vector_layout(module: nn.Module, form: str, like: list, layouts: dict,
                  moved_last: bool = False) -> str:
    """A layer of 2-D items: FLAT for channel-first maps (batch, channels, length), else
    SEQUENCE; ``form`` what the probe saw it return, ``like`` the layers (module, call) its
    output is one of or was made from, ``layouts`` theirs. ``moved_last``: its input's last
    axis is stored outside its middle one (the function ``moved_last``): a norm of that axis (a
    LayerNorm's) normalises features moved last, tokens × features, whatever layer its
    shape matches (a Whisper encoder's first LayerNorm over a conv's frames transposed, 32
    of 32, had taken the conv's layout: its channels the frames, sweep SX6); a norm of a
    conv map's own last axis (its length) keeps the map's."""
    if form != "tensor" or isinstance(module, _SEQUENCES):
        return SEQUENCE
    if isinstance(module, _CHANNELS_FIRST):
        return FLAT
    if moved_last and isinstance(module, _LAST_AXIS):
        return SEQUENCE
    return next((layouts[other] for other in like if other in layouts), SEQUENCE)


def moved_last(given) -> bool:
    """Whether a call's input (batch, a, b) stores its last axis outside its middle one: a
    view or a result of ``transpose(1, 2)`` of a (batch, b, a) map, as a conv's frames made
    tokens are (a contiguous copy of them is not told apart)."""
    return isinstance(given, torch.Tensor) and given.ndim == 3 and min(given.shape[1:]) > 1 \
        and given.stride(2) > given.stride(1)


def map_layout(module: nn.Module, shape: tuple, like: list, layouts: dict,
               stored_first: bool = False) -> str:
    """CHANNELS_LAST for a map (rank >= 3 per item) that a module making features on the last
    axis returned (a Linear or a LayerNorm over a permuted map: ConvNeXt's blocks, Swin's
    stages), that is a channels-first map permuted to last (``stored_first``: a Permute
    module's, torchvision ConvNeXt's, and an activation's after it, which keeps its input's
    strides), or that took its layout from one (an activation after it); FLAT (channels
    first) otherwise, a conv's or a norm's of channels."""
    if isinstance(module, _LAST_AXIS) and not (
            isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1) and \
            not _channels_first_norm(module, shape):
        return CHANNELS_LAST
    if isinstance(module, _CHANNELS_FIRST + _MAPS) or _channels_first_norm(module, shape):
        return FLAT
    if stored_first:
        return CHANNELS_LAST
    return next((layouts[other] for other in like if other in layouts), FLAT)


def stored_channels_first(out: torch.Tensor, given: torch.Tensor | None = None) -> bool:
    """Whether a map (batch and at least 3 axes) is a channels-first map with its channels
    moved last: a view of the module's input (``given``) whose last axis is the input's
    axis 1 (a Permute module's, whatever the memory format), or, made anew, a map whose
    last axis is stored outermost, as an activation keeps the strides (CHW, W, 1, HW) of a
    permuted (N, H, W, C) input. A map made channels-last (a Linear's) stores them
    innermost; a conv's in torch.channels_last memory keeps them logically first."""
    if out.ndim < 4 or out.shape[-1] < 2:
        return False
    if given is not None and given.ndim == out.ndim and given.numel() == out.numel() and \
            out.untyped_storage().data_ptr() == given.untyped_storage().data_ptr():
        moved = [axis for axis in range(given.ndim)
                 if (given.stride(axis), given.shape[axis]) == (out.stride(-1), out.shape[-1])]
        return moved == [1]
    if out.is_contiguous():
        return False
    strides = [out.stride(axis) for axis in range(1, out.ndim) if out.shape[axis] > 1]
    return len(strides) > 1 and out.stride(-1) == max(strides) and \
        strides.count(out.stride(-1)) == 1


def _channels_first_norm(module: nn.Module, shape: tuple | None) -> bool:
    """A LayerNorm subclass over the channels of a (C, H, W) map, which it permutes to last
    and back (Hugging Face's ConvNextLayerNorm with data_format="channels_first", timm's
    LayerNorm2d): its output keeps the channels first, where an nn.LayerNorm's own are last
    (read so, ConvNeXt's embeddings had 12 "channels", its width, all near 0)."""
    if not isinstance(module, nn.LayerNorm) or type(module) is nn.LayerNorm:
        return False
    told = getattr(module, "data_format", None)
    if isinstance(told, str):
        return told.lower() == "channels_first"
    width = module.normalized_shape[-1] if module.normalized_shape else None
    return type(module).__name__.endswith("2d") or bool(
        shape and len(shape) >= 3 and shape[-1] != width and shape[1] == width)
