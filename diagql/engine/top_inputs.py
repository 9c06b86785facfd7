"""TOPK k INPUTS: the items that activate one neuron most (BOTTOMK: least), exactly. Either a
bounded top-k streamed over every allowed item (a pass that also builds the layer's inputs
index), or the index's lists and codes, reading only the candidates they cannot order
(docs/ARCHITECTURE.md, "Top inputs")."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from diagql.engine.top_items import TopItems
from diagql.engine.inputs_index import IndexBuilder, InputsIndex
from diagql.engine.nonfinite import NonFinite
from diagql.language.bind_inputs import BoundInputs


class OneUnit:
    """A sequence view (TOKENS MEAN, MAX or TOKEN n) narrowed to one hidden unit, as the
    executor's consumers see a view: the hook reduces that unit's tokens only
    (``View.unit_rows``), under a key of its own, so that its rows are never another view's."""

    def __init__(self, view, unit: int):
        self.layer, self.whole, self.unit = view.layer, view, unit
        self.key = json.dumps([view.key, "unit", unit])

    def rows(self, call) -> torch.Tensor:
        return self.whole.unit_rows(call, self.unit)

    def finish(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


class NeuronTop:
    """A forward-pass consumer: the top k of one neuron over its items (``wanted``); of a
    sequence view's hidden unit, the hook reduces that unit alone (``OneUnit``)."""

    def __init__(self, bound: BoundInputs, items: np.ndarray, k: int):
        self.view, self.neuron = bound.view, bound.neuron
        if self.view.sequence and self.view.reduction != "all" and not self.view.channels:
            self.view, self.neuron = OneUnit(self.view, self.neuron), 0
        self.items = self.wanted = items
        self.state = TopItems(1, k, bound.query.largest)
        self.bad = NonFinite()

    def take(self, rows: torch.Tensor, idx: np.ndarray) -> None:
        values = self.view.finish(rows.detach())[:, self.neuron:self.neuron + 1]
        if not self.state.update(values, idx):
            self.bad.add(idx, ~torch.isfinite(values[:, 0]).cpu().numpy())

    def part(self, items: np.ndarray) -> NeuronTop:
        """An empty top k of the same neuron fed only ``items`` (a run of its own), for a
        shard of the pass (engine/shards.py)."""
        part = object.__new__(NeuronTop)
        part.view, part.neuron = self.view, self.neuron
        part.items = part.wanted = items
        part.state = TopItems(1, self.state.k, self.state.largest)
        part.bad = NonFinite()
        return part

    def merge(self, part: NeuronTop) -> NeuronTop:
        """Take in a fed part's top k: ties still go to the lower index (TopItems.merge)."""
        self.state.merge(part.state)
        self.bad.merge(part.bad)
        return self

    def check(self, label: str) -> None:
        self.bad.check(f"{label} is NaN or infinite for", len(self.items),
                       "DiagQL does not rank items by it")


@dataclass(frozen=True)
class Answer:
    """The ranked items (best first), their activations, and how they were found."""

    items: np.ndarray
    values: np.ndarray
    read: int  # items sent through the model
    used_index: bool
    index: InputsIndex | None  # built by this answer's pass
    seconds: float


def top_inputs(runner, bound: BoundInputs, allowed: np.ndarray, index: InputsIndex | None,
               build_index: bool) -> Answer:
    """The top k items of the bound neuron among the ``allowed`` ones (a bool mask over every
    item): from ``index`` when it can tell, else by a pass over the allowed items that, with
    ``build_index``, reads every item to build the layer's index as well."""
    started = time.perf_counter()
    query = bound.query
    n_allowed = int(allowed.sum())
    k = min(query.k, n_allowed)
    what = f"{'TOPK' if query.largest else 'BOTTOMK'} INPUTS {bound.label}"
    found = index.lookup(bound.neuron, k, allowed, query.largest) if index is not None else None
    if found is not None:
        state = TopItems(1, k, query.largest)
        state.update(torch.from_numpy(found.values)[:, None], found.known)
        reader = NeuronTop(bound, found.read, k)
        runner.run([reader], f"{what} (items the index cannot order)")
        reader.check(bound.label)
        items, values = state.merge(reader.state).finalize()
        return Answer(items[0], values[0], len(found.read), True, None,
                      time.perf_counter() - started)
    reader = NeuronTop(bound, np.flatnonzero(allowed), k)
    builder = IndexBuilder(bound.view, len(allowed)) if build_index else None
    runner.run([reader] + ([builder] if builder is not None else []),
               what + (" (building the layer's inputs index)" if builder else ""))
    reader.check(bound.label)
    built = builder.finished() if builder is not None else None
    items, values = reader.state.finalize()
    read = len(allowed) if builder is not None else n_allowed
    return Answer(items[0], values[0], read, False, built, time.perf_counter() - started)
