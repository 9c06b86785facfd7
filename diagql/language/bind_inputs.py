"""Binding ``TOPK k INPUTS FOR L[i, ...]``: its layer, view and neuron resolved against the
model's catalog (the other statements' binding is binder.py's)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diagql import samplers
from diagql.language import ast
from diagql.language.binder import _error, bind_items, bind_layer, bind_view
from diagql.model.layers import LayerCatalog, LayerInfo
from diagql.model.views import CHANNELS_LAST, View


@dataclass(frozen=True)
class BoundInputs:
    """``TOPK k INPUTS FOR L[i, ...]`` with its names resolved: the layer, how the query sees
    it, the neuron as a flat index into the view's finished row, and the sampler if any."""

    query: ast.TopInputs
    layer: LayerInfo
    view: View
    neuron: int
    label: str  # the neuron as result labels write it
    sampler: samplers.Sampler | None


def neuron_shape(view: View) -> tuple[int, ...]:
    """The shape the view's neurons are indexed in, as its labels write them: a channel or a
    sequence's hidden unit by one index, TOKENS ALL by (position, unit), a flat layer by its
    per-item output's coordinates."""
    shape = tuple(view.layer.shape)
    if view.channels:
        return (view.layer.channels,)
    if view.sequence:
        return shape if view.reduction == "all" else shape[-1:]
    return shape or (1,)  # one value per item is one neuron, labelled layer[0]


def bind_inputs(query: ast.TopInputs, catalog: LayerCatalog, *, n_classes: int,
                seed: int | None, n_items: int, has_labels: bool = True) -> BoundInputs:
    ref = query.neuron
    layer = bind_layer(ref.layer, catalog)
    view = bind_view(query, layer)
    if query.k < 1:
        raise _error("TOPK needs k of at least 1", query.k_span or query.span)
    shape = neuron_shape(view)
    name = ref.layer.text()
    axes = ("position", "unit") if view.sequence and len(shape) == 2 else \
        (("h", "w", "c") if layer.layout == CHANNELS_LAST else ("c", "h", "w")) \
        if len(shape) == 3 else tuple("ijklmnop"[:len(shape)])
    if len(ref.index) != len(shape):
        what = ("channels" if view.channels else "hidden units" if view.sequence and
                len(shape) == 1 else "neurons")
        also = (f"; FOR CHANNEL {name}[c] ranks by a channel's mean"
                if len(shape) > 1 and not view.sequence and layer.channels else "")
        raise _error(f"layer {layer.name!r} has {what} of shape {shape}: name one with "
                     f"{len(shape)} ind{'ex' if len(shape) == 1 else 'ices'}, "
                     f"{name}[{','.join(axes)}]{also}", ref.index_span or ref.span)
    for axis, (i, size) in enumerate(zip(ref.index, shape)):
        if i >= size:
            where = "" if len(shape) == 1 else f" on axis {axis} ({axes[axis]})"
            what = "channels" if view.channels else "entries"
            raise _error(f"index {i} is past the {size} {what}{where} of layer {layer.name!r} "
                         f"(its {'channels' if view.channels else 'neurons'} have shape "
                         f"{shape})", ref.index_span or ref.span)
    sampler = bind_items(query, n_classes=n_classes, seed=seed, n_items=n_items,
                         has_labels=has_labels)
    neuron = int(np.ravel_multi_index(ref.index, shape))
    return BoundInputs(query, layer, view, neuron, view.labels([neuron])[0], sampler)
